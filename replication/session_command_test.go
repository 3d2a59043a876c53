package replication

import (
	"encoding/hex"
	"errors"
	"reflect"
	"testing"
)

func sessionGoldenCmds() []Command {
	props := Properties{PayloadFormat: 1, ContentType: "c", ResponseTopic: "r", CorrelationData: []byte{9},
		UserProperties: []UserProperty{{Key: "k", Value: "v"}}}
	return []Command{
		&SessionOpen{ClientID: "c1", ProtocolVersion: 5, ExpiryInterval: 300, Owner: "n1", At: 5, CleanStart: true},
		&SessionClose{ClientID: "c1", Owner: "n1", IfOpened: 7, At: -1, WillPublished: true, SetExpiry: true, ExpiryInterval: 1},
		&SessionDelete{ClientID: "c1", IfOpened: 300},
		&Subscribe{ClientID: "c", Subscriptions: []Subscription{{Filter: "a/#", QoS: 2, NoLocal: true,
			RetainAsPublished: true, RetainHandling: 2, Identifier: 200}}},
		&Unsubscribe{ClientID: "c", Filters: []string{"a", "b"}},
		&Enqueue{Topic: "t", Payload: []byte("p"), Properties: props, Expires: 1, Created: 2, MaxQueued: 1000,
			Policy: DropOldest, Targets: []QueueTarget{{ClientID: "a", QoS: 1}, {ClientID: "b", QoS: 2, Retain: true,
				SubscriptionIDs: []uint32{1, 300}}}},
		&Ack{ClientID: "c", UpTo: 3, Seqs: []uint64{5, 300}},
		&QueueRelease{ClientID: "c", Seq: 4, PacketID: 65535},
		&QoS2Received{ClientID: "c", PacketID: 1},
		&QoS2Released{ClientID: "c", PacketID: 300},
		&SetWill{ClientID: "c", Will: Will{Topic: "w", Payload: []byte("x"), QoS: 1, Retain: true, DelaySeconds: 10,
			ExpirySeconds: 60, Properties: Properties{ContentType: "c"}}},
		&ClearWill{ClientID: "c"},
		&ClaimWill{ClientID: "c", IfOpened: 300},
		&QoS2Publish{ClientID: "c", PacketID: 7, Enqueue: &Enqueue{Topic: "t", Payload: []byte("p"),
			Targets: []QueueTarget{{ClientID: "a", QoS: 2}}}},
	}
}

// goldenSession pins the wire format of the session commands, one per
// type, in type order (see goldenCommands for why).
var goldenSession = []string{
	"06" + "026331" + "05" + "ac02" + "026e31" + "0a" + "01",
	"07" + "026331" + "026e31" + "07" + "01" + "01" + "01" + "01",
	"08" + "026331" + "ac02",
	"09" + "0163" + "01" + "03612f23" + "02" + "01" + "01" + "02" + "c801",
	"0a" + "0163" + "02" + "0161" + "0162",
	"0b" + "0174" + "0170" + "01" + "0163" + "0172" + "0109" + "01" + "016b" + "0176" + "02" + "04" +
		"e807" + "01" + "02" + "0161" + "01" + "00" + "00" + "0162" + "02" + "01" + "02" + "01" + "ac02",
	"0c" + "0163" + "03" + "02" + "05" + "ac02",
	"0d" + "0163" + "04" + "ffff03",
	"0e" + "0163" + "01",
	"0f" + "0163" + "ac02",
	"10" + "0163" + "0177" + "0178" + "01" + "01" + "0a" + "3c" + "00" + "0163" + "00" + "00" + "00",
	"11" + "0163",
	"12" + "0163" + "ac02",
	// Type 20 follows 19 (ReclaimOwner, in goldenCommands).
	"14" + "0163" + "07" + "01" + "0174" + "0170" + "0000000000" + "00" + "00" + "00" + "00" +
		"01" + "0161" + "02" + "00" + "00",
}

func TestSessionCommandGoldenBytes(t *testing.T) {
	cmds := sessionGoldenCmds()
	if len(cmds) != len(goldenSession) {
		t.Fatal("one golden per command")
	}
	for i, c := range cmds {
		t.Run(c.Type().String(), func(t *testing.T) {
			want := 6 + i
			if want >= int(CmdReclaimOwner) { // 19 is not a session command
				want++
			}
			if byte(c.Type()) != byte(want) {
				t.Fatalf("%v = %d, want %d (append-only!)", c.Type(), byte(c.Type()), want)
			}
			got := hex.EncodeToString(EncodeCommand(c))
			if got != goldenSession[i] {
				t.Fatalf("encoding changed (wire and disk format break!)\n got %s\nwant %s", got, goldenSession[i])
			}
			if err := c.validate(); err != nil {
				t.Fatalf("golden command invalid: %v", err)
			}
			raw, _ := hex.DecodeString(goldenSession[i])
			dec, err := DecodeCommand(raw)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(dec, c) {
				t.Fatalf("round trip:\n got %#v\nwant %#v", dec, c)
			}
			// Every truncation fails, never decodes into something plausible.
			for j := 1; j < len(raw); j++ {
				if _, err := DecodeCommand(raw[:j]); !errors.Is(err, errCorrupt) {
					t.Fatalf("truncated at %d: %v", j, err)
				}
			}
			if _, err := DecodeCommand(append(raw, 0)); !errors.Is(err, errCorrupt) {
				t.Fatalf("trailing byte: %v", err)
			}
		})
	}
}

// TestQoS2PublishIfGolden pins type 23, QoS2Publish with IfOpened (type
// 20 without it stays as it was, in goldenSession).
func TestQoS2PublishIfGolden(t *testing.T) {
	c := &QoS2Publish{ClientID: "c", PacketID: 7, IfOpened: 300}
	const want = "17" + "0163" + "07" + "00" + "ac02"
	if got := hex.EncodeToString(EncodeCommand(c)); got != want {
		t.Fatalf("encoding changed (wire and disk format break!)\n got %s\nwant %s", got, want)
	}
	raw, _ := hex.DecodeString(want)
	dec, err := DecodeCommand(raw)
	if err != nil || !reflect.DeepEqual(dec, c) {
		t.Fatalf("round trip: %#v, %v", dec, err)
	}
	zero, _ := hex.DecodeString("17" + "0163" + "07" + "00" + "00")
	if _, err := DecodeCommand(zero); !errors.Is(err, errCorrupt) {
		t.Fatalf("type 23 with IfOpened 0 decoded: %v", err)
	}
}

func TestSessionCommandsInBatch(t *testing.T) {
	b := &Batch{Commands: sessionGoldenCmds()}
	dec, err := DecodeCommand(EncodeCommand(b))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(dec, b) {
		t.Fatal("batch of session commands does not round trip")
	}
}

func TestDecodeSessionOutOfRange(t *testing.T) {
	for name, b := range map[string][]byte{
		"packet id > 65535":  {0x0e, 0x01, 'c', 0x80, 0x80, 0x04},
		"expiry > 2^32-1":    {0x06, 0x01, 'c', 0x05, 0x80, 0x80, 0x80, 0x80, 0x10, 0x01, 'n', 0x00, 0x00},
		"bad bool":           {0x06, 0x01, 'c', 0x05, 0x00, 0x01, 'n', 0x00, 0x02},
		"unknown type 22":    {0x16, 0x00},
		"huge target count":  {0x0b, 0x01, 't', 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x03},
		"huge subscriptions": {0x09, 0x01, 'c', 0xff, 0xff, 0x03},
	} {
		if _, err := DecodeCommand(b); !errors.Is(err, errCorrupt) {
			t.Errorf("%s: err = %v, want errCorrupt", name, err)
		}
	}
}

func TestValidateSessionCommands(t *testing.T) {
	tgt := []QueueTarget{{ClientID: "a", QoS: 1}}
	for name, c := range map[string]Command{
		"open empty client":       &SessionOpen{Owner: "n", ProtocolVersion: 4},
		"open empty owner":        &SessionOpen{ClientID: "c", ProtocolVersion: 4},
		"open version 6":          &SessionOpen{ClientID: "c", Owner: "n", ProtocolVersion: 6},
		"close empty owner":       &SessionClose{ClientID: "c"},
		"delete empty":            &SessionDelete{},
		"subscribe none":          &Subscribe{ClientID: "c"},
		"subscribe qos 3":         &Subscribe{ClientID: "c", Subscriptions: []Subscription{{Filter: "a", QoS: 3}}},
		"subscribe empty filter":  &Subscribe{ClientID: "c", Subscriptions: []Subscription{{}}},
		"subscribe rh 3":          &Subscribe{ClientID: "c", Subscriptions: []Subscription{{Filter: "a", RetainHandling: 3}}},
		"unsubscribe none":        &Unsubscribe{ClientID: "c"},
		"enqueue empty topic":     &Enqueue{Targets: tgt},
		"enqueue no targets":      &Enqueue{Topic: "t"},
		"enqueue bad policy":      &Enqueue{Topic: "t", Targets: tgt, Policy: 2},
		"enqueue bad format":      &Enqueue{Topic: "t", Targets: tgt, Properties: Properties{PayloadFormat: 2}},
		"enqueue target qos 3":    &Enqueue{Topic: "t", Targets: []QueueTarget{{ClientID: "a", QoS: 3}}},
		"enqueue empty target":    &Enqueue{Topic: "t", Targets: []QueueTarget{{}}},
		"enqueue duplicate":       &Enqueue{Topic: "t", Targets: []QueueTarget{{ClientID: "a"}, {ClientID: "a"}}},
		"ack nothing":             &Ack{ClientID: "c"},
		"release zero seq":        &QueueRelease{ClientID: "c", PacketID: 1},
		"release zero packet id":  &QueueRelease{ClientID: "c", Seq: 1},
		"qos2 received pid 0":     &QoS2Received{ClientID: "c"},
		"qos2 released pid 0":     &QoS2Released{ClientID: "c"},
		"will empty topic":        &SetWill{ClientID: "c"},
		"claim will empty":        &ClaimWill{IfOpened: 1},
		"claim will if_opened 0":  &ClaimWill{ClientID: "c"},
		"will qos 3":              &SetWill{ClientID: "c", Will: Will{Topic: "w", QoS: 3}},
		"will bad payload format": &SetWill{ClientID: "c", Will: Will{Topic: "w", Properties: Properties{PayloadFormat: 7}}},
		"clear will empty":        &ClearWill{},
	} {
		if err := c.validate(); !errors.Is(err, ErrInvalidCommand) {
			t.Errorf("%s: validate = %v, want ErrInvalidCommand", name, err)
		}
	}
}

func TestRPCResultCarriesSessionFields(t *testing.T) {
	in := Result{Index: 9, Changed: true, Present: true, Seqs: []uint64{0, 7, 300}, Dropped: 2,
		Results: []Result{{Index: 9, Seqs: []uint64{1}, Dropped: 1}}}
	r := reader{b: appendResult(nil, &in)}
	out := r.result(0)
	if err := r.end(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("result round trip:\n got %#v\nwant %#v", out, in)
	}
	e := reader{b: appendError(nil, errors.Join(ErrInvalidCommand, ErrNoSession))}
	if err := e.error(); !errors.Is(err, ErrNoSession) || !errors.Is(err, ErrInvalidCommand) {
		t.Fatalf("ErrNoSession lost on the wire: %v", err)
	}
}

func TestSessionOpenIfGolden(t *testing.T) {
	c := &SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n1", At: 2, CleanStart: true,
		Fenced: true, IfOpened: 300}
	const want = "18" + "0163" + "05" + "3c" + "026e31" + "04" + "01" + "ac02" + "00"
	if got := hex.EncodeToString(EncodeCommand(c)); got != want {
		t.Fatalf("encoding changed (wire and disk format break!)\n got %s\nwant %s", got, want)
	}
	raw, _ := hex.DecodeString(want)
	if dec, err := DecodeCommand(raw); err != nil || !reflect.DeepEqual(dec, c) {
		t.Fatalf("round trip: %#v, %v", dec, err)
	}
	c.Will = &Will{Topic: "w", Payload: []byte("x"), QoS: 1}
	if dec, err := DecodeCommand(EncodeCommand(c)); err != nil || !reflect.DeepEqual(dec, c) {
		t.Fatalf("round trip with a will: %#v, %v", dec, err)
	}
	unfenced := &SessionOpen{ClientID: "c", ProtocolVersion: 5, Owner: "n1", Will: c.Will}
	if err := unfenced.validate(); !errors.Is(err, ErrInvalidCommand) {
		t.Fatalf("a will in an unfenced open: %v", err)
	}
}
