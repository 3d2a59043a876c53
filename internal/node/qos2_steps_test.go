package node

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

// publishExpiring publishes one QoS 2 message with a message expiry.
func publishExpiring(t *testing.T, tc *testCluster, node, topic string, expiry uint32) {
	t.Helper()
	pub := tc.client(node, "q2s-pub-"+topic)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 2, Payload: []byte("m"),
		Properties: &paho.PublishProperties{MessageExpiry: &expiry}}); err != nil {
		t.Fatal(err)
	}
}

// TestExpiredMessagePastPubrecGetsPubrel: once the subscriber has sent
// PUBREC, the message is past expiry's reach (MQTT-3.3.2-5 discards only
// messages not yet delivered): the client holds its packet id until
// PUBREL, so a resumed session must get PUBREL for it even after the
// expiry passed. Dropping the expired message instead (as a queued one)
// left the client's packet id in use for ever.
func TestExpiredMessagePastPubrecGetsPubrel(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "q2s-exp", false, 300)
	sub.subscribe("q2s/exp", 2)
	publishExpiring(t, tc, "n1", "q2s/exp", 1)
	p, ok := sub.expect(packets.PUBLISH).Content.(*packets.Publish)
	if !ok || p.QoS != 2 {
		t.Fatalf("PUBLISH %+v", p)
	}
	sub.ackResponse(packets.PUBREC, p.PacketID)
	if rel := sub.expect(packets.PUBREL).Content.(*packets.Pubrel); rel.PacketID != p.PacketID {
		t.Fatalf("PUBREL for %d, want %d", rel.PacketID, p.PacketID)
	}
	// Gone before PUBCOMP, back after the message's expiry passed (the
	// condition is time itself).
	_ = sub.conn.Close()
	time.Sleep(1500 * time.Millisecond)
	again, ack := rawConnect(t, addr, "q2s-exp", false, 300)
	if !ack.SessionPresent {
		t.Fatal("session not present")
	}
	cp := again.next()
	rel, ok := cp.Content.(*packets.Pubrel)
	if !ok || rel.PacketID != p.PacketID {
		t.Fatalf("got %s after the resume, want PUBREL %d", cp, p.PacketID)
	}
	comp := packets.NewControlPacket(packets.PUBCOMP)
	comp.Content.(*packets.Pubcomp).PacketID = p.PacketID
	again.send(comp)
	// Completed: nothing more is sent for it.
	_ = again.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if cp, err := packets.ReadPacket(again.conn); err == nil {
		t.Fatalf("after PUBCOMP: %s", cp)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("after PUBCOMP: %v", err)
	}
}

// TestPubrecNotReplicatedDropsTheConnection: a PUBREC's QueueRelease that
// cannot be committed (no quorum) must not leave the exchange holding a
// delivery slot for ever (after max_inflight of them the session stops
// receiving): the node drops the connection, and the client repeats
// PUBREC when it resumes.
func TestPubrecNotReplicatedDropsTheConnection(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	_, follower := tc.leaderAndFollower(t)
	addr := tc.nodes[follower].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "q2s-rel", false, 300)
	sub.subscribe("q2s/rel", 2)
	publishExpiring(t, tc, follower, "q2s/rel", 600)
	p := sub.expect(packets.PUBLISH).Content.(*packets.Publish)
	// The two other nodes go: no quorum for the PUBREC's QueueRelease.
	for id := range tc.nodes {
		if id != follower {
			tc.stop(id)
		}
	}
	sub.ackResponse(packets.PUBREC, p.PacketID)
	_ = sub.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		cp, err := packets.ReadPacket(sub.conn)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("the connection is still open 20 s after a PUBREC the log could not take")
			}
			break // dropped: the client will repeat PUBREC
		}
		if cp.Type == packets.PUBREL {
			t.Fatal("PUBREL sent although the release is not in the log")
		}
		if cp.Type == packets.DISCONNECT {
			break
		}
	}
}
