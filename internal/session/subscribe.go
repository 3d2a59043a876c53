package session

import "github.com/mqtt-ha/broker/replication"

// A persistent session's subscriptions live in the log, never in mochi's
// topic index (hooks/session_subscribe.go): the hooks decide each filter
// of a SUBSCRIBE as mochi would, commit the granted ones, and write the
// reason codes into mochi's SUBACK.

// SUBACK reason codes (MQTT 5 3.9.3; 3.1.1 knows 0x80 as its only
// failure).
const (
	codeGrantedQoS2   = 0x02
	codeUnspecified   = 0x80
	codeNotAuthorized = 0x87
	codeFilterInvalid = 0x8F
)

// SubscribeCode is the SUBACK reason code of one filter of a persistent
// session's SUBSCRIBE: valid (a valid topic filter), allowed (the ACL
// lets the client read it; not asked for an invalid filter), obscure
// (mochi's ObscureNotAuthorized), the QoS asked and the server's maximum,
// and the client's protocol version. ok reports whether the filter is
// subscribed, with QoS granted.
func SubscribeCode(valid, allowed, obscure bool, qos, maxQoS, version byte) (code, granted byte, ok bool) {
	switch {
	case !valid:
		code = codeFilterInvalid
	case !allowed:
		code = codeNotAuthorized
		if obscure {
			code = codeUnspecified
		}
	default:
		granted, ok = min(qos, maxQoS), true
		code = granted
	}
	if code > codeGrantedQoS2 && version < 5 {
		code = codeUnspecified
	}
	return code, granted, ok
}

// Suback is a SUBACK being built: Codes for every filter of the
// SUBSCRIBE, and the positions (Mochi) of the filters left to mochi
// (shared subscriptions), whose codes come from mochi's own SUBACK.
type Suback struct {
	Codes []byte
	Mochi []int
}

// Merge fills the positions left to mochi with fromMochi's codes, in
// order, and returns the SUBACK's codes (Codes, updated in place).
func (p *Suback) Merge(fromMochi []byte) []byte {
	out := p.Codes
	for j, pos := range p.Mochi {
		if j < len(fromMochi) {
			out[pos] = fromMochi[j]
		}
	}
	return out
}

// ChunkCommands splits enqueues into groups of at most budget payload
// bytes (each command counts 256 bytes plus an Enqueue's payload and
// topic; at least one command per group).
func ChunkCommands(cmds []replication.Command, budget int) [][]replication.Command {
	var out [][]replication.Command
	var cur []replication.Command
	size := 0
	for _, c := range cmds {
		n := 256
		if e, ok := c.(*replication.Enqueue); ok {
			n += len(e.Payload) + len(e.Topic)
		}
		if len(cur) > 0 && size+n > budget {
			out = append(out, cur)
			cur, size = nil, 0
		}
		cur = append(cur, c)
		size += n
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}
