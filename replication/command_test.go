package replication

import (
	"encoding/hex"
	"errors"
	"reflect"
	"testing"
)

// goldenCommands pins the wire format. If a case fails, an encoding
// changed: that breaks every raft log and snapshot on disk and every node of
// the previous version. Add a new command type instead (see CommandType).
var goldenCommands = []struct {
	name string
	cmd  Command
	hex  string
}{
	{
		name: "retain_set_minimal",
		cmd:  &RetainSet{Msg: RetainedMessage{Topic: "a/b", Payload: []byte("hi")}},
		hex:  "01" + "03612f62" + "026869" + "00" + "00" + "00" + "00" + "00" + "00" + "00" + "00",
	},
	{
		name: "retain_set_full",
		cmd: &RetainSet{Msg: RetainedMessage{
			Topic: "t", Payload: []byte{0xff}, QoS: 1, PayloadFormat: 1,
			ContentType: "ct", ResponseTopic: "rt", CorrelationData: []byte{1, 2},
			UserProperties: []UserProperty{{Key: "k", Value: "v"}, {Key: "k", Value: "w"}},
			Expires:        1_700_000_000_000, Created: -1,
			Index: 99, // not encoded
		}},
		hex: "01" + "0174" + "01ff" + "01" + "01" + "026374" + "027274" + "020102" +
			"02" + "016b" + "0176" + "016b" + "0177" + "80a0abfef962" + "01",
	},
	{
		name: "retain_clear",
		cmd:  &RetainClear{Topic: "a", IfIndex: 300},
		hex:  "02" + "0161" + "ac02",
	},
	{
		name: "claim_owner",
		cmd:  &ClaimOwner{ClientID: "c1", Node: "n1", At: 5},
		hex:  "03" + "026331" + "026e31" + "0a",
	},
	{
		name: "release_owner",
		cmd:  &ReleaseOwner{ClientID: "c1", Node: "n1", Epoch: 7},
		hex:  "04" + "026331" + "026e31" + "07",
	},
	{
		name: "reclaim_owner",
		cmd:  &ReclaimOwner{ClientID: "c1", Node: "n1", At: 5},
		hex:  "13" + "026331" + "026e31" + "0a",
	},
	{
		name: "publish_will",
		cmd:  &PublishWill{ClientID: "c1", IfOpened: 300, At: 5, MaxQueued: 1000},
		hex:  "15" + "026331" + "ac02" + "0a" + "e807",
	},
	{
		name: "takeover_will",
		cmd:  &TakeoverWill{ClientID: "c1", IfOpened: 300, At: 5, MaxQueued: 1000, EndsSession: true},
		hex:  "16" + "026331" + "ac02" + "0a" + "e807" + "01",
	},
	{
		name: "session_open_owe",
		cmd:  &SessionOpen{ClientID: "c1", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n1", At: 5, CleanStart: true, Fenced: true, IfOpened: 300, OweWill: true},
		hex:  "1c" + "026331" + "05" + "3c" + "026e31" + "0a" + "01" + "ac02" + "00",
	},
	{
		name: "session_open_as_of",
		cmd: &SessionOpen{ClientID: "c1", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n1", At: 5, Fenced: true,
			OweWill: true, AsOf: 300, HasAsOf: true},
		hex: "1e" + "026331" + "05" + "3c" + "026e31" + "0a" + "00" + "00" + "00" + "01" + "ac02",
	},
	{
		name: "owe_will",
		cmd:  &OweWill{ClientID: "c1", IfOpened: 300, Owner: "n2"},
		hex:  "1d" + "026331" + "ac02" + "026e32",
	},
	{
		name: "log_format",
		cmd:  &LogFormat{Version: 7},
		hex:  "1f" + "07",
	},
	{
		name: "departure",
		cmd:  &Departure{Server: "n1", At: 5},
		hex:  "99" + "026e31" + "0a", // skippable type 25
	},
	{
		name: "batch",
		cmd:  &Batch{Commands: []Command{&RetainClear{Topic: "a"}, &ReleaseOwner{ClientID: "c", Node: "n", Epoch: 1}}},
		hex:  "05" + "02" + "04" + "02016100" + "06" + "040163016e01",
	},
}

func TestCommandGoldenBytes(t *testing.T) {
	for _, tc := range goldenCommands {
		t.Run(tc.name, func(t *testing.T) {
			got := hex.EncodeToString(EncodeCommand(tc.cmd))
			if got != tc.hex {
				t.Fatalf("encoding changed (wire and disk format break!)\n got %s\nwant %s", got, tc.hex)
			}
			raw, _ := hex.DecodeString(tc.hex)
			dec, err := DecodeCommand(raw)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			want := tc.cmd
			if rs, ok := want.(*RetainSet); ok && rs.Msg.Index != 0 {
				cp := *rs
				cp.Msg.Index = 0
				want = &cp
			}
			if !reflect.DeepEqual(dec, want) {
				t.Fatalf("round trip:\n got %#v\nwant %#v", dec, want)
			}
		})
	}
}

// TestCommandTypeValues pins the type bytes themselves.
func TestCommandTypeValues(t *testing.T) {
	want := map[CommandType]byte{CmdRetainSet: 1, CmdRetainClear: 2, CmdClaimOwner: 3, CmdReleaseOwner: 4, CmdBatch: 5}
	for ct, b := range want {
		if byte(ct) != b {
			t.Errorf("%v = %d, want %d (append-only!)", ct, byte(ct), b)
		}
	}
	if subRaft != 1 || subRPC != 2 || rpcApply != 1 || rpcRemove != 2 || rpcStatus != 3 {
		t.Error("sub-protocol or rpc kind bytes changed (append-only!)")
	}
}

func TestDecodeCommandRejectsCorruption(t *testing.T) {
	valid := EncodeCommand(&RetainSet{Msg: RetainedMessage{Topic: "a/b", Payload: []byte("xyz"),
		UserProperties: []UserProperty{{"k", "v"}}}})
	// Every truncation must fail, never decode into something plausible.
	for i := 0; i < len(valid); i++ {
		if _, err := DecodeCommand(valid[:i]); !errors.Is(err, errCorrupt) {
			t.Fatalf("truncated at %d: err = %v, want errCorrupt", i, err)
		}
	}
	for name, b := range map[string][]byte{
		"trailing byte":     append(append([]byte(nil), valid...), 0),
		"unknown type":      {0x06, 0x00},
		"zero type":         {0x00},
		"nested batch":      {0x05, 0x01, 0x02, 0x05, 0x00},
		"huge length":       {0x02, 0xff, 0xff, 0xff, 0xff, 0x0f},
		"huge count":        {0x05, 0xff, 0xff, 0xff, 0xff, 0x0f},
		"bad release epoch": {0x04, 0x01, 'c', 0x01, 'n'},
	} {
		if _, err := DecodeCommand(b); !errors.Is(err, errCorrupt) {
			t.Errorf("%s: err = %v, want errCorrupt", name, err)
		}
	}
}

func TestDecodeSkippableUnknownCommand(t *testing.T) {
	c, err := DecodeCommand([]byte{0x86, 1, 2, 3})
	if err != nil || c != nil {
		t.Fatalf("skippable unknown: got %v, %v; want nil, nil", c, err)
	}
	// Inside a batch it is dropped, its neighbours kept.
	b := appendBatch(nil, [][]byte{{0x86, 9}, EncodeCommand(&RetainClear{Topic: "x"})})
	c, err = DecodeCommand(b)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.(*Batch).Commands; len(got) != 1 || got[0].(*RetainClear).Topic != "x" {
		t.Fatalf("batch with skippable: %#v", got)
	}
}

func TestAppendBatchMatchesEncodeCommand(t *testing.T) {
	cmds := []Command{&RetainClear{Topic: "a", IfIndex: 3}, &ClaimOwner{ClientID: "c", Node: "n", At: 1}}
	enc := [][]byte{EncodeCommand(cmds[0]), EncodeCommand(cmds[1])}
	if got, want := hex.EncodeToString(appendBatch(nil, enc)), hex.EncodeToString(EncodeCommand(&Batch{Commands: cmds})); got != want {
		t.Fatalf("appendBatch %s != EncodeCommand %s", got, want)
	}
}

func TestValidate(t *testing.T) {
	for name, c := range map[string]Command{
		"retain empty topic":    &RetainSet{Msg: RetainedMessage{Payload: []byte("x")}},
		"retain empty payload":  &RetainSet{Msg: RetainedMessage{Topic: "t"}},
		"retain qos 3":          &RetainSet{Msg: RetainedMessage{Topic: "t", Payload: []byte("x"), QoS: 3}},
		"retain format 2":       &RetainSet{Msg: RetainedMessage{Topic: "t", Payload: []byte("x"), PayloadFormat: 2}},
		"clear empty topic":     &RetainClear{},
		"claim empty client":    &ClaimOwner{Node: "n"},
		"claim empty node":      &ClaimOwner{ClientID: "c"},
		"release zero epoch":    &ReleaseOwner{ClientID: "c", Node: "n"},
		"batch nested":          &Batch{Commands: []Command{&Batch{}}},
		"batch nil command":     &Batch{Commands: []Command{nil}},
		"release empty client":  &ReleaseOwner{Node: "n", Epoch: 1},
		"release empty node":    &ReleaseOwner{ClientID: "c", Epoch: 1},
		"claim empty client/no": &ClaimOwner{},
	} {
		if err := c.validate(); !errors.Is(err, ErrInvalidCommand) {
			t.Errorf("%s: validate = %v, want ErrInvalidCommand", name, err)
		}
	}
}

func TestRPCResultAndErrorCodec(t *testing.T) {
	in := Result{Index: 7, Changed: true, Epoch: 3, Prev: Owner{Node: "n", Epoch: 2, Since: -5},
		Results: []Result{{Index: 7, Err: errors.Join(ErrInvalidCommand)}, {Index: 7, Changed: true}}}
	r := reader{b: appendResult(nil, &in)}
	out := r.result(0)
	if err := r.end(); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(out.Results[0].Err, ErrInvalidCommand) || out.Results[0].Err.Error() != ErrInvalidCommand.Error() {
		t.Fatalf("error lost: %v", out.Results[0].Err)
	}
	out.Results[0].Err, in.Results[0].Err = nil, nil
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("result round trip:\n got %#v\nwant %#v", out, in)
	}
	e := reader{b: appendError(nil, errors.Join(ErrTimeout, ErrUnknownOutcome))}
	err := e.error()
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, ErrUnknownOutcome) || errors.Is(err, ErrNoLeader) {
		t.Fatalf("sentinels lost: %v", err)
	}
	// An error without a message and without a known sentinel is still an
	// error, both ways (found by FuzzRPCFrame).
	e = reader{b: appendError(nil, errors.New(""))}
	if err := e.error(); err == nil || err.Error() != errNoMessage {
		t.Fatalf("message-less error encoded as %v", err)
	}
	e = reader{b: appendError(nil, &remoteError{msg: "", sentinels: nil})}
	if err := e.error(); err == nil {
		t.Fatal("message-less remote error re-encoded as success")
	}
	e = reader{b: []byte{0x80, 0x30, 0}} // unknown sentinel bits 11 and 12, no message
	if err := e.error(); err == nil || err.Error() != errNoMessage {
		t.Fatalf("unknown sentinel bits decoded as %v", err)
	}
}
