package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mqtt-ha/broker/internal/node"
)

// clusterCmd runs `broker cluster status`: it asks a running node's HTTP
// endpoint (/api/cluster) and prints the members as a table.
func clusterCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "transfer-leadership" {
		a := newAdminFlags("broker cluster transfer-leadership", getenv, stderr)
		if err := a.fs.Parse(args[1:]); err != nil || a.fs.NArg() != 0 {
			fmt.Fprintln(stderr, "usage: broker cluster transfer-leadership [--http-addr host:port of the leader] [--admin-token-file FILE]")
			return 2
		}
		return a.post("/api/cluster/transfer-leadership", stdout, stderr)
	}
	if len(args) == 0 || (args[0] != "status" && args[0] != "remove-node") {
		fmt.Fprintln(stderr, "usage: broker cluster status [--http-addr host:port] [--json]\n       broker cluster remove-node [--http-addr host:port] [--admin-token-file FILE] NODE-ID\n       broker cluster transfer-leadership [--http-addr host:port] [--admin-token-file FILE]")
		return 2
	}
	fs := flag.NewFlagSet("broker cluster "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := "127.0.0.1:8080"
	if v := getenv("BROKER_HTTP_ADDR"); v != "" {
		def = v
	}
	addr := fs.String("http-addr", def, "HTTP address of the node to ask")
	asJSON := fs.Bool("json", false, "print the raw JSON")
	tok := adminTokenFlags(fs, getenv)
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	host := *addr
	if strings.HasPrefix(host, ":") {
		host = "127.0.0.1" + host
	}
	if args[0] == "remove-node" {
		if fs.NArg() != 1 {
			fmt.Fprintln(stderr, "usage: broker cluster remove-node [--http-addr host:port] [--admin-token-file FILE] NODE-ID")
			return 2
		}
		token, err := tok()
		if err != nil {
			fmt.Fprintf(stderr, "broker: %v\n", err)
			return 2
		}
		return removeNode(host, fs.Arg(0), token, stdout, stderr)
	}
	body, err := apiGet(host, "/api/cluster")
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	if *asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	var st node.ClusterInfo
	if err := json.Unmarshal(body, &st); err != nil {
		fmt.Fprintf(stderr, "broker: bad answer from %s: %v\n", host, err)
		return 1
	}
	printStatus(stdout, st)
	return 0
}

func printStatus(w io.Writer, st node.ClusterInfo) {
	fmt.Fprintf(w, "node %s: %s, %d alive members, %d local routes (version %d)\n",
		st.NodeID, st.State, st.AliveMembers, st.LocalRoutes, st.RouteVersion)
	r := st.Raft
	var voters, nonVoters []string
	for _, v := range r.Voters {
		voters = append(voters, v.ID)
	}
	for _, v := range r.NonVoters {
		nonVoters = append(nonVoters, v.ID)
	}
	fmt.Fprintf(w, "raft: %s, leader %s, term %d, commit %d, applied %d, voters [%s], non-voters [%s], %d retained\n\n",
		r.State, r.LeaderID, r.Term, r.CommitIndex, r.AppliedIndex, strings.Join(voters, " "), strings.Join(nonVoters, " "), r.Retained)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MEMBER\tSTATE\tGOSSIP\tCLUSTER\tMQTT\tROUTES\tCONNECTED\tQUEUE\tFORWARDED\tDROPPED")
	for _, m := range st.Members {
		id := m.ID
		if m.Self {
			id += " (self)"
		}
		conn := "-"
		if !m.Self {
			conn = fmt.Sprint(m.Connected)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\t%d\t%d\t%d\n", id, m.State, m.GossipAddr, m.ClusterAddr,
			m.MQTTPort, m.Routes, conn, m.QueueDepth, m.Forwarded, m.Dropped)
	}
	_ = tw.Flush()
}

// removeNode asks a running node to remove id from the raft configuration.
func removeNode(host, id, token string, stdout, stderr io.Writer) int {
	return apiPost(host, "/api/cluster/remove-node?id="+url.QueryEscape(id), token, stdout, stderr)
}

// apiGet fetches path from a running node's HTTP endpoint.
func apiGet(host, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the node at %s: %w (is it running? pass --http-addr)", host, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s%s answered %s: %v", host, path, resp.Status, err)
	}
	return body, nil
}

// sessionsCmd runs `broker sessions`: the sessions a running node holds.
func sessionsCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && (args[0] == "show" || args[0] == "delete") {
		return sessionCmd(args, getenv, stdout, stderr)
	}
	fs := flag.NewFlagSet("broker sessions", flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := "127.0.0.1:8080"
	if v := getenv("BROKER_HTTP_ADDR"); v != "" {
		def = v
	}
	addr := fs.String("http-addr", def, "HTTP address of the node to ask")
	asJSON := fs.Bool("json", false, "print the raw JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	host := *addr
	if strings.HasPrefix(host, ":") {
		host = "127.0.0.1" + host
	}
	body, err := apiGet(host, "/api/sessions")
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	if *asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	var ss []node.SessionInfo
	if err := json.Unmarshal(body, &ss); err != nil {
		fmt.Fprintf(stderr, "broker: bad answer from %s: %v\n", host, err)
		return 1
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tOWNER\tSTATE\tMQTT\tPERSISTENT\tSUBSCRIPTIONS\tQUEUED")
	for _, s := range ss {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%v\t%d\t%d\n", s.ClientID, s.Owner, s.State, s.ProtocolVersion, s.Persistent, s.Subscriptions, s.QueueDepth)
	}
	_ = tw.Flush()
	return 0
}

// adminTokenFlags declares --admin-token and --admin-token-file (defaults
// from BROKER_ADMIN_TOKEN and BROKER_ADMIN_TOKEN_FILE, as `broker serve`
// reads them) and returns a function that yields the token after Parse.
func adminTokenFlags(fs *flag.FlagSet, getenv func(string) string) func() (string, error) {
	tok := fs.String("admin-token", getenv("BROKER_ADMIN_TOKEN"), "bearer token for admin writes (the node's --admin-token)")
	file := fs.String("admin-token-file", getenv("BROKER_ADMIN_TOKEN_FILE"), "file holding the admin token")
	return func() (string, error) {
		if *file == "" {
			return *tok, nil
		}
		if *tok != "" {
			return "", fmt.Errorf("both --admin-token and --admin-token-file are set; keep one")
		}
		lines, err := readSecretLines(*file)
		if err != nil {
			return "", fmt.Errorf("--admin-token-file: %w", err)
		}
		return lines[0], nil
	}
}
