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

// Clients that switch between a persistent and a clean session with the
// same client id (guarantee 8: clean start discards the session, on
// whichever node). Each cycle: the client's persistent session is offline
// and subscribed to chaos/switch/<id>; a publisher gets messages for it
// acknowledged (queued); the client connects with clean start 1 (MQTT 3.1.1:
// clean session 1) and disconnects; then it resumes with clean start off
// and must find no session (session present 0) and none of the queued
// messages: it subscribes again and publishes a marker to itself, and
// everything received before the marker is recorded.

const (
	switchPrefix = "chaos/switch/"
	switchPub    = "switch-pub"
	switchV5     = "switch5"
	switchV311   = "switch3"
)

// Op kinds of the switching clients.
const (
	KindSwitchConnect = "switch-connect" // a CONNACK (clean start, expiry, proto, session present)
	KindSwitchPub     = "switch-pub"     // a QoS 1 publish to a switching client's topic (Value: payload)
	KindSwitchRecv    = "switch-recv"    // a message a switching client received (Value: payload)
)

// switcher runs the cycles until ctx ends.
func (cp *campaign) switcher(ctx context.Context, id string, v311 bool, rng *rand.Rand) {
	topic := switchPrefix + id
	var pubC *testutil.Client
	defer func() {
		if pubC != nil {
			pubC.Close()
		}
	}()
	msg := 0
	setup := true // the next persistent connection starts the session and subscribes
	for cycle := 1; ctx.Err() == nil; cycle++ {
		// Persistent connection: set up, or resume after the clean one.
		c, ok := cp.switchConnect(id, v311, setup, cp.pick(rng))
		if !ok {
			pace(ctx, 200*time.Millisecond)
			continue
		}
		if !cp.switchSubscribeAndMark(c, id, topic, cycle) {
			c.release()
			setup = true
			continue
		}
		c.release() // offline, subscribed: it queues
		// Messages for the offline session.
		for j := 0; j < 3 && ctx.Err() == nil; j++ {
			if pubC == nil {
				var err error
				if pubC, err = cp.connect(switchPub+"-"+id, cp.pick(rng), 0); err != nil {
					pace(ctx, 100*time.Millisecond)
					continue
				}
			}
			msg++
			op := Op{Kind: KindSwitchPub, Client: switchPub + "-" + id, Topic: topic, QoS: 1, Seq: msg,
				Value: fmt.Sprintf("%s:%d", id, msg), Start: time.Now()}
			op.Outcome, op.Err = publishQoS(pubC, topic, 1, false, op.Value, publishTimeout)
			op.End = time.Now()
			cp.h.Add(op)
			if op.Outcome != OK {
				release(pubC)
				pubC = nil
			}
		}
		// A clean connection with the same client id, then DISCONNECT.
		node := cp.pick(rng)
		cop := Op{Kind: KindSwitchConnect, Client: id, Node: node.ID, CleanStart: true, Start: time.Now()}
		if v311 {
			cop.Proto = 4
			c3, err := cp.connect311(node, opts311{ID: id, Clean: true})
			cop.End = time.Now()
			if err == nil {
				cop.Outcome = OK
				c3.Close()
			} else {
				cop.Outcome, cop.Err = Unknown, err.Error()
			}
		} else {
			c5, err := cp.connectWith(node, connectOptions{ClientOptions: testutil.ClientOptions{ID: id, CleanStart: true}})
			cop.End = time.Now()
			if err == nil {
				cop.Outcome = OK
				c5.Close()
			} else {
				cop.Outcome, cop.Err = Unknown, err.Error()
			}
		}
		cp.h.Add(cop)
		setup = false
		pace(ctx, time.Duration(200+rng.Intn(600))*time.Millisecond)
	}
}

// switchConnect opens the persistent connection (clean start 1 when
// setup, for MQTT 5; a 3.1.1 client always asks clean session 0) with a
// new client-side session state, as a client that just used a clean
// session has none.
func (cp *campaign) switchConnect(id string, v311, setup bool, node *Node) (sessConn, bool) {
	op := Op{Kind: KindSwitchConnect, Client: id, Node: node.ID, Start: time.Now(), Outcome: OK}
	// A failed attempt is recorded as unknown: the node may have opened
	// the session before the client saw the failure (a refusal after an
	// unknown write, a lost CONNACK), so the next resume may find it.
	failed := func(err error) (sessConn, bool) {
		op.End, op.Outcome, op.Err = time.Now(), Unknown, err.Error()
		cp.h.Add(op)
		return sessConn{}, false
	}
	var c sessConn
	if v311 {
		c3, err := cp.connect311(node, opts311{ID: id, Session: newSession311()})
		if err != nil {
			op.Proto = 4
			return failed(err)
		}
		c, op.Proto = v311Conn(c3), 4
	} else {
		op.Expiry, op.CleanStart = sessExpiry, setup
		c5, err := cp.connectWith(node, connectOptions{ClientOptions: testutil.ClientOptions{ID: id, CleanStart: setup,
			SessionExpiry: sessExpiry, Session: state.NewInMemory()}})
		if err != nil {
			return failed(err)
		}
		c = v5Conn(c5)
	}
	op.End, op.SessionPresent = time.Now(), c.present
	cp.h.Add(op)
	return c, true
}

// switchSubscribeAndMark subscribes to the client's topic, publishes a
// marker to it through the same connection and records every message
// until the marker arrives (what a resumed session still queued comes
// before it).
func (cp *campaign) switchSubscribeAndMark(c sessConn, id, topic string, cycle int) bool {
	if reasons, err := c.subFn([]paho.SubscribeOptions{{Topic: topic, QoS: 1}}); err != nil || len(reasons) != 1 || reasons[0] >= 0x80 {
		return false
	}
	marker := fmt.Sprintf("%s:marker:%d", id, cycle)
	var out Outcome
	switch {
	case c.pub5 != nil:
		out, _ = publishQoS(c.pub5, topic, 1, false, marker, publishTimeout)
	case c.pub311 != nil:
		out, _ = c.pub311.Publish(topic, 1, false, marker, publishTimeout)
	}
	if out != OK {
		return false
	}
	deadline := time.After(publishTimeout)
	for {
		select {
		case p := <-c.msgs:
			if string(p.Payload) == marker {
				return true
			}
			now := time.Now()
			cp.h.Add(Op{Kind: KindSwitchRecv, Client: id, Topic: p.Topic, Value: string(p.Payload), QoS: p.QoS, Dup: p.Duplicate(),
				Start: now, End: now, Outcome: OK})
		case <-c.done:
			return false
		case <-deadline:
			return false
		}
	}
}

// SwitchResult counts the switching clients.
type SwitchResult struct {
	Published   map[Outcome]int `json:"published"`    // publishes to their offline sessions
	CleanOK     int             `json:"clean_ok"`     // clean connections that succeeded
	Judged      int             `json:"judged"`       // resumes right after a successful clean connection
	Present     int             `json:"present"`      // of those, session present 1 (violation)
	Stale       int             `json:"stale"`        // messages queued before a clean connection received after it (violation)
	StaleJudged int             `json:"stale_judged"` // acknowledged messages that a clean connection had to discard
}

// checkSwitch: after a successful clean connection (clean start 1 /
// clean session 1) of a switching client,
//
//   - its next persistent CONNECT finds no session (clean-start-session-present);
//   - no message acknowledged before the clean connection began is
//     received after it ended (clean-start-kept-queue).
func checkSwitch(ops []Op, r *CheckResult) {
	sw := &r.Switch
	var cleans []Op
	prev := map[string]Op{} // client -> its previous switch-connect
	for _, o := range ops {
		switch o.Kind {
		case KindSwitchPub:
			sw.Published[o.Outcome]++
		case KindSwitchConnect:
			if o.CleanStart && o.Outcome == OK {
				sw.CleanOK++
				cleans = append(cleans, o)
			}
			if p, ok := prev[o.Client]; ok && p.CleanStart && p.Outcome == OK && !o.CleanStart && o.Outcome == OK {
				sw.Judged++
				if o.SessionPresent {
					sw.Present++
					r.Violations = append(r.Violations, Violation{Check: "clean-start-session-present", Topic: switchPrefix + o.Client,
						Detail:  fmt.Sprintf("%s connected with a clean session, then resumed (clean start off) and got session present 1", o.Client),
						Excerpt: []string{"clean:  " + p.String(), "resume: " + o.String()}})
				}
			}
			prev[o.Client] = o
		}
	}
	prevClean := map[string]time.Time{}
	for _, c := range cleans {
		topic := switchPrefix + c.Client
		var stale []Op
		var pubs []Op
		since := prevClean[c.Client]
		prevClean[c.Client] = c.End
		for _, o := range ops {
			if o.Kind == KindSwitchPub && o.Topic == topic && o.Outcome == OK && o.End.Before(c.Start) && o.Start.After(since) {
				pubs = append(pubs, o)
			}
		}
		queued := map[string]Op{}
		for _, p := range pubs {
			queued[p.Value] = p
		}
		for _, o := range ops {
			if o.Kind == KindSwitchRecv && o.Client == c.Client && o.Start.After(c.End) {
				if _, ok := queued[o.Value]; ok && !strings.Contains(o.Value, ":marker:") {
					stale = append(stale, o)
				}
			}
		}
		sw.StaleJudged += len(pubs)
		if len(stale) == 0 {
			continue
		}
		sw.Stale += len(stale)
		r.Violations = append(r.Violations, Violation{Check: "clean-start-kept-queue", Topic: topic,
			Detail: fmt.Sprintf("%s received %d message(s) queued in its persistent session before it connected with a clean session", c.Client, len(stale)),
			Excerpt: []string{"published: " + queued[stale[0].Value].String(), "clean:     " + c.String(),
				"received:  " + stale[0].String()}})
	}
}
