package node

import (
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// rawClient speaks MQTT 5 packet by packet, to see exactly what the broker
// sends (paho.golang's client hides acknowledgements).
type rawClient struct {
	t    *testing.T
	conn net.Conn
}

func rawConnect(t *testing.T, addr, id string, clean bool, expiry uint32) (*rawClient, *packets.Connack) {
	t.Helper()
	c, ack := rawConnectAnswer(t, addr, id, clean, expiry)
	if ack.ReasonCode != 0 {
		t.Fatalf("%s: CONNACK %+v", id, ack)
	}
	return c, ack
}

// rawConnectAnswer is rawConnect that returns a refusing CONNACK too.
func rawConnectAnswer(t *testing.T, addr, id string, clean bool, expiry uint32) (*rawClient, *packets.Connack) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: t, conn: conn}
	cp := packets.NewControlPacket(packets.CONNECT)
	cn := cp.Content.(*packets.Connect)
	cn.ClientID, cn.CleanStart, cn.KeepAlive = id, clean, 30
	if expiry > 0 {
		cn.Properties.SessionExpiryInterval = &expiry
	}
	c.send(cp)
	ack, ok := c.next().Content.(*packets.Connack)
	if !ok {
		t.Fatalf("%s: no CONNACK", id)
	}
	return c, ack
}

func (c *rawClient) send(cp *packets.ControlPacket) {
	c.t.Helper()
	_ = c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := cp.WriteTo(c.conn); err != nil {
		c.t.Fatalf("write %s: %v", cp.PacketType(), err)
	}
}

// next reads the next packet, failing the test after wait.
func (c *rawClient) next() *packets.ControlPacket {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(wait))
	cp, err := packets.ReadPacket(c.conn)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return cp
}

// expect reads the next packet and fails unless it has type typ.
func (c *rawClient) expect(typ byte) *packets.ControlPacket {
	c.t.Helper()
	cp := c.next()
	if cp.Type != typ {
		c.t.Fatalf("got %s, want packet type %d", cp, typ)
	}
	return cp
}

var testUserProps = []packets.User{{Key: "trace", Value: "abc"}}

func (c *rawClient) publish(topic string, qos byte, pid uint16, user []packets.User) {
	c.t.Helper()
	cp := packets.NewControlPacket(packets.PUBLISH)
	p := cp.Content.(*packets.Publish)
	p.Topic, p.QoS, p.PacketID, p.Payload = topic, qos, pid, []byte("x")
	p.Properties.User = user
	c.send(cp)
}

func (c *rawClient) subscribe(filter string, qos byte) {
	c.t.Helper()
	cp := packets.NewControlPacket(packets.SUBSCRIBE)
	s := cp.Content.(*packets.Subscribe)
	s.PacketID = 1
	s.Subscriptions = []packets.SubOptions{{Topic: filter, QoS: qos}}
	c.send(cp)
	if sa := c.expect(packets.SUBACK).Content.(*packets.Suback); len(sa.Reasons) != 1 || sa.Reasons[0] >= 0x80 {
		c.t.Fatalf("SUBACK %+v", sa)
	}
}

// ackResponse sends a PUBREC or PUBREL with user properties.
func (c *rawClient) ackResponse(typ byte, pid uint16) {
	c.t.Helper()
	cp := packets.NewControlPacket(typ)
	switch a := cp.Content.(type) {
	case *packets.Pubrec:
		a.PacketID = pid
		a.Properties.User = testUserProps
	case *packets.Pubrel:
		a.PacketID = pid
		a.Properties.User = testUserProps
	}
	c.send(cp)
}

// checkAck fails if an acknowledgement carries user properties or a reason
// code its packet type does not have (0x01/0x02 are SUBACK codes).
func checkAck(t *testing.T, cp *packets.ControlPacket) {
	t.Helper()
	var props *packets.Properties
	var code byte
	switch a := cp.Content.(type) {
	case *packets.Puback:
		props, code = a.Properties, a.ReasonCode
	case *packets.Pubrec:
		props, code = a.Properties, a.ReasonCode
	case *packets.Pubrel:
		props, code = a.Properties, a.ReasonCode
	case *packets.Pubcomp:
		props, code = a.Properties, a.ReasonCode
	default:
		t.Fatalf("not an acknowledgement: %s", cp)
	}
	if props != nil && len(props.User) > 0 {
		t.Fatalf("%s echoes user properties %v", cp.PacketType(), props.User)
	}
	if code != 0 && code != 0x10 && code < 0x80 {
		t.Fatalf("%s with reason code 0x%02x", cp.PacketType(), code)
	}
}

// TestAcksCarryNoUserProperties: PUBACK, PUBREC, PUBREL and PUBCOMP do not
// echo the user properties of the packet they acknowledge (Mosquitto does
// not; mochi copied them, with a SUBACK reason code, and the Eclipse Paho
// test client and Python paho rejected such acknowledgements). Both for a
// clean and a persistent publisher, and for the PUBREL sent to a clean
// QoS 2 subscriber whose PUBREC had user properties.
func TestAcksCarryNoUserProperties(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "ack-sub", true, 0)
	sub.subscribe("acks/#", 2)
	for _, persistent := range []bool{false, true} {
		var expiry uint32
		if persistent {
			expiry = 600
		}
		pub, _ := rawConnect(t, addr, "ack-pub", true, expiry)
		pub.publish("acks/1", 1, 10, testUserProps)
		checkAck(t, pub.expect(packets.PUBACK))
		pub.publish("acks/2", 2, 11, testUserProps)
		checkAck(t, pub.expect(packets.PUBREC))
		pub.ackResponse(packets.PUBREL, 11)
		checkAck(t, pub.expect(packets.PUBCOMP))
		_ = pub.conn.Close()
	}
	// The subscriber gets acks/1 (QoS 1) and acks/2 (QoS 2) twice, and a
	// PUBREL for each QoS 2 one (interleaved with later publishes).
	publishes, rels := 0, 0
	for publishes < 4 || rels < 2 {
		cp := sub.next()
		switch p := cp.Content.(type) {
		case *packets.Publish:
			publishes++
			switch p.QoS {
			case 1:
				ack := packets.NewControlPacket(packets.PUBACK)
				ack.Content.(*packets.Puback).PacketID = p.PacketID
				sub.send(ack)
			case 2:
				sub.ackResponse(packets.PUBREC, p.PacketID)
			}
		case *packets.Pubrel:
			rels++
			checkAck(t, cp)
			comp := packets.NewControlPacket(packets.PUBCOMP)
			comp.Content.(*packets.Pubcomp).PacketID = p.PacketID
			sub.send(comp)
		default:
			t.Fatalf("subscriber got %s", cp)
		}
	}
}
