package hooks

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// Acknowledgements of the pump's deliveries, turned into log writes.

// OnPacketRead turns a client's acknowledgements of messages the pump sent
// into log writes (before mochi processes the packet; mochi's own
// inflight bookkeeping cannot tell our deliveries from its own).
//
// The two QoS 2 packets after which the client forgets a packet id are
// held back until the log knows: PUBREL (sent by us after PUBREC) and
// PUBCOMP (sent by us after the client's PUBREL). If the node died after
// sending one but before the log recorded the step, the next node would
// resend a PUBLISH the client no longer recognises (a duplicate), or treat
// the client's next message under that packet id as a duplicate (a loss).
// So PUBREL is sent (by us) only once QueueRelease is committed, and the
// client's PUBREL is handed to mochi (InjectPacket) only once QoS2Released
// is.
func (h *Sessions) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	switch pk.FixedHeader.Type {
	case packets.Puback, packets.Pubrec, packets.Pubcomp, packets.Pubrel:
	default:
		return pk, nil
	}
	c := h.conn(cl)
	if c == nil || !c.managed || c.pump == nil {
		return pk, nil
	}
	switch pk.FixedHeader.Type {
	case packets.Puback, packets.Pubcomp:
		if c.pump.acked(pk.PacketID) {
			return ignoredPacket, nil
		}
	case packets.Pubrec:
		seq, ok := c.pump.seqOf(pk.PacketID)
		if !ok {
			return pk, nil // not a pump delivery: mochi's own
		}
		if pk.ReasonCode >= 0x80 {
			c.pump.acked(pk.PacketID) // refused by the client: the message ends here
			return ignoredPacket, nil
		}
		id, pid := c.id, pk.PacketID
		h.submit(sessOp{cmd: func() replication.Command { return &replication.QueueRelease{ClientID: id, Seq: seq, PacketID: pid} },
			done: func(_ replication.Result, err error) {
				if err != nil {
					// The exchange would hold a delivery slot for ever:
					// drop the connection, the client repeats PUBREC when
					// it resumes the session.
					h.log.Warn("PUBREC not replicated; disconnecting so that the client repeats it", "client", id, "error", err)
					h.drop(c, stepNotReplicated)
					return
				}
				rel := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: pid}
				go func() { _ = cl.WritePacket(rel) }()
			}})
		return ignoredPacket, nil
	case packets.Pubrel:
		id, pid := c.id, pk.PacketID
		held := pk
		h.submit(sessOp{cmd: func() replication.Command { return &replication.QoS2Released{ClientID: id, PacketID: pid} },
			done: func(_ replication.Result, err error) { h.handBack(c, held, err) }})
		return ignoredPacket, nil
	}
	return pk, nil
}

// ignoredPacket replaces a packet consumed in OnPacketRead (an OnPacketRead
// error would end the connection): mochi looks up packet id 0 among its
// in-flight messages, finds nothing, and moves on.
var ignoredPacket = packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}}

// handBack gives mochi a PUBREL held back by OnPacketRead once
// the log has recorded it. If it could not be recorded (the writer retried
// for a while) the connection is dropped: the client repeats the PUBREL
// when it resumes the session, and until then the packet id stays taken.
func (h *Sessions) handBack(c *sessConn, pk packets.Packet, err error) {
	if err != nil {
		h.log.Warn("QoS 2 step not replicated; disconnecting so that the client repeats it", "client", c.id,
			"packet", pk.FixedHeader.Type, "error", err)
		h.drop(c, stepNotReplicated)
		return
	}
	go func() { _ = h.server.InjectPacket(c.cl, pk) }()
}

// stepNotReplicated ends a connection whose QoS 2 step the log could not
// record.
var stepNotReplicated = packets.Code{Code: packets.ErrUnspecifiedError.Code,
	Reason: "QoS 2 state could not be stored in the cluster's log; resume the session"}
