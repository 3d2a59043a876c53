package e2e

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestCleanWillOfPausedNodeOnce: a clean session with a will on node 2;
// node 2 is paused (SIGSTOP) until the others declare it dead and the
// leader publishes the will from the log; the client goes away; node 2
// resumes (SIGCONT) and finds the connection gone. The will must not be published a second
// time: node 2's mochi used to publish its own copy as soon as it noticed
// the dead connection, before raft told it the will was already claimed.
func TestCleanWillOfPausedNodeOnce(t *testing.T) {
	t.Parallel()
	nodes := startVoters(t, 3)
	n1, n2 := nodes[0], nodes[1]
	watcher := testutil.Connect(t, n1.MQTTAddr, testutil.ClientOptions{ID: "pz-watcher", CleanStart: true, Buffer: 100})
	watcher.Sub(t, 1, "pz/+/status", "marker")
	dev := launchSub(t, n2.hostArgs(), "-i", "pz-clean", "-t", "pz/cmd",
		"--will-topic", "pz/pz-clean/status", "--will-payload", "offline", "--will-qos", "1")
	eventually(t, 10*time.Second, func() error {
		ss, err := n1.sessions()
		if err != nil {
			return err
		}
		if s, ok := ss["pz-clean"]; !ok || !s.HasWill || s.State != "connected" {
			return fmt.Errorf("pz-clean: %+v", s)
		}
		return nil
	})
	n2.Signal(syscall.SIGSTOP)
	resumed := false
	defer func() {
		if !resumed {
			n2.Signal(syscall.SIGCONT)
		}
	}()
	wills := 0
	if p, err := watcher.Next(30 * time.Second); err != nil || p.Topic != "pz/pz-clean/status" {
		t.Fatalf("will of the paused node's client: %v %v", p, err)
	}
	wills++
	// The client goes away while its node is paused: node 2 finds the
	// connection closed the moment it runs again, while raft is still
	// telling it what happened meanwhile.
	_ = dev.cmd.Process.Kill()
	<-dev.done
	n2.Signal(syscall.SIGCONT)
	resumed = true
	eventually(t, 30*time.Second, func() error {
		if n, err := n2.Metric("broker_mqtt_connections"); err != nil || n != 0 {
			return fmt.Errorf("node 2 still counts %v connections (%v)", n, err)
		}
		ss, err := n2.sessions()
		if err != nil {
			return err
		}
		if s, ok := ss["pz-clean"]; ok && (s.HasWill || s.State == "connected") {
			return fmt.Errorf("node 2 has not caught up: %+v", s)
		}
		return nil
	})
	n1.mustPub(t, "-q", "1", "-t", "marker", "-m", "end")
	for {
		p := watcher.MustNext(t, 15*time.Second)
		if p.Topic == "marker" {
			break
		}
		wills++
	}
	if wills != 1 {
		t.Fatalf("the will was published %d times", wills)
	}
}
