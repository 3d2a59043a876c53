package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// brokerBin is the broker binary TestMain builds once (or CHAOS_BROKER_BIN).
var brokerBin string

const (
	readyTimeout = 45 * time.Second // process start to /readyz 200
	stopTimeout  = 20 * time.Second // SIGTERM to exit
)

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "broker-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos: temp dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if bin := os.Getenv("CHAOS_BROKER_BIN"); bin != "" {
		brokerBin = bin
		return m.Run()
	}
	brokerBin = filepath.Join(dir, "broker")
	args := []string{"build", "-o", brokerBin}
	if os.Getenv("CHAOS_RACE") == "1" {
		// The nodes under test run with the race detector (make test sets
		// it); a race in a node's output fails the campaign (crashRE).
		args = append(args, "-race", "-gcflags=all=-d=checkptr=0") // see replication/logstore.go
	}
	args = append(args, "github.com/mqtt-ha/broker/cmd/broker")
	if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "chaos: go %s: %v\n%s", strings.Join(args, " "), err, out)
		return 1
	}
	return m.Run()
}

// errStop, returned by a poll condition, ends the poll at once.
type errStop struct{ err error }

func (e errStop) Error() string { return e.err.Error() }
func (e errStop) Unwrap() error { return e.err }

// poll calls cond every 25ms until it returns nil, returns an errStop, or
// timeout passes; it returns the last error.
func poll(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		var stop errStop
		if errors.As(err, &stop) {
			return stop.err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not true after %s: %w", timeout, err)
		}
		<-tick.C
	}
}

func freeAddr() (string, error) { return testutil.FreeAddr() }

// lockedBuffer collects a process's output.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Node is one broker process. Its methods return errors instead of failing
// the test, so the fault injector can run in its own goroutine.
type Node struct {
	ID          string
	Bin         string // the broker binary; brokerBin when empty
	DataDir     string
	MQTTAddr    string
	HTTPAddr    string
	GossipAddr  string
	ClusterAddr string
	Join        []string
	// NetNS is the node's network namespace in the network lab ("": the
	// test's own, every address on 127.0.0.1); Advertise is the host its
	// peers reach it on.
	NetNS     string
	Advertise string

	log   *lockedBuffer
	httpc *http.Client

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	exit   int
	starts int
	paused bool
}

// newNode prepares node i (0-based) of a cluster: on free 127.0.0.1 ports,
// or, in a network lab, on fixed ports in the node's own namespace (MQTT
// and HTTP on its loopback, gossip and cluster on its lab address).
func newNode(id, dataDir string, lab *netLab, i int) (*Node, error) {
	n := &Node{ID: id, DataDir: dataDir, log: &lockedBuffer{}, Advertise: "127.0.0.1"}
	if lab != nil {
		ip := lab.nodeIP(i)
		n.NetNS, n.Advertise = lab.nodes[i], ip
		n.MQTTAddr, n.HTTPAddr = "127.0.0.1:1883", "127.0.0.1:8080"
		n.GossipAddr, n.ClusterAddr = ip+":7946", ip+":7947"
	} else {
		var err error
		for _, p := range []*string{&n.MQTTAddr, &n.HTTPAddr, &n.GossipAddr, &n.ClusterAddr} {
			if *p, err = freeAddr(); err != nil {
				return nil, err
			}
		}
	}
	n.httpc = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return n.dial(addr, 2*time.Second)
		},
		MaxIdleConnsPerHost: 2,
	}}
	return n, nil
}

// dial opens a TCP connection to addr as seen from the node's namespace.
func (n *Node) dial(addr string, timeout time.Duration) (net.Conn, error) {
	return dialNS(n.NetNS, addr, timeout)
}

func (n *Node) args() []string {
	level := os.Getenv("CHAOS_LOG_LEVEL")
	if level == "" {
		level = "info"
	}
	args := []string{"serve",
		"--node-id", n.ID,
		"--data-dir", n.DataDir,
		"--mqtt-addr", n.MQTTAddr,
		"--http-addr", n.HTTPAddr,
		"--gossip-addr", n.GossipAddr,
		"--cluster-addr", n.ClusterAddr,
		"--advertise-host", n.Advertise,
		"--bootstrap-expect", "3",
		"--join", strings.Join(n.Join, ","),
		// In a network lab gossip and cluster ports are on routable lab
		// addresses, where a node refuses to start without a key.
		"--cluster-key", "chaos-campaign-cluster-key",
		"--log-format", "json",
		"--log-level", level,
	}
	// CHAOS_BROKER_FLAGS: more flags for every node (say --read-lease).
	return append(args, strings.Fields(os.Getenv("CHAOS_BROKER_FLAGS"))...)
}

func brokerEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BROKER_") {
			env = append(env, kv)
		}
	}
	return env
}

// launch starts the process without waiting for readiness.
func (n *Node) launch() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil && !n.exitedLocked() {
		return fmt.Errorf("node %s is already running", n.ID)
	}
	n.starts++
	fmt.Fprintf(n.log, "=== start #%d at %s\n", n.starts, time.Now().Format(time.RFC3339Nano))
	bin := n.Bin
	if bin == "" {
		bin = brokerBin
	}
	cmd := exec.Command(bin, n.args()...)
	if n.NetNS != "" {
		// ip execs the broker in place: the pid (and process group) is
		// the broker's.
		cmd = exec.Command("ip", append([]string{"netns", "exec", n.NetNS, bin}, n.args()...)...)
	}
	cmd.Env = brokerEnv()
	cmd.Stdout, cmd.Stderr = n.log, n.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec %s: %w", bin, err)
	}
	done := make(chan struct{})
	n.cmd, n.done, n.paused = cmd, done, false
	start := n.starts
	go func() {
		err := cmd.Wait()
		code := cmd.ProcessState.ExitCode()
		if code == -1 {
			code = -int(cmd.ProcessState.Sys().(syscall.WaitStatus).Signal())
		}
		n.mu.Lock()
		n.exit = code
		n.mu.Unlock()
		fmt.Fprintf(n.log, "=== exit #%d at %s: %v (code %d)\n", start, time.Now().Format(time.RFC3339Nano), err, code)
		close(done)
	}()
	return nil
}

func (n *Node) exitedLocked() bool {
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

func (n *Node) exited() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil && n.exitedLocked()
}

func (n *Node) exitCode() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.exit
}

func (n *Node) httpGet(path string) (int, []byte, error) {
	resp, err := n.httpc.Get("http://" + n.HTTPAddr + path)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, fmt.Errorf("read %s: %w", path, err)
	}
	return resp.StatusCode, body, nil
}

// ready reports whether /readyz answers 200 now.
func (n *Node) ready() error {
	if n.exited() {
		return errStop{fmt.Errorf("node %s exited with code %d", n.ID, n.exitCode())}
	}
	code, body, err := n.httpGet("/readyz")
	if err != nil {
		return fmt.Errorf("node %s /readyz: %w", n.ID, err)
	}
	if code != http.StatusOK {
		return fmt.Errorf("node %s /readyz: %d %q", n.ID, code, strings.TrimSpace(string(body)))
	}
	return nil
}

func (n *Node) waitReady(timeout time.Duration) error {
	return poll(timeout, n.ready)
}

// raftView is the part of /api/cluster the campaign reads.
type raftView struct {
	AliveMembers int `json:"alive_members"`
	Raft         struct {
		State    string `json:"state"`
		LeaderID string `json:"leader_id"`
		Voters   []struct {
			ID string `json:"id"`
		} `json:"voters"`
	} `json:"raft"`
}

func (n *Node) view() (raftView, error) {
	var v raftView
	code, body, err := n.httpGet("/api/cluster")
	if err != nil {
		return v, err
	}
	if code != http.StatusOK {
		return v, fmt.Errorf("node %s /api/cluster: HTTP %d", n.ID, code)
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return v, fmt.Errorf("node %s /api/cluster: %w", n.ID, err)
	}
	return v, nil
}

func (n *Node) signal(sig syscall.Signal) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil || n.exitedLocked() {
		return fmt.Errorf("node %s: %v: not running", n.ID, sig)
	}
	if err := syscall.Kill(-n.cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("node %s: send %v: %w", n.ID, sig, err)
	}
	switch sig {
	case syscall.SIGSTOP:
		n.paused = true
		// kill returns once the signal is queued; a thread finishing a
		// system call stops only when it returns from it. Callers rely
		// on the node doing nothing more (publishes made "without a
		// quorum" right after pausing the leader), so wait until the
		// kernel reports every thread stopped.
		if err := waitStopped(n.cmd.Process.Pid, 5*time.Second); err != nil {
			return fmt.Errorf("node %s: %w", n.ID, err)
		}
	case syscall.SIGCONT:
		n.paused = false
	}
	return nil
}

// waitStopped waits until every thread of process pid is stopped (or
// gone), as /proc/pid/task/*/stat reports.
func waitStopped(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		running, err := runningThreads(pid)
		if err == nil && running == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d: %d thread(s) still running %v after SIGSTOP (%v)", pid, running, timeout, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// runningThreads counts the threads of pid that are neither stopped nor
// dead.
func runningThreads(pid int) (int, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	running := 0
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "stat"))
		if err != nil {
			continue // the thread exited meanwhile
		}
		// "pid (comm) S ...": the state follows the last ')'.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 || i+2 >= len(b) {
			return 0, fmt.Errorf("%s/%s/stat: %q", dir, t.Name(), b)
		}
		switch b[i+2] {
		case 'T', 't', 'Z', 'X':
		default:
			running++
		}
	}
	return running, nil
}

// wait waits for the current process to exit.
func (n *Node) wait(timeout time.Duration) error {
	n.mu.Lock()
	done := n.done
	n.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("node %s still running %s after it was asked to stop", n.ID, timeout)
	}
}

// kill sends SIGKILL to the process group and waits for the exit.
func (n *Node) kill() error {
	if err := n.signal(syscall.SIGKILL); err != nil {
		return err
	}
	return n.wait(stopTimeout)
}

// stop sends SIGTERM and requires a clean exit.
func (n *Node) stop() error {
	if err := n.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := n.wait(stopTimeout); err != nil {
		// A hung shutdown: SIGQUIT makes the Go runtime print every
		// goroutine's stack into the node's output, which the failure
		// shows.
		_ = n.signal(syscall.SIGQUIT)
		_ = n.wait(5 * time.Second)
		return err
	}
	if code := n.exitCode(); code != 0 {
		return fmt.Errorf("node %s: SIGTERM: exit status %d, want 0", n.ID, code)
	}
	return nil
}

// restartThen starts a stopped node on the same ports and data directory and
// waits for /readyz; a port of the previous run that is briefly unavailable
// makes the process exit, and it is started again. onLaunch (when not nil)
// is called once, right after the first process was started, without
// waiting for readiness.
func (n *Node) restartThen(onLaunch func()) error {
	return poll(readyTimeout, func() error {
		if err := n.launch(); err != nil {
			return errStop{err}
		}
		if onLaunch != nil {
			onLaunch()
			onLaunch = nil
		}
		err := n.waitReady(readyTimeout)
		if err != nil && n.exited() && strings.Contains(n.log.String(), "address already in use") {
			return err
		}
		if err != nil {
			return errStop{fmt.Errorf("restart %s: %w", n.ID, err)}
		}
		return nil
	})
}

// shutdown kills a node left running (continuing it first if paused).
func (n *Node) shutdown() {
	n.mu.Lock()
	running := n.cmd != nil && !n.exitedLocked()
	n.mu.Unlock()
	if running {
		_ = n.signal(syscall.SIGCONT)
		_ = n.kill()
	}
}

// crashRE finds what the Go runtime prints on a panic or fatal error.
var crashRE = regexp.MustCompile(`(?m)^(panic: |fatal error: |WARNING: DATA RACE).*`)

// cluster is three nodes started together.
type cluster struct {
	nodes []*Node
	lab   *netLab // nil: every node on 127.0.0.1
}

// startClusterLab starts n nodes running bin (brokerBin when empty), each
// in its own namespace of lab, or all on 127.0.0.1 when lab is nil.
func startClusterLab(t *testing.T, bin string, n int, lab *netLab) *cluster {
	t.Helper()
	// A port picked as free can be taken by another process before the node
	// binds it; the node then exits with "address already in use", and the
	// whole cluster is started again on new ports (every join list names
	// every node's gossip address).
	for attempt := 1; ; attempt++ {
		c, err := tryStartCluster(t, bin, n, lab)
		if err == nil {
			return c
		}
		portTaken := false
		for _, node := range c.nodes {
			if node.exited() && strings.Contains(node.log.String(), "address already in use") {
				portTaken = true
			}
		}
		if !portTaken || attempt == 3 {
			t.Fatalf("cluster did not form: %v", err)
		}
		t.Logf("a port was taken before a node bound it; starting the cluster again (%v)", err)
		for _, node := range c.nodes {
			node.shutdown()
		}
	}
}

func tryStartCluster(t *testing.T, bin string, n int, lab *netLab) (*cluster, error) {
	t.Helper()
	c := &cluster{lab: lab}
	var gossip []string
	for i := 1; i <= n; i++ {
		node, err := newNode(fmt.Sprintf("node%d", i), t.TempDir(), lab, i-1)
		if err != nil {
			t.Fatal(err)
		}
		node.Bin = bin
		c.nodes = append(c.nodes, node)
		gossip = append(gossip, node.GossipAddr)
	}
	t.Cleanup(func() {
		for _, node := range c.nodes {
			node.shutdown()
			if m := crashRE.FindString(node.log.String()); m != "" {
				t.Errorf("node %s crashed: its output contains %q", node.ID, m)
			}
			if t.Failed() || os.Getenv("CHAOS_NODE_LOGS") == "1" {
				t.Logf("node %s output:\n%s", node.ID, tail(node.log.String(), 200))
			}
			if dir := os.Getenv("CHAOS_NODE_LOG_DIR"); dir != "" {
				// The whole output (a hung node's goroutine dump is long).
				path := filepath.Join(dir, node.ID+".log")
				err := os.MkdirAll(dir, 0o755)
				if err == nil {
					err = os.WriteFile(path, []byte(node.log.String()), 0o644)
				}
				if err != nil {
					t.Errorf("node log: %v", err)
				} else {
					t.Logf("node %s output: %s", node.ID, path)
				}
			}
		}
	})
	for _, node := range c.nodes {
		node.Join = gossip
		if err := node.launch(); err != nil {
			t.Fatal(err)
		}
	}
	// Give up early when a node already died: the caller may retry.
	err := poll(60*time.Second, func() error {
		for _, node := range c.nodes {
			if node.exited() {
				return errStop{fmt.Errorf("node %s exited during start", node.ID)}
			}
		}
		return c.waitHealthy(0)
	})
	return c, err
}

// waitHealthy waits until every node is ready and sees the same leader
// among all voters and every member alive.
func (c *cluster) waitHealthy(timeout time.Duration) error {
	return poll(timeout, func() error {
		leader := ""
		for _, n := range c.nodes {
			if err := n.ready(); err != nil {
				return err
			}
			v, err := n.view()
			if err != nil {
				return err
			}
			if len(v.Raft.Voters) != len(c.nodes) || v.Raft.LeaderID == "" || v.AliveMembers != len(c.nodes) {
				return fmt.Errorf("%s: leader %q, %d voters, %d alive", n.ID, v.Raft.LeaderID, len(v.Raft.Voters), v.AliveMembers)
			}
			if leader != "" && v.Raft.LeaderID != leader {
				return fmt.Errorf("%s sees leader %q, another node %q", n.ID, v.Raft.LeaderID, leader)
			}
			leader = v.Raft.LeaderID
		}
		return nil
	})
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = append([]string{fmt.Sprintf("... (%d lines omitted)", len(parts)-lines)}, parts[len(parts)-lines:]...)
	}
	return strings.Join(parts, "\n")
}

// connectNode dials node n (inside its namespace, if any) and completes an
// MQTT 5 CONNECT: testutil.TryConnect over a connection the campaign opens.
func connectNode(n *Node, o testutil.ClientOptions) (*testutil.Client, error) {
	return connectNodeOpts(n, connectOptions{ClientOptions: o})
}

// connectOptions are testutil's client options plus the keep-alive (a
// short one makes paho notice a paused node: no PINGRESP).
type connectOptions struct {
	testutil.ClientOptions
	KeepAlive uint16 // seconds; 0: 30
}

// connectNodeOpts is connectNode with the session settings: session
// expiry, a will (MQTT 5 will properties, no delay) and the client-side
// session state carried over from an earlier connection (paho's in-flight
// QoS 2 ids, so a resent QoS 2 message is not delivered twice).
func connectNodeOpts(n *Node, o connectOptions) (*testutil.Client, error) {
	conn, err := n.dial(n.MQTTAddr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if o.Buffer == 0 {
		o.Buffer = 1000
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = 30
	}
	c := &testutil.Client{ID: o.ID, Conn: conn, Msgs: make(chan *paho.Publish, o.Buffer), Disconnects: make(chan *paho.Disconnect, 4)}
	cfg := paho.ClientConfig{
		ClientID: o.ID,
		Conn:     packets.NewThreadSafeConn(conn),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			c.Msgs <- pr.Packet
			return true, nil
		}},
		OnServerDisconnect: func(d *paho.Disconnect) {
			select {
			case c.Disconnects <- d:
			default:
			}
		},
		OnClientError: func(error) {},
		PacketTimeout: 2 * probeTimeout, // each call's own deadline decides
	}
	if o.Session != nil {
		cfg.Session = o.Session
	}
	c.Client = paho.NewClient(cfg)
	cp := &paho.Connect{ClientID: o.ID, KeepAlive: o.KeepAlive, CleanStart: o.CleanStart}
	if o.SessionExpiry > 0 {
		se := o.SessionExpiry
		cp.Properties = &paho.ConnectProperties{SessionExpiryInterval: &se}
	}
	if o.Will != nil {
		cp.WillMessage, cp.WillProperties = o.Will, &paho.WillProperties{}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	c.Connack = ca
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("CONNECT: %w", err)
	}
	return c, nil
}
