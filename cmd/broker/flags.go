package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/mqtt-ha/broker/internal/node"
	"github.com/mqtt-ha/broker/replication"
)

// usageError is a configuration mistake: it names where the bad value came
// from (a flag, an environment variable, or file:line) and how to fix it.
// main exits with status 2 for it.
type usageError struct {
	source string
	msg    string
}

func (e *usageError) Error() string { return e.source + ": " + e.msg }

// serveOptions is the parsed command line of `broker serve`.
type serveOptions struct {
	cfg        node.Config
	configFile string
	logFormat  string
	logLevel   string
	// set records which flags were given on the command line or in the
	// environment: those win over the config file.
	set map[string]string // flag name -> source description
	// fromFile records flags filled from --config, as "file:line".
	fromFile map[string]string
	warnings []configWarning

	clusterKeyFile  string
	adminTokenFile  string
	insecureCluster bool
}

// newServeFlags declares every flag of `broker serve`. Each flag also reads
// BROKER_<NAME> from the environment (upper case, dashes as underscores).
func newServeFlags(o *serveOptions, hostname string) *flag.FlagSet {
	fs := flag.NewFlagSet("broker serve", flag.ContinueOnError)
	c := &o.cfg
	fs.StringVar(&c.NodeID, "node-id", hostname, "unique node id (default: hostname)")
	fs.StringVar(&c.DataDir, "data-dir", "", "data directory (default ./data/<node-id>)")
	fs.StringVar(&c.MQTTAddr, "mqtt-addr", ":1883", "MQTT over TCP listen address (empty: off)")
	fs.StringVar(&c.WSAddr, "ws-addr", "", "MQTT over WebSocket listen address (default off)")
	fs.StringVar(&c.HTTPAddr, "http-addr", ":8080", "HTTP address for /healthz /readyz /metrics /api")
	fs.StringVar(&c.TLSAddr, "tls-addr", "", "MQTT over TLS listen address (default off; needs --tls-cert and --tls-key)")
	fs.StringVar(&c.TLSCert, "tls-cert", "", "PEM certificate (chain) for the TLS listener")
	fs.StringVar(&c.TLSKey, "tls-key", "", "PEM private key for the TLS listener")
	fs.StringVar(&c.TLSClientCA, "tls-client-ca", "", "PEM CA bundle; when set, TLS clients must present a certificate it signed")
	fs.StringVar(&c.GossipAddr, "gossip-addr", ":7946", "memberlist gossip address (TCP and UDP)")
	fs.StringVar(&c.ClusterAddr, "cluster-addr", ":7947", "raft RPC and node-to-node forwarding address")
	fs.StringVar(&c.AdvertiseHost, "advertise-host", "", "host peers use to reach this node (default: the node's hostname)")
	fs.Func("join", "comma-separated gossip host:port or DNS names of peers", func(s string) error {
		c.Join = nil
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				c.Join = append(c.Join, p)
			}
		}
		return nil
	})
	fs.StringVar(&c.DNSServer, "dns-server", "", "resolve peer names (--join, --advertise-host, raft addresses) with this DNS server (host:port) instead of the system resolver")
	fs.IntVar(&c.BootstrapExpect, "bootstrap-expect", 1, "voters to wait for before the first raft election")
	fs.DurationVar(&c.RemoveLeftAfter, "remove-left-after", 2*time.Minute, "remove from raft a node that left gracefully and has not come back for this long (a scale-down); 0: never")
	fs.IntVar(&c.MinVoters, "min-voters", 3, "never remove departed voters below this many")
	fs.StringVar(&c.ClusterKey, "cluster-key", "", "shared cluster secret (gossip encryption, authenticated cluster port); prefer --cluster-key-file")
	fs.StringVar(&o.clusterKeyFile, "cluster-key-file", "", "file holding the cluster key (a mounted Secret); more lines: keys also accepted during a rotation")
	fs.BoolVar(&o.insecureCluster, "insecure-cluster", false, "allow a cluster port and gossip on a non-loopback address without a cluster key (anyone who can reach them controls the cluster)")
	fs.StringVar(&c.ClusterTLSCert, "cluster-tls-cert", "", "PEM certificate for mutual TLS on the cluster port (with --cluster-tls-key and --cluster-tls-ca)")
	fs.StringVar(&c.ClusterTLSKey, "cluster-tls-key", "", "PEM private key for the cluster port's TLS")
	fs.StringVar(&c.ClusterTLSCA, "cluster-tls-ca", "", "PEM CA bundle that signed every node's cluster certificate")
	fs.StringVar(&c.AdminToken, "admin-token", "", "bearer token required by admin writes on --http-addr (default: writes from loopback only); prefer --admin-token-file")
	fs.StringVar(&o.adminTokenFile, "admin-token-file", "", "file holding the admin token (a mounted Secret)")
	fs.StringVar(&o.configFile, "config", "", "mosquitto.conf-style config file (see README)")

	fs.BoolVar(&c.AllowAnonymous, "allow-anonymous", true, "accept clients without a username (mosquitto: allow_anonymous)")
	fs.StringVar(&c.PasswordFile, "password-file", "", "mosquitto_passwd file (mosquitto: password_file)")
	fs.StringVar(&c.ACLFile, "acl-file", "", "mosquitto ACL file (mosquitto: acl_file)")
	c.MaxPacketSize = 256 << 20
	fs.Func("message-size-limit", "largest accepted MQTT packet, bytes or with KB/MB/GB (default 256MB)", func(s string) error {
		n, err := parseBytes(s)
		c.MaxPacketSize = n
		return err
	})
	fs.Func("replicated-size-limit", "largest message stored durably (retained, or queued for a persistent session); larger ones are refused (default: --message-size-limit)", func(s string) error {
		n, err := parseBytes(s)
		c.ReplicatedSizeLimit = int(n)
		return err
	})
	fs.IntVar(&c.MaxQueuedMessages, "max-queued-messages", 1000, "QoS 1/2 messages held per session, queued plus in flight (1-65535)")
	fs.IntVar(&c.MaxInflightMessages, "max-inflight-messages", 20, "QoS 1/2 messages sent to a persistent session ahead of its acknowledgements (0: the client's Receive Maximum)")
	fs.Func("max-keepalive", "largest keepalive a client may ask for, seconds (default 65535)", func(s string) error {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil {
			return fmt.Errorf("want 0-65535 seconds")
		}
		c.MaxKeepalive = uint16(n)
		return nil
	})
	c.MaxKeepalive = 65535
	fs.Int64Var(&c.MaxConnections, "max-connections", -1, "client connections accepted at once (-1: unlimited)")
	fs.BoolVar(&c.RetainAvailable, "retain-available", true, "accept retained messages")
	c.SessionExpiry = 7 * 24 * time.Hour
	fs.Func("session-expiry", "how long a disconnected persistent session is kept, e.g. 7d, 12h; 0 = forever (default 7d)", func(s string) error {
		d, err := parseDuration(s)
		c.SessionExpiry = d
		return err
	})
	fs.BoolVar(&c.Persistence, "persistence", true, "keep sessions and retained messages on disk under --data-dir")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", 10*time.Second, "time a new connection has, from accept, to send its whole CONNECT")
	fs.DurationVar(&c.WriteTimeout, "write-timeout", 10*time.Second, "close a client connection whose socket takes no data for about this long (a subscriber that stopped reading holds up deliveries to it); 0: never")
	fs.DurationVar(&c.SysInterval, "sys-interval", 10*time.Second, "how often $SYS topics are published, with Mosquitto's names (mosquitto: sys_interval); 0 disables them")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 10*time.Second, "time allowed for a graceful stop")
	fs.DurationVar(&c.LameDuck, "lame-duck", 5*time.Second, "on a graceful stop, spread client disconnects over up to this long (10 ms apart, at most half of --shutdown-timeout), so that clients do not all reconnect to the other nodes at once; 0: all at once")
	fs.BoolVar(&c.Pprof, "pprof", false, "serve /debug/pprof on --http-addr")
	c.RaftLogStore = replication.LogStoreBolt
	fs.Func("raft-log-store", "raft's log store for a new data dir: bolt (raft-boltdb) or wal (raft-wal, one fsync per write instead of two: 1.2-1.75 × the durable QoS 1/2 throughput measured; experimental, see the README). A data dir keeps the kind it was created with (default bolt)", func(s string) error {
		if s != replication.LogStoreBolt && s != replication.LogStoreWAL {
			return fmt.Errorf("want %s or %s", replication.LogStoreBolt, replication.LogStoreWAL)
		}
		c.RaftLogStore = s
		return nil
	})
	fs.BoolVar(&c.RaftPipeline, "raft-pipeline", false, "experimental: raft sends AppendEntries to a follower without waiting for the answer to the previous one (see replication/DESIGN.md, Transport)")
	fs.BoolVar(&c.ReadLease, "read-lease", false, "experimental: the raft leader confirms read barriers by a lease instead of a heartbeat round (cheaper QoS 1/2 publishes; set it on every node or none; see replication/DESIGN.md)")
	fs.StringVar(&o.logFormat, "log-format", "", "text or json (default: text on a terminal, json otherwise)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	return fs
}

// parseServe parses args and then the environment for flags not given.
func parseServe(args []string, getenv func(string) string, stderr io.Writer) (*serveOptions, error) {
	hostname, _ := os.Hostname()
	o := &serveOptions{set: map[string]string{}, fromFile: map[string]string{}}
	fs := newServeFlags(o, hostname)
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return nil, err
		}
		return nil, &usageError{source: "command line", msg: err.Error() + " (run 'broker serve -h' for the flags)"}
	}
	if fs.NArg() > 0 {
		return nil, &usageError{source: "command line", msg: fmt.Sprintf("unexpected argument %q; flags start with --", fs.Arg(0))}
	}
	fs.Visit(func(f *flag.Flag) { o.set[f.Name] = "flag --" + f.Name })
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if _, done := o.set[f.Name]; done || envErr != nil {
			return
		}
		name := "BROKER_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v := getenv(name)
		if v == "" {
			return
		}
		if err := fs.Set(f.Name, v); err != nil {
			envErr = &usageError{source: "environment " + name, msg: fmt.Sprintf("invalid value %q: %v", v, err)}
			return
		}
		o.set[f.Name] = "environment " + name
	})
	if envErr != nil {
		return nil, envErr
	}
	return o, nil
}

// source names where a flag's value came from, for error messages.
func (o *serveOptions) source(flagName string) string {
	if s, ok := o.set[flagName]; ok {
		return s
	}
	if s, ok := o.fromFile[flagName]; ok {
		return s
	}
	return "default of --" + flagName
}

// validate checks every value and cross-field rule up front, so a bad
// setting stops the node at start rather than at first use.
func (o *serveOptions) validate() error {
	c := &o.cfg
	bad := func(flagName, format string, args ...any) error {
		return &usageError{source: o.source(flagName), msg: fmt.Sprintf(format, args...)}
	}
	if c.NodeID == "" || strings.ContainsAny(c.NodeID, " \t/\\") {
		return bad("node-id", "%q is not a usable node id; use letters, digits, dots and dashes, e.g. --node-id broker-0", c.NodeID)
	}
	if c.DataDir == "" {
		c.DataDir = "./data/" + c.NodeID
	}
	for _, a := range []struct{ flag, val string }{
		{"mqtt-addr", c.MQTTAddr}, {"ws-addr", c.WSAddr}, {"http-addr", c.HTTPAddr}, {"tls-addr", c.TLSAddr},
		{"gossip-addr", c.GossipAddr}, {"cluster-addr", c.ClusterAddr},
	} {
		if a.val == "" && (a.flag == "ws-addr" || a.flag == "tls-addr" || a.flag == "mqtt-addr") {
			continue
		}
		if err := checkAddr(a.val); err != nil {
			return bad(a.flag, "%q: %v; use host:port or :port, e.g. --%s 127.0.0.1:1883", a.val, err, a.flag)
		}
	}
	if c.MQTTAddr == "" && c.WSAddr == "" && c.TLSAddr == "" {
		return bad("mqtt-addr", "no MQTT listener configured; set --mqtt-addr, --ws-addr or --tls-addr")
	}
	if c.TLSAddr != "" {
		if c.TLSCert == "" || c.TLSKey == "" {
			return bad("tls-addr", "a TLS listener needs --tls-cert and --tls-key")
		}
	}
	for _, f := range []struct{ flag, path string }{
		{"tls-cert", c.TLSCert}, {"tls-key", c.TLSKey}, {"tls-client-ca", c.TLSClientCA},
		{"password-file", c.PasswordFile}, {"acl-file", c.ACLFile},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return bad(f.flag, "cannot read %s: %v; check the path and that the broker's user may read it", f.path, err)
		}
	}
	if (c.TLSCert != "" || c.TLSClientCA != "") && c.TLSAddr == "" {
		return bad("tls-cert", "TLS files given but no TLS listener; add --tls-addr, e.g. --tls-addr :8883")
	}
	if c.RemoveLeftAfter == 0 {
		c.RemoveLeftAfter = -1 // the flag's 0 is "never"; the node's 0 is its default
	}
	if c.RemoveLeftAfter < 0 && c.RemoveLeftAfter != -1 {
		return bad("remove-left-after", "%v: must be 0 (never) or a positive duration", c.RemoveLeftAfter)
	}
	if c.DNSServer != "" {
		if _, _, err := net.SplitHostPort(c.DNSServer); err != nil {
			return bad("dns-server", "%q: want host:port, for example 10.96.0.10:53", c.DNSServer)
		}
	}
	if c.MinVoters < 1 {
		return bad("min-voters", "%d: must be at least 1", c.MinVoters)
	}
	if c.BootstrapExpect < 1 {
		return bad("bootstrap-expect", "%d: must be at least 1 (1 runs a single-node cluster)", c.BootstrapExpect)
	}
	if c.MaxQueuedMessages < 1 || c.MaxQueuedMessages > 65535 {
		return bad("max-queued-messages", "%d: must be between 1 and 65535", c.MaxQueuedMessages)
	}
	if c.MaxInflightMessages < 0 || c.MaxInflightMessages > 65535 {
		return bad("max-inflight-messages", "%d: must be between 0 and 65535", c.MaxInflightMessages)
	}
	if c.MaxPacketSize != 0 && c.MaxPacketSize < 64 {
		return bad("message-size-limit", "%d bytes is too small for any MQTT client; use at least 1KB, or 0 for the protocol maximum", c.MaxPacketSize)
	}
	if c.ReplicatedSizeLimit != 0 && (c.ReplicatedSizeLimit < 1024 || c.ReplicatedSizeLimit > 256<<20) {
		return bad("replicated-size-limit", "%d bytes: must be between 1KB and 256MB", c.ReplicatedSizeLimit)
	}
	if c.ReplicatedSizeLimit == 0 {
		c.ReplicatedSizeLimit = int(c.MaxPacketSize) // 0 stays: any MQTT payload
	}
	if c.SysInterval < 0 {
		return bad("sys-interval", "%s: must be 0 (off) or positive, e.g. 10s", c.SysInterval)
	}
	if c.ConnectTimeout <= 0 {
		return bad("connect-timeout", "%s: must be positive, e.g. 10s", c.ConnectTimeout)
	}
	if c.WriteTimeout < 0 {
		return bad("write-timeout", "%s: must be 0 (never) or positive, e.g. 10s", c.WriteTimeout)
	}
	if c.LameDuck < 0 {
		return bad("lame-duck", "%s: must be 0 or positive, e.g. 5s", c.LameDuck)
	}
	if c.ShutdownTimeout <= 0 {
		return bad("shutdown-timeout", "%s: must be positive, e.g. 10s", c.ShutdownTimeout)
	}
	if c.AdvertiseHost == "" {
		c.AdvertiseHost = c.NodeID
	}
	return o.validateSecurity()
}

// validateSecurity reads the key and token files and refuses a cluster
// that anyone on the network could join.
func (o *serveOptions) validateSecurity() error {
	c := &o.cfg
	bad := func(flagName, format string, args ...any) error {
		return &usageError{source: o.source(flagName), msg: fmt.Sprintf(format, args...)}
	}
	// fromFile reads a secret file given with fileFlag, refusing it beside
	// the flag that takes the secret itself.
	fromFile := func(fileFlag, path, plainFlag, plain string) ([]string, error) {
		if plain != "" {
			return nil, bad(fileFlag, "both --%s and --%s are set; keep one (the file is safer: it stays out of ps and the environment)", plainFlag, fileFlag)
		}
		lines, err := readSecretLines(path)
		if err != nil {
			return nil, bad(fileFlag, "%v", err)
		}
		return lines, nil
	}
	if o.clusterKeyFile != "" {
		keys, err := fromFile("cluster-key-file", o.clusterKeyFile, "cluster-key", c.ClusterKey)
		if err != nil {
			return err
		}
		c.ClusterKey, c.ClusterAcceptedKeys = keys[0], keys[1:]
	}
	if o.adminTokenFile != "" {
		tokens, err := fromFile("admin-token-file", o.adminTokenFile, "admin-token", c.AdminToken)
		if err != nil {
			return err
		}
		if len(tokens) > 1 {
			return bad("admin-token-file", "%s holds %d tokens; put exactly one on its first line", o.adminTokenFile, len(tokens))
		}
		c.AdminToken = tokens[0]
	}
	for i, k := range append([]string{c.ClusterKey}, c.ClusterAcceptedKeys...) {
		if (k != "" || i > 0) && len(k) < 16 {
			what := "the cluster key"
			if i > 0 {
				what = fmt.Sprintf("key %d of %s (accepted during a rotation)", i+1, o.clusterKeyFile)
			}
			return bad("cluster-key", "%s is %d characters; use at least 16 random ones, e.g. openssl rand -hex 32", what, len(k))
		}
	}
	tlsSet := 0
	for _, f := range []struct{ flag, path string }{
		{"cluster-tls-cert", c.ClusterTLSCert}, {"cluster-tls-key", c.ClusterTLSKey}, {"cluster-tls-ca", c.ClusterTLSCA},
	} {
		if f.path == "" {
			continue
		}
		tlsSet++
		if _, err := os.Stat(f.path); err != nil {
			return bad(f.flag, "cannot read %s: %v; check the path and that the broker's user may read it", f.path, err)
		}
	}
	if tlsSet != 0 && tlsSet != 3 {
		return bad("cluster-tls-cert", "cluster TLS needs all of --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca")
	}
	if c.ClusterKey == "" && !o.insecureCluster {
		for _, a := range []struct{ flag, val string }{{"gossip-addr", c.GossipAddr}, {"cluster-addr", c.ClusterAddr}} {
			if !isLoopback(a.val) {
				return bad(a.flag, "%q is reachable from the network but no cluster key is set: anyone who reaches it could join the cluster, "+
					"rewrite its state or inject messages. Set --cluster-key-file (or --cluster-key) to a shared secret, e.g. "+
					"openssl rand -hex 32 > cluster.key, bind to 127.0.0.1, or accept the risk with --insecure-cluster", a.val)
			}
		}
	}
	return nil
}

// isLoopback reports whether a listen address binds only the loopback
// interface (an empty host or 0.0.0.0 binds every interface).
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// readSecretLines reads a key or token file: one secret per line, blank
// lines and lines starting with # ignored, surrounding space trimmed (a
// Secret created with echo has a trailing newline).
func readSecretLines(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %v; check the path and that the broker's user may read it", path, err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			out = append(out, line)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no secret (empty, or only comments); write the secret on its first line", path)
	}
	return out, nil
}

func checkAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("port %q is not a number between 0 and 65535", port)
	}
	return nil
}

// parseBytes reads a size: plain bytes, or with a KB, MB or GB suffix
// (powers of 1024). The protocol's largest packet is 256MB plus 5 bytes.
func parseBytes(s string) (uint32, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	mult := uint64(1)
	for _, u := range []struct {
		suffix string
		m      uint64
	}{{"KB", 1 << 10}, {"MB", 1 << 20}, {"GB", 1 << 30}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.m
			break
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("want a size such as 268435456 or 256MB")
	}
	n *= mult
	const protocolMax = 268435455 + 5
	if n > protocolMax {
		n = protocolMax
	}
	return uint32(n), nil
}

// parseDuration accepts Go durations (90s, 12h) and Mosquitto's d, w, m
// (months of 30 days) and y suffixes (14d, 2w, 1y). "0" means zero.
func parseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return 0, fmt.Errorf("must not be negative")
		}
		return d, nil
	}
	units := map[byte]time.Duration{'h': time.Hour, 'd': 24 * time.Hour, 'w': 7 * 24 * time.Hour, 'm': 30 * 24 * time.Hour, 'y': 365 * 24 * time.Hour}
	if len(s) >= 2 {
		if u, ok := units[s[len(s)-1]]; ok {
			if n, err := strconv.ParseUint(s[:len(s)-1], 10, 32); err == nil {
				return time.Duration(n) * u, nil
			}
		}
	}
	return 0, fmt.Errorf("want a duration such as 90s, 12h, 7d, 2w or 1y")
}
