package chaos

import (
	"context"
	"fmt"
	"math/rand"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// Availability topics (guarantees 2 and 4 together): clean-session
// clients with a retained will "offline" and a retained "online" on the
// same topic (availClient). When such a client's will is due (its node
// was killed, or it dropped its connection), every node must serve its
// "offline" as the retained value once things settle; a fresh subscriber
// reads chaos/avail/# on every node after each heal, after the drain and
// after the full restart (KindAvailRead), and the checker judges each
// reading (retained-will-missing).

const (
	availPrefix  = "chaos/avail/"
	availOnline  = "online"
	availOffline = "offline"
	availClients = 10 // at most this many availability clients per campaign
	// dropByClient ends a connection the client closed without
	// DISCONNECT: its will is due.
	dropByClient = "dropped by the client (no DISCONNECT)"
	// graceReconnect: a client whose node stopped gracefully (DISCONNECT
	// 0x8B) and that connected again within this must not have its will
	// published (the broker's leave grace is 30 s).
	graceReconnect = 20 * time.Second
)

// Op kinds of the availability workload.
const (
	KindAvailOnline = "avail-online" // the retained "online" publish after CONNACK
	KindAvailRead   = "avail-read"   // a fresh subscriber's retained chaos/avail/# on Node (Values; Value: when)
)

// availSpawner starts an availability client every 2-4 s until ctx ends,
// at most availClients.
func (cp *campaign) availSpawner(ctx, stay context.Context, wg *sync.WaitGroup, rng *rand.Rand) {
	for k := 1; k <= availClients && pace(ctx, time.Duration(2000+rng.Intn(2000))*time.Millisecond); k++ {
		id := fmt.Sprintf("avail%d", k)
		crng := rand.New(rand.NewSource(rng.Int63()))
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.availClient(ctx, stay, id, crng)
		}()
	}
}

// availK is the connection number k of an "online|offline <id>:<k>"
// payload (0: not one).
func availK(payload string) int {
	i := strings.LastIndexByte(payload, ':')
	if i < 0 {
		return 0
	}
	k, _ := strconv.Atoi(payload[i+1:])
	return k
}

// availDue lists, as of t, the availability topics whose client's latest
// connection ended with its will due (killed with its node, or dropped by
// the client, the will armed before): topic -> that connection. Only ops
// that ended and faults that began before t count.
func availDue(ops []Op, faults []faultEvent, t time.Time) map[string]*willConn {
	var before []Op
	for _, o := range ops {
		if o.End.Before(t) && strings.HasPrefix(o.Topic, availPrefix) {
			before = append(before, o)
		}
	}
	var fs []faultEvent
	for _, f := range faults {
		if f.Start.Before(t) {
			fs = append(fs, f)
		}
	}
	latest := map[string]*willConn{}
	for _, c := range classifyWills(before, fs) {
		if l := latest[c.connect.Topic]; l == nil || availK(c.connect.Value) > availK(l.connect.Value) {
			latest[c.connect.Topic] = c
		}
	}
	due := map[string]*willConn{}
	for topic, c := range latest {
		if c.fate == willExpected && c.end != nil {
			due[topic] = c
		}
	}
	return due
}

// availServedOK: a node serving served on a due connection's topic is
// right when it is that connection's will, or anything from a later
// connection of the client.
func availServedOK(c *willConn, served string) bool {
	return served == c.connect.Value || availK(served) > availK(c.connect.Value)
}

// availBad lists what the readings get wrong against due.
func availBad(due map[string]*willConn, reads []Op) []string {
	var bad []string
	for _, topic := range sortedKeys(due) {
		for _, r := range reads {
			if v := r.Values[topic]; !availServedOK(due[topic], v) {
				bad = append(bad, fmt.Sprintf("%s serves %q on %s, want %q", r.Node, v, topic, due[topic].connect.Value))
			}
		}
	}
	return bad
}

// availRead reads chaos/avail/# on every node with fresh subscribers until
// every due will is served everywhere or settleTimeout passes, and records
// the last complete reading (one KindAvailRead per node). when says which
// point of the campaign it is.
func (cp *campaign) availRead(when string) {
	start := time.Now()
	var reads []Op
	attempt := 0
	_ = poll(settleTimeout, func() error {
		attempt++
		cp.mu.Lock()
		faults := append([]faultEvent(nil), cp.faults...)
		cp.mu.Unlock()
		due := availDue(cp.h.Ops(), faults, start)
		var got []Op
		for _, n := range cp.c.nodes {
			vals, err := readRetainedFilter(n, fmt.Sprintf("avail-reader-%s-%d", n.ID, attempt), availPrefix+"#")
			if err != nil {
				return err
			}
			now := time.Now()
			got = append(got, Op{Kind: KindAvailRead, Client: "avail-reader", Node: n.ID, Topic: availPrefix + "#", Value: when,
				Start: start, End: now, Outcome: OK, Values: vals})
		}
		reads = got
		if bad := availBad(due, got); len(bad) > 0 {
			return fmt.Errorf("%s", strings.Join(bad, "; "))
		}
		return nil
	})
	for _, r := range reads {
		cp.h.Add(r)
	}
}

// availReadAsync is availRead in the background (after a heal: the fault
// schedule goes on); one at a time, a heal while one runs is skipped.
func (cp *campaign) availReadAsync(when string) {
	cp.mu.Lock()
	busy := cp.availReading
	cp.availReading = true
	cp.mu.Unlock()
	if busy {
		return
	}
	cp.bg.Add(1)
	go func() {
		defer cp.bg.Done()
		cp.availRead(when)
		cp.mu.Lock()
		cp.availReading = false
		cp.mu.Unlock()
	}()
}

// AvailResult counts the availability workload.
type AvailResult struct {
	Online    map[Outcome]int `json:"online"`     // retained "online" publishes
	Dropped   int             `json:"dropped"`    // connections the clients dropped with the will armed (will due)
	Reads     int             `json:"reads"`      // node readings of chaos/avail/#
	Judged    int             `json:"judged"`     // (reading, due will) pairs judged
	NotServed int             `json:"not_served"` // of those, the node did not serve the will
}

// checkAvail judges every reading of chaos/avail/#: for each availability
// client whose latest connection, when the reading began, had ended with
// its will due, the node serves that will (its "offline") or something of
// a later connection (retained-will-missing).
func checkAvail(ops []Op, faults []faultEvent, r *CheckResult) {
	a := &r.Avail
	for _, o := range ops {
		switch {
		case o.Kind == KindAvailOnline:
			a.Online[o.Outcome]++
		case o.Kind == KindWillEnd && o.Err == dropByClient && strings.HasPrefix(o.Topic, availPrefix):
			a.Dropped++
		}
	}
	for _, rd := range ops {
		if rd.Kind != KindAvailRead {
			continue
		}
		a.Reads++
		due := availDue(ops, faults, rd.Start)
		for _, topic := range sortedKeys(due) {
			a.Judged++
			c := due[topic]
			if availServedOK(c, rd.Values[topic]) {
				continue
			}
			a.NotServed++
			ex := []string{c.connect.String()}
			if c.armed != nil {
				ex = append(ex, c.armed.String())
			}
			ex = append(ex, c.end.String())
			if c.fault.Kind != "" {
				ex = append(ex, faultLine(c.fault))
			}
			ex = append(ex, rd.String())
			r.Violations = append(r.Violations, Violation{Check: "retained-will-missing", Topic: topic,
				Detail: fmt.Sprintf("%s %s serves %q as the retained value of %s, but %s's will %q was due (%s)",
					rd.Value, rd.Node, rd.Values[topic], topic, c.connect.Client, c.connect.Value, c.end.Err),
				Excerpt: ex})
		}
	}
}

// readRetainedFilter subscribes to filter and a marker topic, then
// publishes to the marker: the node sends a subscription's retained
// messages before it handles the next packet, so the marker comes after
// every retained value.
func readRetainedFilter(n *Node, id, filter string) (map[string]string, error) {
	c, err := connectNode(n, testutil.ClientOptions{ID: id, CleanStart: true})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", n.ID, err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	marker := "chaos/marker/" + id
	sub := &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}, {Topic: marker, QoS: 1}}}
	if _, err := c.Subscribe(ctx, sub); err != nil {
		return nil, fmt.Errorf("%s: subscribe: %w", n.ID, err)
	}
	if _, err := c.Publish(ctx, &paho.Publish{Topic: marker, QoS: 1, Payload: []byte("end")}); err != nil {
		return nil, fmt.Errorf("%s: publish marker: %w", n.ID, err)
	}
	vals := map[string]string{}
	for {
		select {
		case p := <-c.Msgs:
			if p.Topic == marker {
				return vals, nil
			}
			if p.Retain {
				vals[p.Topic] = string(p.Payload)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("%s: the end marker did not arrive", n.ID)
		}
	}
}
