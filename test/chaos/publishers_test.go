package chaos

import (
	"context"
	"fmt"
	"math/rand"
	"strings"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session/state"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// Publishers of the persistent subscribers' messages beyond the clean
// sessionPublishers: persistent-session publishers that move between
// nodes and resume with their client-side session state (an in-flight
// QoS 2 message is resent on the next node, with DUP or as PUBREL), and
// bursts published to a node right after it restarted or resumed.

const (
	ppubV5     = "sess-ppub5" // MQTT 5 publisher, session expiry sessExpiry
	ppubV311   = "sess-ppub3" // MQTT 3.1.1 publisher, clean session 0
	freshPub   = "fresh-pub"  // prefix of the publishers to a just-restarted node (fresh-pub<k>)
	freshAcks  = 4            // a burst ends after this many acknowledged publishes
	freshFor   = 15 * time.Second
	resumeWait = publishTimeout // how long a resumed session has to complete the message in flight
)

// pubResult is the outcome of one QoS 1/2 publish, possibly completed on a
// later connection of the session.
type pubResult struct {
	out Outcome
	err string
	at  time.Time
}

// inflight is a publish whose outcome is not known yet.
type inflight struct {
	op  Op
	res chan pubResult
}

// classify turns paho's answer into an outcome (see publishQoS).
func classify(pr *paho.PublishResponse, err error) (Outcome, string) {
	switch {
	case pr != nil && pr.ReasonCode >= 0x80:
		reason := ""
		if pr.Properties != nil {
			reason = pr.Properties.ReasonString
		}
		return Failed, fmt.Sprintf("reason code 0x%02x %s", pr.ReasonCode, reason)
	case err != nil:
		return Unknown, err.Error()
	}
	return OK, ""
}

// persistentPublisher publishes numbered messages (mostly QoS 2 to
// sessTopicQ2, some QoS 1 to sessTopicQ1) from a persistent session: MQTT
// 5 with session expiry sessExpiry and paho's session state, or MQTT 3.1.1
// with clean session 0 and client311's. Every 15-45 messages it moves to
// another node (half the time with DISCONNECT, half by dropping the
// socket); it also moves when its connection fails or a publish is not
// answered within publishTimeout. A message in flight when the connection
// ended is resent by the client on the next connection (the session
// resumed); the publisher waits for its outcome there before it sends the
// next, and records it once, with its original start: acknowledged on the
// later connection counts as acknowledged.
func (cp *campaign) persistentPublisher(ctx context.Context, id string, v311 bool, rng *rand.Rand) {
	st, st311 := state.NewInMemory(), newSession311()
	established := false
	last := ""
	var pending *inflight
	finish := func(p *inflight, r pubResult, node string) {
		p.op.Outcome, p.op.End = r.out, r.at
		p.op.Err = r.err
		if node != p.op.Node && r.out == OK {
			p.op.Err = "completed after resuming the session on " + node
		}
		cp.h.Add(p.op)
	}
	seq := 1
	for epoch := 0; ctx.Err() == nil || pending != nil; {
		if ctx.Err() != nil {
			// The workload is over: what is still in flight stays unknown.
			finish(pending, pubResult{out: Unknown, err: "workload ended before the session was resumed", at: time.Now()}, pending.op.Node)
			return
		}
		node := cp.pick(rng, last)
		last = node.ID
		op := Op{Kind: KindSessConnect, Client: id, Node: node.ID, Start: time.Now(), Outcome: OK, CleanStart: !established && !v311}
		var c5 *testutil.Client
		var c3 *client311
		var done <-chan struct{}
		var err error
		if v311 {
			if c3, err = cp.connect311(node, opts311{ID: id, Session: st311}); err == nil {
				done, op.SessionPresent, op.Proto = c3.Done(), c3.SessionPresent, 4
			}
		} else {
			c5, err = cp.connectWith(node, connectOptions{ClientOptions: testutil.ClientOptions{ID: id, CleanStart: op.CleanStart,
				SessionExpiry: sessExpiry, Session: st}})
			if err == nil {
				done, op.SessionPresent, op.Expiry = c5.Done(), c5.Connack.SessionPresent, sessExpiry
			}
		}
		if err != nil {
			pace(ctx, 100*time.Millisecond)
			continue
		}
		epoch++
		op.End, op.PubConn = time.Now(), epoch
		cp.h.Add(op)
		established = true
		drop := func() {
			if c5 != nil {
				release(c5)
			} else {
				c3.Drop()
			}
		}
		// The message in flight was resent with the CONNACK: wait for it.
		if pending != nil {
			select {
			case r := <-pending.res:
				finish(pending, r, node.ID)
			case <-done:
				continue // lost again: resume elsewhere
			case <-time.After(resumeWait):
				finish(pending, pubResult{out: Unknown, err: "not completed after resuming the session on " + node.ID, at: time.Now()}, pending.op.Node)
			}
			pending = nil
		}
		lost := false
		for range 15 + rng.Intn(30) {
			if ctx.Err() != nil {
				break
			}
			topic, qos := sessTopicQ2, byte(2)
			if rng.Intn(5) == 0 {
				topic, qos = sessTopicQ1, 1
			}
			p := &inflight{res: make(chan pubResult, 1), op: Op{Kind: KindSessPub, Client: id, Node: node.ID, Topic: topic, QoS: qos,
				Publisher: id, Seq: seq, PubConn: epoch, Value: fmt.Sprintf("%s:%d", id, seq), Start: time.Now(), Proto: op.Proto}}
			seq++
			if c5 != nil {
				go func() {
					// paho keeps the message in the session state when the
					// connection ends and resends it on the next one; the
					// answer reaches this call (PacketTimeout bounds it).
					pr, err := c5.Publish(context.Background(), &paho.Publish{Topic: topic, QoS: qos, Payload: []byte(p.op.Value)})
					out, msg := classify(pr, err)
					p.res <- pubResult{out, msg, time.Now()}
				}()
			} else {
				m, err := c3.PublishAsync(topic, qos, false, []byte(p.op.Value))
				if err != nil {
					p.res <- pubResult{Unknown, err.Error(), time.Now()}
				} else {
					go func() {
						select {
						case <-m.done:
							p.res <- pubResult{OK, "", time.Now()}
						case <-m.dropped:
							p.res <- pubResult{Unknown, "dropped from the session (no session on resume)", time.Now()}
						case <-time.After(4 * publishTimeout):
							p.res <- pubResult{Unknown, "never acknowledged", time.Now()}
						}
					}()
				}
			}
			select {
			case r := <-p.res:
				finish(p, r, node.ID)
				if r.out == Failed {
					lost = true
				}
			case <-done:
				pending, lost = p, true
			case <-time.After(publishTimeout):
				pending, lost = p, true // a paused node: move, the session resends it
			}
			if lost {
				break
			}
			pace(ctx, time.Duration(40+rng.Intn(40))*time.Millisecond)
		}
		switch {
		case lost || rng.Intn(2) == 0:
			drop()
		case c5 != nil:
			c5.Close() // DISCONNECT 0x00: the session stays (expiry 600 s)
		default:
			c3.Close()
		}
	}
}

// freshPublish publishes to node n as soon as its MQTT port accepts a
// connection after a restart or a resume (SIGCONT): QoS 1 to sessTopicQ1
// and QoS 2 to sessTopicQ2 alternately, until freshAcks were acknowledged
// or freshFor passed, reconnecting to n when a publish fails. The
// messages go to the persistent subscribers like the others, so every
// acknowledged one is owed to them (session-acked-lost).
func (cp *campaign) freshPublish(n *Node, after string) {
	cp.mu.Lock()
	cp.freshBursts++
	id := fmt.Sprintf("%s%d", freshPub, cp.freshBursts)
	cp.mu.Unlock()
	cp.bg.Add(1)
	go func() {
		defer cp.bg.Done()
		deadline := time.Now().Add(freshFor)
		var c *testutil.Client
		acked := 0
		for seq := 1; acked < freshAcks && time.Now().Before(deadline); {
			if c == nil {
				err := poll(time.Until(deadline), func() error {
					var err error
					c, err = cp.connect(id, n, 0)
					return err
				})
				if err != nil {
					return
				}
			}
			topic, qos := sessTopicQ1, byte(1)
			if seq%2 == 0 {
				topic, qos = sessTopicQ2, 2
			}
			op := Op{Kind: KindSessPub, Client: id, Node: n.ID, Topic: topic, QoS: qos, Publisher: id, Seq: seq, PubConn: 1,
				Value: fmt.Sprintf("%s:%d", id, seq), Start: time.Now()}
			seq++
			op.Outcome, op.Err = publishQoS(c, topic, qos, false, op.Value, publishTimeout)
			op.End = time.Now()
			if op.Err != "" {
				op.Err += "; "
			}
			op.Err += "published right after " + after
			cp.h.Add(op)
			if op.Outcome == OK {
				acked++
			} else {
				release(c)
				c = nil
			}
		}
		if c != nil {
			c.Close()
		}
	}()
}

// isFresh reports whether an op is from a publisher to a just-restarted node.
func isFresh(o Op) bool { return strings.HasPrefix(o.Publisher, freshPub) }
