package cluster

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/mqtt-ha/broker/internal/fuzzutil"
)

func goldenMessage() (*Message, []string) {
	return &Message{
		Topic:            "a/b",
		Payload:          []byte("hi"),
		QoS:              1,
		Retain:           true,
		MessageExpiry:    300,
		PayloadFormat:    1,
		PayloadFormatSet: true,
		ContentType:      "text/plain",
		ResponseTopic:    "r",
		CorrelationData:  []byte{0xC0},
		UserProperties:   []UserProperty{{Key: "k", Value: "v"}},
		OriginClient:     "c1",
	}, []string{"$share/g/a/+"}
}

// goldenFrame is the protocol-version-1 encoding of goldenMessage. If this
// test breaks, the wire format changed: bump ProtocolVersion.
const goldenFrame = "00000030" + // N = 48
	"01" + // framePublish
	"0d" + // flags: QoS 1 | retain | payload format present
	"03612f62" + // topic "a/b"
	"ac02" + // expiry 300
	"01" + // payload format 1
	"0a746578742f706c61696e" + // content type "text/plain"
	"0172" + // response topic "r"
	"01c0" + // correlation data
	"01" + "016b" + "0176" + // 1 user property k=v
	"026331" + // origin client "c1"
	"01" + "0c2473686172652f672f612f2b" + // 1 shared group "$share/g/a/+"
	"6869" // payload "hi"

func TestFrameGoldenBytes(t *testing.T) {
	m, shared := goldenMessage()
	got := appendPublishFrame(nil, m, shared)
	if h := hex.EncodeToString(got); h != goldenFrame {
		t.Fatalf("encoding changed:\n got  %s\n want %s", h, goldenFrame)
	}
	if n := frameLenSize + publishBodyLen(m, shared); n != len(got) {
		t.Fatalf("publishBodyLen predicts %d bytes, encoder wrote %d", n, len(got))
	}
	raw, _ := hex.DecodeString(goldenFrame)
	dec, err := decodeFrame(raw[frameLenSize:])
	if err != nil {
		t.Fatal(err)
	}
	want := *m
	want.Shared = shared
	want.received = true
	if !reflect.DeepEqual(*dec, want) {
		t.Fatalf("decoded %+v\nwant    %+v", *dec, want)
	}
}

func TestFrameRoundTripMinimal(t *testing.T) {
	m := &Message{Topic: "t"}
	b := appendPublishFrame(nil, m, nil)
	if hex.EncodeToString(b) != "0000000b"+"01"+"00"+"0174"+"00"+"00"+"00"+"00"+"00"+"00"+"00" {
		t.Fatalf("minimal frame = %x", b)
	}
	dec, err := decodeFrame(b[frameLenSize:])
	if err != nil {
		t.Fatal(err)
	}
	if dec.Topic != "t" || dec.Payload != nil || dec.QoS != 0 || dec.PayloadFormatSet || !dec.received {
		t.Fatalf("decoded %+v", dec)
	}
}

func TestGossipGoldenBytes(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"delta", appendDelta(nil, routeDelta{Node: "n1", Incarnation: 5, Version: 2, Op: opAdd, Filter: "a/#"}),
			"01" + "01" + "05" + "02" + "026e31" + "03612f23"},
		{"state", appendState(nil, []nodeRoutes{{Node: "n1", Incarnation: 5, Version: 2, Filters: []string{"a"}}}),
			"01" + "01" + "026e31" + "05" + "02" + "01" + "0161"},
		{"meta", appendMeta(nil, nodeMeta{Proto: 1, NodeID: "n1", AdvertiseHost: "h", ClusterPort: 7947, MQTTPort: 1883, App: []byte{9}}),
			"01" + "01" + "1f0b" + "075b" + "0168" + "026e31" + "0109"},
		{"leave", appendLeave(nil, "n1"), "02" + "026e31"},
		{"head", appendHead(nil, "n1", 5, 300), "03" + "05" + "ac02" + "026e31"},
	}
	for _, tt := range tests {
		if h := hex.EncodeToString(tt.got); h != tt.want {
			t.Errorf("%s: got %s, want %s", tt.name, h, tt.want)
		}
	}
	d, err := decodeDelta(tests[0].got)
	if err != nil || d != (routeDelta{Node: "n1", Incarnation: 5, Version: 2, Op: opAdd, Filter: "a/#"}) {
		t.Errorf("delta round trip: %+v %v", d, err)
	}
	if node, err := decodeLeave(tests[3].got); err != nil || node != "n1" {
		t.Errorf("leave round trip: %q %v", node, err)
	}
	if node, inc, ver, err := decodeHead(tests[4].got); err != nil || node != "n1" || inc != 5 || ver != 300 {
		t.Errorf("head round trip: %q %d %d %v", node, inc, ver, err)
	}
	md, err := decodeMeta(tests[2].got)
	if err != nil || !reflect.DeepEqual(md, nodeMeta{Proto: 1, NodeID: "n1", AdvertiseHost: "h", ClusterPort: 7947, MQTTPort: 1883, App: []byte{9}}) {
		t.Errorf("meta round trip: %+v %v", md, err)
	}
}

// TestDecodersRejectTruncation cuts every encoding at every length: each
// decoder must return an error (never panic, never accept a half message).
func TestDecodersRejectTruncation(t *testing.T) {
	m, shared := goldenMessage()
	frame := appendPublishFrame(nil, m, shared)
	body := frame[frameLenSize:]
	headerLen := len(body) - len(m.Payload)
	for i := 0; i < headerLen; i++ {
		if _, err := decodeFrame(body[:i]); !errors.Is(err, ErrBadFrame) {
			t.Fatalf("frame cut at %d/%d: err = %v", i, headerLen, err)
		}
	}
	delta := appendDelta(nil, routeDelta{Node: "n1", Incarnation: 1 << 40, Version: 300, Op: opRemove, Filter: "x/y"})
	for i := 0; i < len(delta); i++ {
		if _, err := decodeDelta(delta[:i]); err == nil {
			t.Fatalf("delta cut at %d decoded", i)
		}
	}
	state := appendState(nil, []nodeRoutes{{Node: "n1", Incarnation: 9, Version: 3, Filters: []string{"a", "b/#"}}, {Node: "n2", Incarnation: 1, Version: 1}})
	for i := 0; i < len(state); i++ {
		if _, err := decodeState(state[:i]); err == nil {
			t.Fatalf("state cut at %d decoded", i)
		}
	}
	for _, b := range [][]byte{appendLeave(nil, "node"), appendHead(nil, "node", 1<<40, 7)} {
		for i := 0; i < len(b); i++ {
			_, err1 := decodeLeave(b[:i])
			_, _, _, err2 := decodeHead(b[:i])
			if err1 == nil || err2 == nil {
				t.Fatalf("leave/head cut at %d decoded", i)
			}
		}
	}
	meta := appendMeta(nil, nodeMeta{Proto: 1, NodeID: "node", AdvertiseHost: "host", ClusterPort: 1, MQTTPort: 2})
	for i := 0; i < len(meta); i++ {
		if _, err := decodeMeta(meta[:i]); err == nil {
			t.Fatalf("meta cut at %d decoded", i)
		}
	}
}

func TestDecodeFrameRejectsBadInput(t *testing.T) {
	cases := map[string][]byte{
		"empty":          {},
		"unknown type":   {9, 0, 1, 't'},
		"reserved flags": {1, 0x10, 1, 't', 0, 0, 0, 0, 0, 0, 0},
		"qos 3":          {1, 0x03, 1, 't', 0, 0, 0, 0, 0, 0, 0},
		"wildcard topic": {1, 0, 1, '#', 0, 0, 0, 0, 0, 0, 0},
		"empty topic":    {1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		"huge count":     {1, 0, 1, 't', 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f},
		"huge string":    {1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f},
		"varint overrun": {1, 0, 1, 't', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
	}
	for name, b := range cases {
		if _, err := decodeFrame(b); !errors.Is(err, ErrBadFrame) {
			t.Errorf("%s: err = %v, want ErrBadFrame", name, err)
		}
	}
}

// TestDecodersSurviveJunk feeds random bytes and random mutations of valid
// encodings to every decoder: errors are fine, panics are not.
func TestDecodersSurviveJunk(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	m, shared := goldenMessage()
	valid := [][]byte{
		appendPublishFrame(nil, m, shared)[frameLenSize:],
		appendDelta(nil, routeDelta{Node: "n1", Incarnation: 5, Version: 2, Op: opAdd, Filter: "a/#"}),
		appendState(nil, []nodeRoutes{{Node: "n1", Incarnation: 5, Version: 2, Filters: []string{"a"}}}),
		appendMeta(nil, nodeMeta{Proto: 1, NodeID: "n1", AdvertiseHost: "h", ClusterPort: 1, MQTTPort: 2}),
	}
	for i := 0; i < 20000; i++ {
		var b []byte
		if i%2 == 0 {
			b = make([]byte, r.IntN(64))
			for j := range b {
				b[j] = byte(r.UintN(256))
			}
		} else {
			b = bytes.Clone(valid[r.IntN(len(valid))])
			for k := 0; k < 1+r.IntN(3); k++ {
				b[r.IntN(len(b))] = byte(r.UintN(256))
			}
		}
		_, _ = decodeFrame(b)
		_, _ = decodeDelta(b)
		_, _ = decodeState(b)
		_, _ = decodeMeta(b)
		_, _ = decodeLeave(b)
		_, _, _, _ = decodeHead(b)
	}
}

// checkReencoding checks a decoder against its encoder: decoding the
// re-encoding gives the same value, and the re-encoding is the input
// itself unless the input padded a varint (the only non-canonical form the
// decoders accept), which can only make it longer.
func checkReencoding(t *testing.T, what string, in, enc []byte, v any, redecode func([]byte) (any, error)) {
	t.Helper()
	if len(enc) > len(in) || len(enc) == len(in) && !bytes.Equal(enc, in) {
		t.Fatalf("%s: %x re-encodes as %x", what, in, enc)
	}
	again, err := redecode(enc)
	if err != nil || !reflect.DeepEqual(again, v) {
		t.Fatalf("%s: round trip changed %+v into %+v (%v)", what, v, again, err)
	}
}

// FuzzDecodeFrame: a forwarding frame body decodes to a message that
// re-encodes canonically, and decoding allocates at most a constant
// factor of the body (Payload and CorrelationData alias it).
func FuzzDecodeFrame(f *testing.F) {
	m, shared := goldenMessage()
	f.Add(appendPublishFrame(nil, m, shared)[frameLenSize:])
	f.Add([]byte{1, 0, 1, 't', 0, 0, 0, 0, 0, 0, 0})
	f.Add(appendPublishFrame(nil, &Message{Topic: "$SYS/x", QoS: 2, Payload: []byte{0}, UserProperties: []UserProperty{{}, {"k", ""}}}, []string{"$share/a/#", "$share/b/+"})[frameLenSize:])
	f.Fuzz(func(t *testing.T, b []byte) {
		var dec *Message
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(b), 32), func() { dec, err = decodeFrame(b) })
		if err != nil {
			if dec != nil || !errors.Is(err, ErrBadFrame) {
				t.Fatalf("decodeFrame = %+v, %v", dec, err)
			}
			return
		}
		enc := appendPublishFrame(nil, dec, dec.Shared)
		if n := binary.BigEndian.Uint32(enc); int(n) != len(enc)-frameLenSize {
			t.Fatalf("frame length %d, body %d bytes", n, len(enc)-frameLenSize)
		}
		checkReencoding(t, "frame", b, enc[frameLenSize:], dec, func(e []byte) (any, error) { return decodeFrame(e) })
	})
}

// FuzzDecodeGossip runs every gossip decoder (memberlist user messages,
// push/pull state, node metadata) on the input: whatever decodes
// re-encodes canonically, and no decoder allocates more than a constant
// factor of its input. (FuzzRouteGossip feeds decoded messages to a route
// table.)
func FuzzDecodeGossip(f *testing.F) {
	f.Add(appendDelta(nil, routeDelta{Node: "n1", Incarnation: 5, Version: 2, Op: opAdd, Filter: "a/#"}))
	f.Add(appendState(nil, []nodeRoutes{{Node: "n1", Incarnation: 5, Version: 2, Filters: []string{"a"}}, {Node: "n2"}}))
	f.Add(appendMeta(nil, nodeMeta{Proto: 1, NodeID: "n1", AdvertiseHost: "h", ClusterPort: 7947, MQTTPort: 1883, App: []byte{1, 3, 0}}))
	f.Add(appendLeave(nil, "n1"))
	f.Add(appendHead(nil, "n1", 1<<62, 300))
	f.Fuzz(func(t *testing.T, b []byte) {
		var (
			delta            routeDelta
			state            []nodeRoutes
			meta             nodeMeta
			leave, head      string
			inc, ver         uint64
			errD, errS, errM error
			errL, errH       error
		)
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(b), 64), func() {
			delta, errD = decodeDelta(b)
			state, errS = decodeState(b)
			meta, errM = decodeMeta(b)
			leave, errL = decodeLeave(b)
			head, inc, ver, errH = decodeHead(b)
		})
		if errD == nil {
			checkReencoding(t, "delta", b, appendDelta(nil, delta), delta, func(e []byte) (any, error) { return decodeDelta(e) })
		}
		if errS == nil {
			checkReencoding(t, "state", b, appendState(nil, state), state, func(e []byte) (any, error) { return decodeState(e) })
		}
		if errM == nil {
			checkReencoding(t, "meta", b, appendMeta(nil, meta), meta, func(e []byte) (any, error) { return decodeMeta(e) })
		}
		if errL == nil {
			checkReencoding(t, "leave", b, appendLeave(nil, leave), leave, func(e []byte) (any, error) { return decodeLeave(e) })
		}
		if errH == nil {
			type h struct {
				node     string
				inc, ver uint64
			}
			checkReencoding(t, "head", b, appendHead(nil, head, inc, ver), h{head, inc, ver}, func(e []byte) (any, error) {
				n, i, v, err := decodeHead(e)
				return h{n, i, v}, err
			})
		}
	})
}
