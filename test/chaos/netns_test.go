package chaos

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The network lab: for partitions every broker node runs in its own Linux
// network namespace (chaos-<pid>-nN, address 10.99.0.N/24 on eth0), whose
// eth0 is one end of a veth pair; the other ends are ports vN of bridge br0
// in a namespace of its own (chaos-<pid>-br). No interface, address, route
// or rule is ever added to the test's own namespace: node-to-node traffic
// (gossip, raft, forwarding) stays inside the lab. The test reaches a node's
// MQTT and HTTP listeners on 127.0.0.1 inside that node's namespace by
// opening the socket from a thread switched into it for the call (setns; a
// socket stays in the namespace it was created in). So a partition cuts a node off from
// the other nodes only, never from its clients, which is what guarantee 5
// is about: clients of the minority side are still served.
//
// A partition drops every frame to and from the node's bridge port with an
// nftables rule in the bridge's namespace (silent, like a real network
// fault: no reset, no unreachable). Without nft it takes the bridge port
// down instead.

const labNet = "10.99.0" // node N is 10.99.0.N; exists only in the lab's namespaces

// netnsRoot is where `ip netns add` mounts named namespaces.
const netnsRoot = "/run/netns/"

var netnsProbe struct {
	once   sync.Once
	reason string
}

// netnsUnavailable reports why the lab cannot be built here ("" when it
// can): not root, no ip, no setns for this architecture, or `ip netns add`
// and `ip netns exec` do not work. It probes once per process; it also
// removes namespaces left by an earlier run that crashed.
func netnsUnavailable() string {
	netnsProbe.once.Do(func() {
		netnsProbe.reason = probeNetns()
	})
	return netnsProbe.reason
}

func probeNetns() string {
	if v := os.Getenv("CHAOS_NETNS"); v == "0" {
		return "CHAOS_NETNS=0"
	}
	if os.Geteuid() != 0 {
		return "not running as root"
	}
	if sysSetns == 0 {
		return "setns system call number unknown on " + runtime.GOARCH
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return "ip (iproute2) not installed"
	}
	removeStaleNamespaces()
	ns := fmt.Sprintf("chaos-%d-probe", os.Getpid())
	if err := ipCmd("netns", "add", ns); err != nil {
		return err.Error()
	}
	defer func() { _ = ipCmd("netns", "del", ns) }()
	if err := ipCmd("netns", "exec", ns, "ip", "link", "set", "lo", "up"); err != nil {
		return err.Error()
	}
	c, err := dialNS(ns, "127.0.0.1:9", time.Second) // nothing listens: refused is the answer
	if err == nil {
		_ = c.Close()
		return "a dial inside the probe namespace reached a listener; setns did not switch namespaces"
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return "dial inside a namespace: " + err.Error()
	}
	return ""
}

// ipCmd runs ip with args; the error carries its output.
func ipCmd(args ...string) error {
	return runCmd("", "ip", args...)
}

func runCmd(stdin, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

var labNSRE = regexp.MustCompile(`^chaos-(\d+)-\S+`)

// removeStaleNamespaces deletes chaos-<pid>-* namespaces whose test process
// is gone (a run killed before its cleanup). Namespaces of a live process
// (a concurrent run) are left alone.
func removeStaleNamespaces() []string {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return nil
	}
	var removed []string
	for _, line := range strings.Split(string(out), "\n") {
		m := labNSRE.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		if ipCmd("netns", "del", m[0]) == nil {
			removed = append(removed, m[0])
		}
	}
	return removed
}

// netLab is the set of namespaces of one cluster.
type netLab struct {
	bridge string   // namespace holding br0
	nodes  []string // namespace of node i (0-based)
	nft    bool     // cut with nftables (else: bridge port down)
}

// newNetLab builds the namespaces for n nodes; t.Cleanup removes them, and
// so does the next run's probe if this process dies first.
func newNetLab(t *testing.T, n int) (*netLab, error) {
	t.Helper()
	prefix := fmt.Sprintf("chaos-%d-%d", os.Getpid(), labSeq.Add(1))
	l := &netLab{bridge: prefix + "-br"}
	_, err := exec.LookPath("nft")
	l.nft = err == nil
	t.Cleanup(l.close)
	steps := [][]string{
		{"netns", "add", l.bridge},
		{"-n", l.bridge, "link", "set", "lo", "up"},
		{"-n", l.bridge, "link", "add", "br0", "type", "bridge"},
		{"-n", l.bridge, "link", "set", "br0", "up"},
	}
	for i := 0; i < n; i++ {
		ns := fmt.Sprintf("%s-n%d", prefix, i+1)
		l.nodes = append(l.nodes, ns)
		port := fmt.Sprintf("v%d", i+1)
		steps = append(steps,
			[]string{"netns", "add", ns},
			[]string{"-n", ns, "link", "set", "lo", "up"},
			[]string{"-n", l.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns},
			[]string{"-n", l.bridge, "link", "set", port, "master", "br0", "up"},
			[]string{"-n", ns, "addr", "add", l.nodeIP(i) + "/24", "dev", "eth0"},
			[]string{"-n", ns, "link", "set", "eth0", "up"},
		)
	}
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// labSeq numbers the labs of one process (each cluster gets its own).
var labSeq atomic.Int64

func (l *netLab) close() {
	// Deleting a node's namespace destroys its veth pair.
	for _, ns := range append(append([]string(nil), l.nodes...), l.bridge) {
		_ = ipCmd("netns", "del", ns)
	}
}

func (l *netLab) nodeIP(i int) string { return fmt.Sprintf("%s.%d", labNet, i+1) }

func (l *netLab) port(i int) string { return fmt.Sprintf("v%d", i+1) }

// method names how partitions are cut, for the summary.
func (l *netLab) method() string {
	if l.nft {
		return "nftables drop on the bridge"
	}
	return "bridge port down (nft not installed)"
}

// cut isolates node i from every other node: frames to and from its
// bridge port are dropped.
func (l *netLab) cut(i int) error {
	if !l.nft {
		return ipCmd("-n", l.bridge, "link", "set", l.port(i), "down")
	}
	rules := fmt.Sprintf(`table bridge chaos_%[1]s {
	chain cut {
		type filter hook forward priority 0; policy accept;
		iifname "%[1]s" drop
		oifname "%[1]s" drop
	}
}
`, l.port(i))
	return runCmd(rules, "ip", "netns", "exec", l.bridge, "nft", "-f", "-")
}

// heal undoes cut.
func (l *netLab) heal(i int) error {
	if !l.nft {
		return ipCmd("-n", l.bridge, "link", "set", l.port(i), "up")
	}
	return runCmd("", "ip", "netns", "exec", l.bridge, "nft", "delete", "table", "bridge", "chaos_"+l.port(i))
}

// inNS runs fn on a thread switched into the named network namespace, so
// that the sockets fn creates belong to it (a socket stays in the namespace
// it was created in). The thread is switched back before it is released.
// It must not simply be left to die locked: a child process started from
// that thread (the runtime forks on whichever thread runs the goroutine)
// gets Pdeathsig when the thread exits, which would SIGKILL a broker node.
// Only if switching back fails is the thread discarded.
func inNS(ns string, fn func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(netnsRoot + ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- err
			return
		}
		errno := setns(target)
		_ = target.Close()
		if errno != 0 {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("setns %s: %w", ns, errno)
			return
		}
		err = fn()
		if setns(orig) == 0 {
			runtime.UnlockOSThread()
		} // else: stay locked; the runtime discards the thread
		ch <- err
	}()
	return <-ch
}

func setns(f *os.File) syscall.Errno {
	_, _, errno := syscall.RawSyscall(sysSetns, f.Fd(), syscall.CLONE_NEWNET, 0)
	return errno
}

// dialNS opens a TCP connection to addr from inside the named network
// namespace ("": the test's own).
func dialNS(ns, addr string, timeout time.Duration) (net.Conn, error) {
	if ns == "" {
		return net.DialTimeout("tcp", addr, timeout)
	}
	var c net.Conn
	err := inNS(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return c, err
}
