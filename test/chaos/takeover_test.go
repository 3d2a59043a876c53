package chaos

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"strings"
	"time"
)

// Same-node takeover behind a publish backlog (hooks/pipeline_takeover.go).
// A device (MQTT 3.1.1, clean session, no will) connects to a node, writes
// a backlog of QoS 1 retained publishes to its own topics without waiting
// for the PUBACKs, then a retained "online-<round>" (QoS 0 and QoS 1 in
// turn) to its status topic, all in one write; at once it connects again
// with the same client id to the SAME node (the broker takes the old
// connection over) and publishes a retained "new-<round>" at QoS 1, waiting
// for its PUBACK: in half the rounds after CONNACK, in the others in the
// same write as the CONNECT (takeoverEarly). Mosquitto keeps "new": the old connection's packets, sent
// before the new CONNECT, come first. The broker used to let the old
// connection's "online", still queued behind the backlog in its publish
// pipeline, land after "new" (about 1 takeover in 10 on three nodes with a
// partial fix; every time before it). After the round a fresh subscriber
// on every node reads the status topic until it serves "new-<round>" or
// tkoReadWait passes.

const (
	tkoPrefix  = "chaos/tko/"
	tkoDevices = 3
	// tkoReadWait bounds a round's reads: a node that still serves another
	// value after this much is judged on it. A follower applies a commit in
	// milliseconds on a healthy cluster, and within an election when
	// another node was paused or cut right after the commit; the bug's
	// value stays.
	tkoReadWait = 8 * time.Second
	// tkoFastAck: a round is judged only when "new" was acknowledged within
	// this. The takeover's wait for the old connection's writes is bounded
	// by the broker's write timeout (5 s); an acknowledgement well within
	// it means the old connection's writes were resolved first.
	tkoFastAck = 2 * time.Second
	// tkoBacklogMin and tkoBacklogMax bound a round's backlog (QoS 1
	// retained publishes before "online").
	tkoBacklogMin = 10
	tkoBacklogMax = 30
	// tkoWarmRounds: the faults wait (awaitWorkloads) until each device
	// has had this many rounds read, so that a campaign judges some
	// rounds without any fault.
	tkoWarmRounds = 2
	// Why a node was not read (KindTkoRead Err).
	tkoNodeDown = "not read: the node was under a fault"
)

// Op kinds of the takeover devices. Client is the device, Topic its status
// topic, Seq the round, Node the node both connections used.
const (
	KindTkoOld  = "tko-old"  // the old connection: CONNECT, then Backlog QoS 1 retained writes and Value ("online-<round>", QoS) written (ok) or not
	KindTkoNew  = "tko-new"  // the takeover: CONNECT on the same node and Value ("new-<round>") at QoS 1, ok on PUBACK
	KindTkoRead = "tko-read" // a fresh subscriber's last reading of the status topic on Node (Value: served, "" none)
)

func tkoDevice(k int) string      { return fmt.Sprintf("tko%d", k) }
func tkoStatus(dev string) string { return tkoPrefix + dev + "/status" }
func tkoOnline(round int) string  { return fmt.Sprintf("online-%d", round) }
func tkoNew(round int) string     { return fmt.Sprintf("new-%d", round) }

// takeoverDevice runs rounds until ctx ends; k (1..tkoDevices) names it.
func (cp *campaign) takeoverDevice(ctx context.Context, k int, rng *rand.Rand) {
	dev := tkoDevice(k)
	for round := 1; ctx.Err() == nil; round++ {
		if cp.takeoverRound(dev, round, rng) {
			cp.tkoRounds[k-1].Add(1)
		}
		if !pace(ctx, time.Duration(100+rng.Intn(300))*time.Millisecond) {
			return
		}
	}
}

// retained311 is an MQTT 3.1.1 retained PUBLISH (id ignored at QoS 0).
func retained311(topic string, qos byte, id uint16, payload string) []byte {
	var b bytes.Buffer
	putString(&b, []byte(topic))
	if qos > 0 {
		put16(&b, id)
	}
	b.WriteString(payload)
	return packet311(0x31|qos<<1, b.Bytes())
}

// takeoverRound is one round of dev on a node picked afresh; it reports
// whether "new" was acknowledged and the nodes were read.
func (cp *campaign) takeoverRound(dev string, round int, rng *rand.Rand) bool {
	node := cp.pick(rng)
	status := tkoStatus(dev)
	backlog := tkoBacklogMin + rng.Intn(tkoBacklogMax-tkoBacklogMin+1)
	qos := byte(round % 2)
	old := Op{Kind: KindTkoOld, Client: dev, Node: node.ID, Topic: status, Seq: round, Value: tkoOnline(round), QoS: qos,
		Backlog: backlog, Start: time.Now(), Outcome: OK}
	oc, err := cp.connect311(node, opts311{ID: dev, Clean: true})
	if err == nil {
		// Backlog and "online" in one write: all of it is in the node's
		// socket before the new CONNECT.
		var burst bytes.Buffer
		for i := 0; i < backlog; i++ {
			burst.Write(retained311(fmt.Sprintf("%s%s/b/%d", tkoPrefix, dev, i), 1, uint16(i+1), fmt.Sprintf("r%d", round)))
		}
		burst.Write(retained311(status, qos, uint16(backlog+1), old.Value))
		err = oc.write(burst.Bytes())
	}
	old.End = time.Now()
	if err != nil {
		old.Outcome, old.Err = Unknown, err.Error()
	}
	cp.h.Add(old)
	if oc == nil {
		return false
	}
	defer func() {
		// The takeover closed it (or the node is gone): let go of it.
		select {
		case <-oc.Done():
		case <-time.After(2 * time.Second):
		}
		oc.Drop()
	}()
	if old.Outcome != OK {
		return false
	}

	nw := Op{Kind: KindTkoNew, Client: dev, Node: node.ID, Topic: status, Seq: round, Value: tkoNew(round), QoS: 1,
		Early: rng.Intn(2) == 0, Start: time.Now()}
	if nw.Early {
		nw.Outcome, nw.Err = takeoverEarly(node, dev, status, nw.Value)
	} else if nc, err := cp.connect311(node, opts311{ID: dev, Clean: true}); err != nil {
		nw.Outcome, nw.Err = Unknown, err.Error()
	} else {
		nw.Outcome, nw.Err = nc.Publish(status, 1, true, nw.Value, publishTimeout)
		nc.Close()
	}
	nw.End = time.Now()
	cp.h.Add(nw)
	if nw.Outcome != OK {
		return false
	}
	return cp.takeoverRead(dev, round)
}

// takeoverEarly connects id to n (MQTT 3.1.1, clean session) and sends
// its retained QoS 1 PUBLISH of value in the same write as the CONNECT,
// before CONNACK (3.1.1 allows it: the server reads the PUBLISH after the
// CONNECT): the takeover's write reaches the node as early as it can. It
// waits for CONNACK and then the PUBACK, up to publishTimeout in all, and
// disconnects.
func takeoverEarly(n *Node, id, topic, value string) (Outcome, string) {
	conn, err := n.dial(n.MQTTAddr, 5*time.Second)
	if err != nil {
		return Unknown, err.Error()
	}
	defer conn.Close()
	var b bytes.Buffer
	putString(&b, []byte("MQTT"))
	b.WriteByte(4)
	b.WriteByte(0x02) // clean session, no will
	put16(&b, 30)
	putString(&b, []byte(id))
	out := append(packet311(0x10, b.Bytes()), retained311(topic, 1, 1, value)...)
	_ = conn.SetDeadline(time.Now().Add(publishTimeout))
	if _, err := conn.Write(out); err != nil {
		return Unknown, "CONNECT and PUBLISH: " + err.Error()
	}
	r := bufio.NewReader(conn)
	first, body, err := readPacket311(r)
	switch {
	case err != nil:
		return Unknown, "CONNACK: " + err.Error()
	case first>>4 != 2 || len(body) != 2:
		return Unknown, fmt.Sprintf("CONNACK: got packet type %d", first>>4)
	case body[1] != 0:
		return Unknown, fmt.Sprintf("CONNACK return code %d", body[1])
	}
	for {
		first, body, err := readPacket311(r)
		if err != nil {
			return Unknown, "PUBACK: " + err.Error()
		}
		if first>>4 == 4 && len(body) >= 2 && body[0] == 0 && body[1] == 1 {
			_, _ = conn.Write([]byte{0xe0, 0x00}) // DISCONNECT
			return OK, ""
		}
	}
}

// takeoverRead reads dev's status topic with a fresh subscriber on every
// node until each serves "new-<round>" or tkoReadWait passes, and records
// each node's last reading. A node under a fault is not read. It reports
// whether some node was read.
func (cp *campaign) takeoverRead(dev string, round int) bool {
	status, want := tkoStatus(dev), tkoNew(round)
	start := time.Now()
	deadline := start.Add(tkoReadWait)
	reads := map[string]*Op{}
	for attempt := 1; ; attempt++ {
		pending := 0
		for _, n := range cp.c.nodes {
			rd := reads[n.ID]
			if rd == nil {
				rd = &Op{Kind: KindTkoRead, Client: "tko-reader", Node: n.ID, Topic: status, Seq: round, Start: start}
				reads[n.ID] = rd
			}
			if rd.Outcome == OK && rd.Value == want {
				continue
			}
			cp.mu.Lock()
			down := cp.down[n.ID]
			cp.mu.Unlock()
			if down {
				rd.End, rd.Outcome, rd.Value, rd.Err = time.Now(), Unknown, "", tkoNodeDown
				continue
			}
			vals, err := readRetainedFilter(n, fmt.Sprintf("tko-reader-%s-%s", dev, n.ID), status)
			rd.End = time.Now()
			if err != nil {
				rd.Outcome, rd.Value, rd.Err = Unknown, "", err.Error()
			} else {
				rd.Outcome, rd.Value, rd.Err = OK, vals[status], fmt.Sprintf("attempt %d", attempt)
			}
			if rd.Outcome != OK || rd.Value != want {
				pending++
			}
		}
		if pending == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	read := false
	for _, n := range cp.c.nodes {
		cp.h.Add(*reads[n.ID])
		read = read || reads[n.ID].Outcome == OK
	}
	return read
}

// TakeoverResult counts the takeover rounds.
type TakeoverResult struct {
	Rounds int `json:"rounds"` // old connections that connected and wrote their burst
	// Judged: clean rounds (see checkTakeover). NodeReads: their judged
	// readings; OldValue: of those, a node served the round's "online" or
	// an older value. ReadsNotJudged: readings of judged rounds not
	// judged (no answer, or a fault on the reading node).
	Judged         int `json:"judged"`
	NodeReads      int `json:"node_reads"`
	OldValue       int `json:"old_value"`
	ReadsNotJudged int `json:"reads_not_judged"`
	// NotJudged: the other rounds, by why: "old" (the old connection or
	// its write failed), "new" (the takeover's CONNECT or PUBACK did not
	// succeed), "slow" (acknowledged after tkoFastAck), "fault" (on the
	// device's node), "read" (no node read could be judged).
	NotJudged map[string]int `json:"not_judged"`
}

// tkoRoundOps is one round as the history has it.
type tkoRoundOps struct {
	old, nw *Op
	reads   []*Op
	prev    *Op // the device's previous round's old connection
}

// checkTakeover judges each clean takeover round: once the new
// connection's "new-<round>" was acknowledged, no node may serve the
// round's "online-<round>" (the old connection's write, sent before the
// takeover, landed after it) or an older value (takeover-order).
//
// A round is clean when the old connection wrote its burst, "new" was
// acknowledged within tkoFastAck, and no fault touched the node of this
// round or of the device's previous round from rejoinGrace before the
// previous round began until "new" was acknowledged: a write of a round
// whose node was paused or cut may land late (a forward retransmitted
// after a cut heals). A fault on another node is allowed (the bug showed
// mostly then, when commits are slower): a leader killed or stopped
// resolves the old connection's writes fast, and raft keeps them before
// "new", committed or lost; a leader paused or cut holds them until the
// write timeout, and "new" is then not acknowledged fast. A reading is
// judged when no fault touched its node from rejoinGrace before the round
// until the reading ended (a node that was down may still be catching up).
func checkTakeover(ops []Op, faults []faultEvent, r *CheckResult) {
	tk := &r.Takeover
	rounds := map[string]*tkoRoundOps{}
	var order []string
	last := map[string]*Op{} // device -> its latest old connection
	key := func(o *Op) string { return fmt.Sprintf("%s/%d", o.Client, o.Seq) }
	for i := range ops {
		o := &ops[i]
		switch o.Kind {
		case KindTkoOld:
			rd := &tkoRoundOps{old: o, prev: last[o.Client]}
			last[o.Client] = o
			rounds[key(o)] = rd
			order = append(order, key(o))
		case KindTkoNew:
			if rd := rounds[key(o)]; rd != nil {
				rd.nw = o
			}
		case KindTkoRead:
			dev := strings.TrimSuffix(strings.TrimPrefix(o.Topic, tkoPrefix), "/status")
			if rd := rounds[fmt.Sprintf("%s/%d", dev, o.Seq)]; rd != nil {
				rd.reads = append(rd.reads, o)
			}
		}
	}
	for _, k := range order {
		rd := rounds[k]
		if rd.old.Outcome == OK {
			tk.Rounds++
		}
		var judged []*Op
		skipped := 0
		for _, rr := range rd.reads {
			if rr.Outcome == OK && !nodeFaulted(faults, rr.Node, rd.old.Start.Add(-rejoinGrace), rr.End) {
				judged = append(judged, rr)
			} else {
				skipped++
			}
		}
		from := rd.old.Start
		nodes := []string{rd.old.Node}
		if rd.prev != nil {
			from = rd.prev.Start
			nodes = append(nodes, rd.prev.Node)
		}
		why := ""
		switch {
		case rd.old.Outcome != OK:
			why = "old"
		case rd.nw == nil || rd.nw.Outcome != OK:
			why = "new"
		case rd.nw.End.Sub(rd.nw.Start) > tkoFastAck:
			why = "slow"
		case nodeFaulted(faults, nodes[0], from.Add(-rejoinGrace), rd.nw.End) ||
			len(nodes) > 1 && nodeFaulted(faults, nodes[1], from.Add(-rejoinGrace), rd.nw.End):
			why = "fault"
		case len(judged) == 0:
			why = "read"
		}
		if why != "" {
			tk.NotJudged[why]++
			continue
		}
		tk.Judged++
		tk.ReadsNotJudged += skipped
		for _, rr := range judged {
			tk.NodeReads++
			if rr.Value == rd.nw.Value {
				continue
			}
			tk.OldValue++
			what := "an older value, kept after it"
			switch rr.Value {
			case rd.old.Value:
				what = fmt.Sprintf("the old connection's %q, sent before the takeover, landed after it", rr.Value)
			case "":
				what = "no value: the acknowledged write is lost"
			}
			ex := []string{"old:  " + rd.old.String(), "new:  " + rd.nw.String(), "read: " + rr.String()}
			for _, f := range faults {
				if !f.Start.After(rr.End) && !f.End.Add(rejoinGrace).Before(from) {
					ex = append(ex, "beside: "+faultLine(f))
				}
			}
			r.Violations = append(r.Violations, Violation{Check: "takeover-order", Topic: rd.old.Topic,
				Detail: fmt.Sprintf("round %d of %s on %s: the new connection's %q was acknowledged at %s, then %s served %q as the retained value of %s (read until %s): %s",
					rd.old.Seq, rd.old.Client, rd.old.Node, rd.nw.Value, rd.nw.End.Format("15:04:05.000"), rr.Node, rr.Value, rd.old.Topic,
					rr.End.Format("15:04:05.000"), what),
				Excerpt: ex})
		}
	}
}

// nodeFaulted: a fault on node (or on all nodes) began before until and
// ended after from.
func nodeFaulted(faults []faultEvent, node string, from, until time.Time) bool {
	for _, f := range faults {
		if (f.Node == node || f.Node == "all") && !f.Start.After(until) && !f.End.Before(from) {
			return true
		}
	}
	return false
}
