package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mqtt-ha/broker/internal/node"
)

// adminFlags are the flags every admin subcommand takes.
type adminFlags struct {
	fs     *flag.FlagSet
	addr   *string
	asJSON *bool
	token  func() (string, error)
}

func newAdminFlags(name string, getenv func(string) string, stderr io.Writer) *adminFlags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := "127.0.0.1:8080"
	if v := getenv("BROKER_HTTP_ADDR"); v != "" {
		def = v
	}
	return &adminFlags{fs: fs, addr: fs.String("http-addr", def, "HTTP address of the node to ask"),
		asJSON: fs.Bool("json", false, "print the raw JSON"), token: adminTokenFlags(fs, getenv)}
}

// writeFlags are the flags an admin write's usage line names.
const writeFlags = "[--http-addr host:port] [--admin-token-file FILE]"

// parseOne parses the flags and the one argument of subcommand name,
// printing its usage (usage: the flags and the argument) when they do not
// fit.
func parseOne(name, usage string, args []string, getenv func(string) string, stderr io.Writer) (*adminFlags, string, bool) {
	a := newAdminFlags(name, getenv, stderr)
	if err := a.fs.Parse(args); err != nil || a.fs.NArg() != 1 {
		fmt.Fprintf(stderr, "usage: %s %s\n", name, usage)
		return nil, "", false
	}
	return a, a.fs.Arg(0), true
}

func (a *adminFlags) host() string {
	if strings.HasPrefix(*a.addr, ":") {
		return "127.0.0.1" + *a.addr
	}
	return *a.addr
}

// post sends an admin write and prints the node's answer.
func (a *adminFlags) post(path string, stdout, stderr io.Writer) int {
	token, err := a.token()
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 2
	}
	return apiPost(a.host(), path, token, stdout, stderr)
}

// apiPost sends an admin POST to a running node.
func apiPost(host, path, token string, stdout, stderr io.Writer) int {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+host+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "broker: cannot reach the node at %s: %v (is it running? pass --http-addr)\n", host, err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "broker: %s", body)
		return 1
	}
	_, _ = stdout.Write(body)
	return 0
}

// clientsCmd runs `broker clients` (the clients connected to a node) and
// `broker clients disconnect ID`.
func clientsCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "disconnect" {
		a, id, ok := parseOne("broker clients disconnect", writeFlags+" CLIENT-ID", args[1:], getenv, stderr)
		if !ok {
			return 2
		}
		return a.post("/api/clients/disconnect?id="+url.QueryEscape(id), stdout, stderr)
	}
	a := newAdminFlags("broker clients", getenv, stderr)
	all := a.fs.Bool("all", false, "every node's clients (from the replicated ownership table; details for the asked node's own)")
	if err := a.fs.Parse(args); err != nil {
		return 2
	}
	path := "/api/clients"
	if *all {
		path += "?all=1"
	}
	body, err := apiGet(a.host(), path)
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	if *a.asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	var cs []node.ClientInfo
	if err := json.Unmarshal(body, &cs); err != nil {
		fmt.Fprintf(stderr, "broker: bad answer from %s: %v\n", a.host(), err)
		return 1
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tNODE\tREMOTE\tMQTT\tKEEPALIVE\tCLEAN")
	for _, c := range cs {
		if c.Remote == "" { // another node's client (--all): only its node is known here
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\n", c.ClientID, c.Node)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%v\n", c.ClientID, c.Node, c.Remote, c.ProtocolVersion, c.Keepalive, c.CleanStart)
	}
	_ = tw.Flush()
	return 0
}

// retainedCmd runs `broker retained` (every page) and `broker retained
// delete TOPIC`.
func retainedCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "delete" {
		a, topic, ok := parseOne("broker retained delete", writeFlags+" TOPIC", args[1:], getenv, stderr)
		if !ok {
			return 2
		}
		return a.post("/api/retained/delete?topic="+url.QueryEscape(topic), stdout, stderr)
	}
	a := newAdminFlags("broker retained", getenv, stderr)
	filter := a.fs.String("filter", "#", "topic filter")
	if err := a.fs.Parse(args); err != nil {
		return 2
	}
	var all []node.RetainedInfo
	for after := ""; ; {
		body, err := apiGet(a.host(), "/api/retained?filter="+url.QueryEscape(*filter)+"&after="+url.QueryEscape(after))
		if err != nil {
			fmt.Fprintf(stderr, "broker: %v\n", err)
			return 1
		}
		var page node.RetainedPage
		if err := json.Unmarshal(body, &page); err != nil {
			fmt.Fprintf(stderr, "broker: bad answer from %s: %v\n", a.host(), err)
			return 1
		}
		all = append(all, page.Messages...)
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	if *a.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(all)
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TOPIC\tQOS\tBYTES\tCREATED\tEXPIRES")
	for _, m := range all {
		exp := "-"
		if !m.Expires.IsZero() {
			exp = m.Expires.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\n", m.Topic, m.QoS, m.Bytes, m.Created.UTC().Format(time.RFC3339), exp)
	}
	_ = tw.Flush()
	return 0
}

// sessionCmd runs `broker sessions show ID` and `broker sessions delete ID`.
func sessionCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	a, id, ok := parseOne("broker sessions "+args[0], writeFlags+" CLIENT-ID", args[1:], getenv, stderr)
	if !ok {
		return 2
	}
	if args[0] == "delete" {
		return a.post("/api/sessions/delete?id="+url.QueryEscape(id), stdout, stderr)
	}
	body, err := apiGet(a.host(), "/api/sessions/"+url.PathEscape(id))
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	if *a.asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	var d node.SessionDetail
	if err := json.Unmarshal(body, &d); err != nil {
		fmt.Fprintf(stderr, "broker: bad answer from %s: %v\n", a.host(), err)
		return 1
	}
	fmt.Fprintf(stdout, "client %s: %s, owner %s, MQTT %d, %d queued\n", d.ClientID, d.State, d.Owner, d.ProtocolVersion, d.QueueDepth)
	for _, f := range d.Filters {
		fmt.Fprintf(stdout, "  subscription %s\n", f)
	}
	for _, q := range d.Queue {
		fmt.Fprintf(stdout, "  queued #%d %s QoS %d, %d bytes\n", q.Seq, q.Topic, q.QoS, q.Bytes)
	}
	return 0
}

// subscriptionsCmd runs `broker subscriptions FILTER`: the nodes that
// route the filter.
func subscriptionsCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	a, filter, ok := parseOne("broker subscriptions", "[--http-addr host:port] [--json] FILTER", args, getenv, stderr)
	if !ok {
		return 2
	}
	body, err := apiGet(a.host(), "/api/subscriptions?filter="+url.QueryEscape(filter))
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	if *a.asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	var v struct {
		Nodes []string `json:"nodes"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		fmt.Fprintf(stderr, "broker: bad answer from %s: %v\n", a.host(), err)
		return 1
	}
	if len(v.Nodes) == 0 {
		fmt.Fprintf(stdout, "no node routes %s\n", a.fs.Arg(0))
		return 0
	}
	fmt.Fprintln(stdout, strings.Join(v.Nodes, "\n"))
	return 0
}

// backupCmd runs `broker backup --out FILE`: a consistent copy of the
// cluster's replicated state (retained messages, sessions with their
// queues, large payloads), checksummed. It replaces tarring the data dir.
func backupCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	a := newAdminFlags("broker backup", getenv, stderr)
	out := a.fs.String("out", "", "file to write the backup to")
	if err := a.fs.Parse(args); err != nil || *out == "" || a.fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: broker backup [--http-addr host:port] [--admin-token-file FILE] --out FILE")
		return 2
	}
	token, err := a.token()
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 2
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+a.host()+"/api/backup", nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "broker: cannot reach the node at %s: %v (is it running? pass --http-addr)\n", a.host(), err)
		return 1
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		fmt.Fprintf(stderr, "broker: backup refused: %s", body)
		return 1
	}
	tmp := *out + ".partial"
	f, err := os.Create(tmp)
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	defer os.Remove(tmp) // after the rename it is gone already
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h, progress(stderr, "backup")), resp.Body)
	if err == nil {
		err = f.Close()
	} else {
		_ = f.Close()
	}
	if err != nil {
		fmt.Fprintf(stderr, "broker: backup interrupted after %d bytes: %v\n", n, err)
		return 1
	}
	if err := verifyBackup(tmp); err != nil {
		fmt.Fprintf(stderr, "broker: the backup received is not whole (%v): nothing written to %s\n", err, *out)
		return 1
	}
	if err := os.Rename(tmp, *out); err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "wrote %s: %d bytes, checksum verified\n", *out, n)
	return 0
}

// verifyBackup checks a backup file's trailing SHA-256 (the node checks
// it again, and decodes it whole, before a restore).
func verifyBackup(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() < 5+sha256.Size {
		return fmt.Errorf("%d bytes", st.Size())
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size()-sha256.Size)); err != nil {
		return err
	}
	sum := make([]byte, sha256.Size)
	if _, err := f.ReadAt(sum, st.Size()-sha256.Size); err != nil {
		return err
	}
	if !bytes.Equal(sum, h.Sum(nil)) {
		return fmt.Errorf("checksum mismatch")
	}
	return nil
}

// restoreCmd runs `broker restore --in FILE [--force]` against the leader.
func restoreCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	a := newAdminFlags("broker restore", getenv, stderr)
	in := a.fs.String("in", "", "backup file (broker backup)")
	force := a.fs.Bool("force", false, "replace the retained messages and sessions the cluster holds")
	if err := a.fs.Parse(args); err != nil || *in == "" || a.fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: broker restore [--http-addr host:port of the leader] [--admin-token-file FILE] [--force] --in FILE")
		return 2
	}
	token, err := a.token()
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 2
	}
	if err := verifyBackup(*in); err != nil {
		fmt.Fprintf(stderr, "broker: %s is not a whole backup: %v\n", *in, err)
		return 1
	}
	f, err := os.Open(*in)
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	defer f.Close()
	path := "/api/restore"
	if *force {
		path += "?force=1"
	}
	req, _ := http.NewRequest(http.MethodPost, "http://"+a.host()+path, io.TeeReader(f, progress(stderr, "restore")))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "broker: cannot reach the node at %s: %v (is it running? pass --http-addr)\n", a.host(), err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "broker: restore refused: %s", body)
		return 1
	}
	_, _ = stdout.Write(body)
	return 0
}

// progress reports bytes moved on w every half second, if w is a
// terminal; elsewhere it writes nothing.
func progress(w io.Writer, what string) io.Writer {
	if !isTerminal(w) {
		return io.Discard
	}
	return &progressWriter{w: w, what: what}
}

// isTerminal reports whether w is a terminal (progress is drawn there only).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

type progressWriter struct {
	w    io.Writer
	what string
	n    int64
	last time.Time
}

func (p *progressWriter) Write(b []byte) (int, error) {
	p.n += int64(len(b))
	if time.Since(p.last) > 500*time.Millisecond {
		p.last = time.Now()
		fmt.Fprintf(p.w, "\r%s: %d MB", p.what, p.n>>20)
	}
	return len(b), nil
}
