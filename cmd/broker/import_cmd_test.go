package main

import (
	"strings"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/mosquitto"
	"github.com/mqtt-ha/broker/replication"
)

// TestPlanImport: what a Mosquitto file holds that the cluster cannot take
// is listed with its reason, never sent and never silently dropped.
func TestPlanImport(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	m := func(topic string, expiry int64) *mosquitto.Message {
		return &mosquitto.Message{Topic: topic, Payload: []byte("x"), QoS: 1, Expiry: expiry}
	}
	db := &mosquitto.DB{
		Retained: []*mosquitto.Message{m("r/live", 0), m("r/expired", now.Unix()-1), m("r/later", now.Unix()+60)},
		Sessions: []*mosquitto.Session{
			{ClientID: "v3", ExpiryInterval: replication.NeverExpires,
				Subscriptions: []mosquitto.Subscription{{Filter: "a/#", QoS: 1}, {Filter: "$share/g/b", QoS: 1}},
				Queue: []mosquitto.Queued{
					{Message: m("a/1", 0), QoS: 1, State: mosquitto.StateQueued},
					{Message: m("a/2", 0), QoS: 2, Incoming: true, State: mosquitto.StateWaitForPubrel},
					{Message: m("a/3", 0), QoS: 2, State: mosquitto.StateWaitForPubcomp},
					{Message: m("a/4", 0), QoS: 0, State: mosquitto.StateQueued},
					{Message: m("a/5", now.Unix()-5), QoS: 1, State: mosquitto.StateQueued},
					{Message: m("a/6", now.Unix()+5), QoS: 2, State: mosquitto.StateWaitForPubrec},
				}},
			{ClientID: "v5", ExpiryInterval: 3600, ExpiresAt: now.Unix() + 100},
			{ClientID: "gone", ExpiryInterval: 3600, ExpiresAt: now.Unix() - 1},
		},
	}
	p := planImport(db, now)
	if len(p.retained) != 2 || p.retained[0].Topic != "r/live" || p.retained[1].Expires != (now.Unix()+60)*1000 {
		t.Fatalf("retained: %+v", p.retained)
	}
	if len(p.sessions) != 2 {
		t.Fatalf("sessions: %+v", p.sessions)
	}
	v3, v5 := p.sessions[0], p.sessions[1]
	if v3.ProtocolVersion != 4 || len(v3.Subscriptions) != 1 || len(v3.Queue) != 2 ||
		v3.Queue[0].Topic != "a/1" || v3.Queue[1].Topic != "a/6" || v3.Queue[1].QoS != 2 {
		t.Fatalf("v3 session: %+v", v3)
	}
	if v5.ProtocolVersion != 5 || v5.ExpiryInterval != 100 {
		t.Fatalf("v5 session: %+v (want the 100 s it had left)", v5)
	}
	skipped := strings.Join(p.report.Skipped, "\n")
	for _, want := range []string{`"r/expired": expired`, `shared subscription "$share/g/b"`, `"a/2" received from the client`,
		`"a/3" the client has received`, `QoS 0 message on "a/4"`, `"a/5" expired`, `session "gone": expired`} {
		if !strings.Contains(skipped, want) {
			t.Errorf("skipped list lacks %q:\n%s", want, skipped)
		}
	}
	if len(p.report.Skipped) != 7 {
		t.Errorf("%d skipped, want 7:\n%s", len(p.report.Skipped), skipped)
	}
}

// TestPartialImportDropsSessions: with --partial, a damaged file's
// sessions are not imported (their subscriptions come later in the file
// and may be lost with the damage); its retained messages are.
func TestPartialImportDropsSessions(t *testing.T) {
	db := &mosquitto.DB{
		Retained: []*mosquitto.Message{{Topic: "r", Payload: []byte("x"), QoS: 1}},
		Sessions: []*mosquitto.Session{{ClientID: "s", ExpiryInterval: replication.NeverExpires}},
	}
	p := planImport(db, time.Now())
	p.damaged(&mosquitto.CorruptError{Offset: 10, Reason: "cut"})
	if len(p.retained) != 1 || len(p.sessions) != 0 || len(p.report.Skipped) != 2 ||
		!strings.Contains(p.report.Skipped[0], `session "s"`) || !strings.Contains(p.report.Skipped[1], "byte 10") {
		t.Fatalf("retained %d, sessions %d, skipped %q", len(p.retained), len(p.sessions), p.report.Skipped)
	}
}
