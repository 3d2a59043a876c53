package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// Large durable messages (issue 15): payloads over the blob threshold are
// written to the log as chunked blobs before the entry that queues or
// retains them (replication/blob.go).

// bigPayload is n pseudo-random bytes (incompressible, no line structure).
func bigPayload(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

// leaderAndOthers returns the raft leader and the two other nodes.
func leaderAndOthers(t *testing.T, nodes []*Broker) (*Broker, []*Broker) {
	t.Helper()
	var lead *Broker
	eventually(t, 15*time.Second, func() error {
		v, err := nodes[0].raftView()
		if err != nil {
			return err
		}
		for _, b := range nodes {
			if b.ID == v.LeaderID {
				lead = b
				return nil
			}
		}
		return fmt.Errorf("leader %q is not a node", v.LeaderID)
	})
	var others []*Broker
	for _, b := range nodes {
		if b != lead {
			others = append(others, b)
		}
	}
	return lead, others
}

// rssWatch samples the brokers' resident memory until stopped and
// reports each node's peak.
type rssWatch struct {
	mu   sync.Mutex
	peak map[string]int64
	stop chan struct{}
	done chan struct{}
}

func watchRSS(nodes []*Broker) *rssWatch {
	w := &rssWatch{peak: map[string]int64{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			for _, b := range nodes {
				if rss, err := b.RSS(); err == nil {
					w.mu.Lock()
					w.peak[b.ID] = max(w.peak[b.ID], rss)
					w.mu.Unlock()
				}
			}
			select {
			case <-w.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *rssWatch) finish() map[string]int64 {
	close(w.stop)
	<-w.done
	return w.peak
}

// publishUntilAcked publishes like a client that resends until its
// message is acknowledged (a refusal or a dropped connection during the
// leader's death: connect again and resend), on nodes in turn.
func publishUntilAcked(t *testing.T, nodes []*Broker, id, topic string, retain bool, payload []byte) (int, error) {
	deadline := time.Now().Add(3 * time.Minute)
	for attempt := 1; ; attempt++ {
		if attempt > 1 {
			time.Sleep(200 * time.Millisecond) // a client's reconnect delay
		}
		b := nodes[(attempt-1)%len(nodes)]
		err := func() error {
			c, err := testutil.TryConnect(b.MQTTAddr, testutil.ClientOptions{ID: id, CleanStart: true, PacketTimeout: 90 * time.Second})
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			pr, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Retain: retain, Payload: payload})
			if err != nil {
				return err
			}
			if pr.ReasonCode >= 0x80 {
				return fmt.Errorf("reason code 0x%02x", pr.ReasonCode)
			}
			return nil
		}()
		if err == nil {
			return attempt, nil
		}
		if time.Now().After(deadline) || attempt == 20 {
			return attempt, fmt.Errorf("%d-byte message never acknowledged: %w", len(payload), err)
		}
		t.Logf("publish attempt %d on %s: %v; sending again", attempt, b.ID, err)
	}
}

// receiveWhole waits for a message on c and checks it is payload, byte
// for byte (reporting sizes and hashes, not megabytes of bytes).
func receiveWhole(t *testing.T, c *testutil.Client, topic string, payload []byte, timeout time.Duration) *paho.Publish {
	t.Helper()
	p, err := c.Next(timeout)
	if err != nil {
		t.Fatalf("%s: no %d-byte message on %s: %v", c.ID, len(payload), topic, err)
	}
	if p.Topic != topic || !bytes.Equal(p.Payload, payload) {
		t.Fatalf("%s: got %d bytes (sha256 %x) on %s, want %d bytes (sha256 %x) on %s", c.ID, len(p.Payload),
			sha256.Sum256(p.Payload), p.Topic, len(payload), sha256.Sum256(payload), topic)
	}
	return p
}

// largeSize is the size of the large message: 50 MB, or just under the
// 256 MB MQTT limit with E2E_HUGE=1 (make large; about 3 GB of disk and
// a minute or two).
func largeSize() int {
	if os.Getenv("E2E_HUGE") == "1" {
		return 256<<20 - 4096
	}
	return 50<<20 + 13
}

// TestLargeDurableMessageThroughLeaderAndSubscriberLoss: 3 MB
// (mosquitto_pub -f, MQTT 3.1.1) and 50 MB (paho, MQTT 5; 256 MB with
// make large) QoS 1 messages reach a persistent subscriber on another node
// intact, the large one published while the leader is SIGKILLed
// mid-transfer and delivered after the subscriber's own node is SIGKILLed
// too; every node's RSS stays under a bound while they are replicated,
// queued and delivered.
func TestLargeDurableMessageThroughLeaderAndSubscriberLoss(t *testing.T) {
	t.Parallel()
	nodes := startVotersBin(t, 3, plainBin(t))
	lead, others := leaderAndOthers(t, nodes)
	pubNode, subNode := others[0], others[1]
	const subID = "large-sub"
	sub := testutil.Connect(t, subNode.MQTTAddr, testutil.ClientOptions{ID: subID, CleanStart: true, SessionExpiry: 3600, Buffer: 8})
	sub.Sub(t, 1, "big/#")
	sub.Close() // offline: the messages are queued in the log

	watch := watchRSS(nodes)
	small := bigPayload(3<<20+11, 1)
	file := t.TempDir() + "/3mb"
	if err := os.WriteFile(file, small, 0o600); err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, pubNode.pub(t, "-q", "1", "-t", "big/small", "-f", file, "-i", "large-pub-311"))

	large := bigPayload(largeSize(), 2)
	before := subNode.mustMetric(t, "broker_replication_applied_entries_total")
	var attempts int
	var perr error
	acked := make(chan struct{})
	go func() {
		defer close(acked)
		attempts, perr = publishUntilAcked(t, []*Broker{pubNode, subNode}, "large-pub-5", "big/large", false, large)
	}()
	// SIGKILL the leader once the transfer is under way: a few chunks
	// (each its own entry) are applied on the publisher's node.
	slowest := time.Duration(0)
	eventually(t, time.Minute, func() error {
		start := time.Now()
		n, err := subNode.Metric("broker_replication_applied_entries_total")
		slowest = max(slowest, time.Since(start))
		if err != nil {
			return err
		}
		if n < before+8 {
			return fmt.Errorf("%v entries applied since the publish began", n-before)
		}
		return nil
	})
	t.Logf("slowest /metrics scrape during the upload: %v", slowest)
	lead.Kill()
	select {
	case <-acked:
	case <-time.After(5 * time.Minute):
		t.Fatal("publisher still trying after 5 minutes")
	}
	if perr != nil {
		t.Fatal(perr)
	}
	if err := lead.launch(); err != nil {
		t.Fatal(err)
	}
	if err := lead.waitReady(); err != nil {
		t.Fatal(err)
	}
	subNode.Kill()

	resumed := testutil.Connect(t, lead.MQTTAddr, testutil.ClientOptions{ID: subID, CleanStart: false, SessionExpiry: 3600, Buffer: 8})
	if !resumed.Connack.SessionPresent {
		t.Fatal("session not present after its node died")
	}
	receiveWhole(t, resumed, "big/small", small, time.Minute)
	receiveWhole(t, resumed, "big/large", large, 2*time.Minute)
	peaks := watch.finish()
	// QoS 1 allows a duplicate of a resent message, nothing else.
	if p, err := resumed.Next(2 * time.Second); err == nil {
		if p.Topic != "big/large" || !bytes.Equal(p.Payload, large) || attempts == 1 {
			t.Fatalf("unexpected further message: %d bytes on %s (publish attempts %d)", len(p.Payload), p.Topic, attempts)
		}
	}
	// Every node holds the payloads on disk, not in memory: the bound is
	// the publishing node's copy of the PUBLISH and of its chunks in
	// flight, or the delivering node's read of the payload and mochi's
	// encoding of the packet, well below what queued payloads in memory
	// would cost (53 MB on every node, plus the log's copies).
	bound := int64(150<<20 + 5*len(large))
	for id, rss := range peaks {
		t.Logf("peak RSS %s: %d MiB with a %d MiB message (publish attempts %d)", id, rss>>20, len(large)>>20, attempts)
		if rss > bound {
			t.Errorf("node %s peaked at %d MiB RSS, bound %d MiB", id, rss>>20, bound>>20)
		}
	}
}

// TestLargeRetainedSurvivesFullRestart: a 50 MB retained message (MQTT
// 3.1.1, mosquitto_pub -f -r) is served by every node after every node
// was SIGKILLed and started again.
func TestLargeRetainedSurvivesFullRestart(t *testing.T) {
	t.Parallel()
	nodes := startVotersBin(t, 3, plainBin(t))
	payload := bigPayload(50<<20+5, 3)
	file := t.TempDir() + "/50mb"
	if err := os.WriteFile(file, payload, 0o600); err != nil {
		t.Fatal(err)
	}
	r := runCmd(t, 2*time.Minute, nil, "", lookPath(t, "mosquitto_pub"),
		append(nodes[1].hostArgs(), "-q", "1", "-r", "-t", "big/retained", "-f", file)...)
	mustSucceed(t, r)
	killAndRestartAll(t, nodes)
	for i, b := range nodes {
		c := testutil.Connect(t, b.MQTTAddr, testutil.ClientOptions{ID: "large-retained-" + strconv.Itoa(i), CleanStart: true, Buffer: 4})
		c.Sub(t, 1, "big/#")
		p := receiveWhole(t, c, "big/retained", payload, time.Minute)
		if !p.Retain {
			t.Fatalf("%s: retained message without the retain flag", b.ID)
		}
	}
}
