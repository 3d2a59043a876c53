package hooks

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// raceHook: when the second connection of "tk" reaches OnSessionEstablish
// (after the cluster hook registered it), the first connection's client
// goes away on its own (socket closed) and the second one's client drops
// its socket before the CONNACK (a client crash / RST).
type raceHook struct {
	mqtt.HookBase
	mu      sync.Mutex
	first   *mqtt.Client
	aClient net.Conn
	bClient net.Conn
	aGone   chan struct{}
}

func (h *raceHook) ID() string { return "race" }
func (h *raceHook) Provides(b byte) bool {
	return b == mqtt.OnSessionEstablish || b == mqtt.OnDisconnect
}
func (h *raceHook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	h.mu.Lock()
	if h.first == nil {
		h.first = cl
		h.mu.Unlock()
		return
	}
	h.mu.Unlock()
	_ = h.aClient.Close() // the first client leaves
	<-h.aGone             // its OnDisconnect ran (the cluster hook's first)
	_ = h.bClient.Close() // the new client is gone before its CONNACK
}
func (h *raceHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	h.mu.Lock()
	first := h.first
	h.mu.Unlock()
	if cl == first {
		close(h.aGone)
	}
}

func connectBytes(t *testing.T) []byte {
	var buf bytes.Buffer
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "tk", Keepalive: 30}}
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestReviewSharedSubscriptionLeaksWhenNewConnectionFails: the first
// connection (persistent session, shared subscription) leaves while a
// second connection of its id is being set up; the second connection's
// CONNACK fails, so mochi calls no OnDisconnect for it. Nobody is
// connected, yet the shared subscription stayed in mochi's index and its
// route announced (found by review of 0590cab, which made the first
// connection's OnDisconnect leave them to the second). The listener tells
// the hook that mochi is done with the second connection.
func TestReviewSharedSubscriptionLeaksWhenNewConnectionFails(t *testing.T) {
	h, s := newClusterHook(t)
	_ = s.AddHook(new(allowAll), nil)
	if err := s.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	rh := &raceHook{aGone: make(chan struct{})}
	_ = s.AddHook(rh, nil)

	aSrv, aCli := net.Pipe()
	bSrv, bCli := net.Pipe()
	rh.aClient, rh.bClient = aCli, bCli
	aDone := make(chan error, 1)
	go func() { aDone <- s.EstablishConnection("tcp", aSrv) }()
	if _, err := aCli.Write(connectBytes(t)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(aCli, ack); err != nil {
		t.Fatal(err)
	}
	a, ok := s.Clients.Get("tk")
	if !ok {
		t.Fatal("first connection not in Clients")
	}
	const filter = "$share/g/tk/+"
	sub := packets.Subscription{Filter: filter, Qos: 1}
	a.State.Subscriptions.Add(filter, sub)
	s.Topics.Subscribe(a.ID, sub)
	h.addRoute(a.ID, filter)

	bDone := make(chan error, 1)
	go func() { bDone <- s.EstablishConnection("tcp", bSrv) }()
	go func() { _, _ = bCli.Write(connectBytes(t)) }()
	for _, ch := range []chan error{aDone, bDone} {
		select {
		case err := <-ch:
			t.Logf("connection ended: %v", err)
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end")
		}
	}
	h.ConnectionEnded(aSrv)
	h.ConnectionEnded(bSrv) // as hooks.Listener does after EstablishConnection
	if n := len(s.Topics.Subscribers("tk/x").Shared); n != 0 || h.node.HasLocalRoute(filter) {
		t.Fatalf("no connection of tk is alive, yet the shared subscription is in mochi's index (%d groups) and routed (%v); latest entry kept: %v",
			n, h.node.HasLocalRoute(filter), h.latest["tk"] != nil)
	}
}

type allowAll struct{ mqtt.HookBase }

func (allowAll) ID() string { return "allow" }
func (allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (allowAll) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }
