package node

import (
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// sysValues collects the latest payload of every $SYS topic a client gets.
func sysValues(t *testing.T, c *testutil.Client, until func(map[string]string) error) map[string]string {
	t.Helper()
	got := map[string]string{}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if err := until(got); err == nil {
			return got
		} else if time.Now().After(deadline) {
			t.Fatalf("$SYS: %v (have %d topics)", err, len(got))
		}
		if p, err := c.Next(200 * time.Millisecond); err == nil {
			got[p.Topic] = string(p.Payload)
		}
	}
}

// TestSysTopicsWithMosquittoNames: each node publishes Mosquitto's $SYS
// names and formats for itself (uptime "N seconds", counters, load
// averages with two decimals) and $SYS/cluster/...; mochi's own names are
// gone; $SYS is neither forwarded to other nodes nor written to the log;
// its own updates are not counted as received messages.
func TestSysTopicsWithMosquittoNames(t *testing.T) {
	tc := newTunedCluster(t, func(c *Config) { c.SysInterval = 300 * time.Millisecond }, "n1", "n2")
	tc.waitReady()
	c := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "sys-watch", CleanStart: true, Buffer: 10000})
	c.Sub(t, 0, "$SYS/#")
	pub := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "sys-pub", CleanStart: true})
	for i := range 5 {
		pub.Pub(t, "sys/test", 1, false, []byte(fmt.Sprint(i)))
	}
	number := regexp.MustCompile(`^[0-9]+$`)
	load := regexp.MustCompile(`^[0-9]+\.[0-9]{2}$`)
	got := sysValues(t, c, func(got map[string]string) error {
		for topic, re := range map[string]*regexp.Regexp{
			"$SYS/broker/uptime":                      regexp.MustCompile(`^[0-9]+ seconds$`),
			"$SYS/broker/version":                     regexp.MustCompile(`^mqtt-ha broker version `),
			"$SYS/broker/clients/connected":           number,
			"$SYS/broker/clients/total":               number,
			"$SYS/broker/messages/received":           number,
			"$SYS/broker/publish/messages/received":   number,
			"$SYS/broker/bytes/received":              number,
			"$SYS/broker/retained messages/count":     number,
			"$SYS/broker/subscriptions/count":         number,
			"$SYS/broker/heap/current":                number,
			"$SYS/broker/load/messages/received/1min": load,
			"$SYS/broker/load/publish/received/15min": load,
			"$SYS/broker/load/bytes/sent/5min":        load,
			"$SYS/cluster/self":                       regexp.MustCompile(`^n2$`),
			"$SYS/cluster/nodes":                      regexp.MustCompile(`^2$`),
			"$SYS/cluster/leader":                     regexp.MustCompile(`^n[12]$`),
			"$SYS/cluster/sessions":                   number,
		} {
			if v, ok := got[topic]; !ok || !re.MatchString(v) {
				return fmt.Errorf("%s = %q (present %v), want %s", topic, v, ok, re)
			}
		}
		if n, _ := strconv.Atoi(got["$SYS/broker/publish/messages/received"]); n < 5 {
			return fmt.Errorf("publish/messages/received %d after 5 publishes", n)
		}
		return nil
	})
	// Idle now: the count stays put although $SYS updates go on.
	before := got["$SYS/broker/publish/messages/received"]
	uptime := got["$SYS/broker/uptime"]
	got = sysValues(t, c, func(g map[string]string) error {
		if g["$SYS/broker/uptime"] == "" || g["$SYS/broker/uptime"] == uptime || g["$SYS/broker/publish/messages/received"] == "" {
			return fmt.Errorf("waiting for a later update")
		}
		return nil
	})
	if after := got["$SYS/broker/publish/messages/received"]; after != before {
		t.Fatalf("publish/messages/received moved from %s to %s with no client publishing: $SYS counts itself", before, after)
	}
	for _, topic := range mochiOnlySys {
		if _, ok := got[topic]; ok {
			t.Fatalf("mochi's own %s is still published", topic)
		}
	}
	// Retained on this node for a new subscriber, not in the log.
	late := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "sys-late", CleanStart: true, Buffer: 1000})
	late.Sub(t, 0, "$SYS/cluster/self")
	if p := late.MustNext(t, 5*time.Second); string(p.Payload) != "n1" {
		t.Fatalf("n1 serves $SYS/cluster/self %q: another node's $SYS reached it", p.Payload)
	}
	// Live updates for a second (three intervals): n1's own only; n2's
	// would say n2.
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		if p, err := late.Next(100 * time.Millisecond); err == nil && string(p.Payload) != "n1" {
			t.Fatalf("n1 delivered %q on $SYS/cluster/self", p.Payload)
		}
	}
	if _, ok := tc.nodes["n1"].repl.RetainedMessage("$SYS/broker/uptime"); ok {
		t.Fatal("$SYS written to the replicated log")
	}
}

var mochiOnlySys = []string{"$SYS/broker/time", "$SYS/broker/started", "$SYS/broker/system/memory", "$SYS/broker/packets/received"}

// TestSysStoreSharedAndExpiredCounters: the three counters Mosquitto
// publishes that the cluster keeps in its own way: payload bytes of the
// retained and queued messages, this node's shared subscriptions, and the
// sessions this node's sweeps expired.
func TestSysStoreSharedAndExpiredCounters(t *testing.T) {
	tc := newTunedCluster(t, func(c *Config) { c.SysInterval = 300 * time.Millisecond }, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	tc.client("n1", "sysb-pub").Pub(t, "sysb/r", 1, true, []byte("abcde"))
	p := testutil.Connect(t, addr, testutil.ClientOptions{ID: "sysb-p", CleanStart: true, SessionExpiry: 2})
	p.Sub(t, 1, "sysb/q")
	p.Close()
	tc.awaitClosed(t, "sysb-p")
	tc.client("n1", "sysb-pub2").Pub(t, "sysb/q", 1, false, []byte("xyz"))
	tc.client("n1", "sysb-shared").Sub(t, 1, "$share/g/sysb/s")
	c := testutil.Connect(t, addr, testutil.ClientOptions{ID: "sysb-watch", CleanStart: true, Buffer: 10000})
	c.Sub(t, 0, "$SYS/#")
	want := func(w map[string]string) func(map[string]string) error {
		return func(got map[string]string) error {
			for topic, v := range w {
				if got[topic] != v {
					return fmt.Errorf("%s = %q, want %q", topic, got[topic], v)
				}
			}
			return nil
		}
	}
	sysValues(t, c, want(map[string]string{"$SYS/broker/store/messages/bytes": "8",
		"$SYS/broker/shared_subscriptions/count": "1", "$SYS/broker/clients/expired": "0"}))
	// The session expires 2 s after its disconnect, and its queue with it.
	sysValues(t, c, want(map[string]string{"$SYS/broker/store/messages/bytes": "5", "$SYS/broker/clients/expired": "1"}))
}
