package chaos

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestNetLab checks the network lab on its own, without brokers: stale
// namespaces of a dead run are removed and live ones kept, nodes reach each
// other over the bridge, a cut silently drops their traffic (a timeout, not
// a refusal), a heal restores it, nothing is added to the test's own
// namespace, and every namespace is gone after the test.
func TestNetLab(t *testing.T) {
	if reason := netnsUnavailable(); reason != "" {
		t.Skipf("network lab unavailable: %s", reason)
	}
	// A namespace named after a process that has exited is stale.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	stale := fmt.Sprintf("chaos-%d-0-n1", dead.Process.Pid)
	if err := ipCmd("netns", "add", stale); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ipCmd("netns", "del", stale) })

	var lab *netLab
	t.Cleanup(func() { // runs last: after the lab's own cleanup
		if lab == nil {
			return
		}
		out, _ := exec.Command("ip", "netns", "list").Output()
		for _, ns := range append(lab.nodes, lab.bridge) {
			if strings.Contains(string(out), ns) {
				t.Errorf("namespace %s left after the test:\n%s", ns, out)
			}
		}
	})
	var err error
	if lab, err = newNetLab(t, 2); err != nil {
		t.Fatal(err)
	}
	removed := removeStaleNamespaces()
	if len(removed) != 1 || removed[0] != stale {
		t.Errorf("removed %v, want only %s (the lab belongs to a live process)", removed, stale)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), stale) || !strings.Contains(string(out), lab.nodes[0]) {
		t.Errorf("after removing stale namespaces:\n%s", out)
	}

	// Nothing of the lab in the test's own namespace: no lab address, no
	// bridge or veth of the lab. (Whether a dial from here reaches the lab
	// address is no test: a sandbox's default route may accept any TCP
	// connection.)
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if strings.HasPrefix(a.String(), labNet+".") {
			t.Errorf("the test's namespace has lab address %s", a)
		}
	}
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		if i.Name == "br0" || i.Name == lab.port(0) || i.Name == lab.port(1) {
			t.Errorf("the test's namespace has the lab's interface %s", i.Name)
		}
	}

	// node2 listens on its lab address; node1 dials it.
	addr := lab.nodeIP(1) + ":7000"
	var ln net.Listener
	if err := inNS(lab.nodes[1], func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	reach := func(timeout time.Duration) error {
		c, err := dialNS(lab.nodes[0], addr, timeout)
		if err == nil {
			_ = c.Close()
		}
		return err
	}
	if err := poll(5*time.Second, func() error { return reach(time.Second) }); err != nil {
		t.Fatalf("node1 cannot reach node2 over the bridge: %v", err)
	}

	if err := lab.cut(1); err != nil {
		t.Fatal(err)
	}
	err = reach(500 * time.Millisecond)
	var ne net.Error
	if err == nil || !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("through a cut, dial = %v; want a timeout (frames dropped silently)", err)
	}
	if err := lab.heal(1); err != nil {
		t.Fatal(err)
	}
	if err := poll(5*time.Second, func() error { return reach(time.Second) }); err != nil {
		t.Fatalf("after the heal node1 cannot reach node2: %v", err)
	}
	t.Logf("lab %s: cut and heal by %s", strings.Join(lab.nodes, ", "), lab.method())
}
