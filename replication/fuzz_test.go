package replication

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"testing"

	"github.com/mqtt-ha/broker/internal/fuzzutil"
)

// Fuzz targets for what this package decodes from a log, a snapshot or a
// peer: commands (DecodeCommand, never FSM.Apply: an undecodable entry
// already committed must stop the node, see DESIGN.md), snapshots
// (readSnapshot through FSM.Restore), forwarding RPC frames and replies,
// and the will matcher. `go test` runs their seeds; `make fuzz` runs each
// one for FUZZTIME.

// allCommands is one command of every type, with every field set.
func allCommands() []Command {
	cmds := sessionGoldenCmds()
	for _, g := range goldenCommands {
		cmds = append(cmds, g.cmd)
	}
	return cmds
}

// FuzzDecodeCommand: whatever DecodeCommand accepts re-encodes to the
// same bytes (or shorter ones, when the input padded a varint or a batch
// carried a skippable command) and decodes again to the same command; a
// failure wraps errCorrupt, and the leader refuses the same bytes as a
// forwarded entry with a domain error; validate never panics and wraps
// ErrInvalidCommand; decoding allocates at most a constant factor of the
// input whatever its counts claim.
func FuzzDecodeCommand(f *testing.F) {
	for _, c := range allCommands() {
		f.Add(EncodeCommand(c))
	}
	f.Add(EncodeCommand(&Batch{Commands: sessionGoldenCmds()}))
	f.Add([]byte{0x96, 1, 2, 3})                             // skippable unknown type
	f.Add([]byte{byte(CmdBatch), 2, 1, 0x96, 2, 0x11, 0})    // a batch with a skippable command
	f.Add([]byte{byte(CmdAck), 1, 'c', 1, 0xff, 0xff, 0x7f}) // a count far beyond the input
	f.Fuzz(func(t *testing.T, b []byte) {
		var c Command
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(b), 64), func() { c, err = DecodeCommand(b) })
		if err != nil {
			if c != nil || !errors.Is(err, errCorrupt) {
				t.Fatalf("DecodeCommand = %v, %v", c, err)
			}
			if _, _, ferr := decodeForwarded(b); !errors.Is(ferr, ErrInvalidCommand) {
				t.Fatalf("forwarded entry refused with %v", ferr)
			}
			return
		}
		if c == nil {
			if b[0]&byte(cmdSkippable) == 0 {
				t.Fatalf("type %d decoded to nothing", b[0])
			}
			return
		}
		if c.Type() != CommandType(b[0]) {
			t.Fatalf("type %d decoded as %v", b[0], c.Type())
		}
		if verr := c.validate(); verr != nil && !errors.Is(verr, ErrInvalidCommand) {
			t.Fatalf("validate: %v", verr)
		}
		enc := EncodeCommand(c)
		if len(enc) > len(b) || len(enc) == len(b) && !bytes.Equal(enc, b) {
			t.Fatalf("%x re-encodes as %x", b, enc)
		}
		again, err := DecodeCommand(enc)
		if err != nil || !reflect.DeepEqual(again, c) {
			t.Fatalf("round trip changed %#v into %#v (%v)", c, again, err)
		}
	})
}

// fuzzFSM is the state a restore must either replace completely or leave
// alone.
func fuzzFSM(tb testing.TB) (*FSM, *bool) {
	tb.Helper()
	restored := new(bool)
	f := testFSM(observers{onRestore: func() { *restored = true }})
	f.Apply(entry(1, &RetainSet{Msg: msg("keep", "me")}))
	f.Apply(entry(2, &ClaimOwner{ClientID: "c", Node: "n", At: 1}))
	f.Apply(entry(3, &SessionOpen{ClientID: "s", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n", At: 2}))
	f.Apply(entry(4, enqueue("q", 0, DropNewest, "s")))
	return f, restored
}

// FuzzRestore feeds arbitrary bytes to FSM.Restore. A failure wraps
// errCorrupt, leaves the state exactly as it was and does not call
// OnRestore; a success produces a state whose snapshot restores to the
// same snapshot (a fixed point), and then every truncation of the input
// fails. Memory follows the input, whatever a record length claims:
// testdata/fuzz/FuzzRestore holds an 11-byte snapshot declaring a 1 GiB
// record, which readSnapshot allocated up front.
func FuzzRestore(f *testing.F) {
	// Small seeds with every record kind: the fuzzer minimizes what it
	// finds, re-running the target per byte removed.
	g, _ := fuzzFSM(f)
	for i, c := range []Command{
		&Subscribe{ClientID: "s", Subscriptions: []Subscription{{Filter: "a/#", QoS: 2, NoLocal: true, Identifier: 9}, {Filter: "b"}}},
		&SetWill{ClientID: "s", Will: Will{Topic: "w", Payload: []byte("x"), QoS: 1, Retain: true, DelaySeconds: 5}},
		&QoS2Received{ClientID: "s", PacketID: 7},
		enqueue("r", 0, DropNewest, "s"),
		&QueueRelease{ClientID: "s", Seq: 2, PacketID: 3},
		&SessionClose{ClientID: "s", Owner: "n", At: 9},
	} {
		g.Apply(entry(uint64(5+i), c))
	}
	f.Add(snapshotBytes(f, g))
	f.Add(snapshotBytes(f, testFSM(observers{})))
	v1, _ := hex.DecodeString(snapshotV1)
	f.Add(v1)
	f.Fuzz(func(t *testing.T, b []byte) {
		fsm, restored := fuzzFSM(t)
		before := snapshotBytes(t, fsm)
		var err error
		// 64 KiB of bufio.Reader, and the record bodies the input holds.
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(b), 64), func() { err = fsm.Restore(io.NopCloser(bytes.NewReader(b))) })
		after := snapshotBytes(t, fsm)
		if err != nil {
			if !errors.Is(err, errCorrupt) {
				t.Fatalf("restore error wraps no errCorrupt: %v", err)
			}
			if *restored || !bytes.Equal(before, after) {
				t.Fatalf("a failed restore changed the state (OnRestore called: %v)", *restored)
			}
			return
		}
		if !*restored {
			t.Fatal("OnRestore not called")
		}
		again := testFSM(observers{})
		if err := again.Restore(io.NopCloser(bytes.NewReader(after))); err != nil {
			t.Fatalf("the snapshot of a restored state does not restore: %v", err)
		}
		if got := snapshotBytes(t, again); !bytes.Equal(got, after) {
			t.Fatalf("snapshot not a fixed point:\n%x\n%x", after, got)
		}
		// Every cut of a valid snapshot is detected (the end record
		// carries counts and must be the last byte). Long inputs are
		// cut at about 256 places. readSnapshot uses br as it is (large
		// enough), rather than allocating its own 64 KiB per cut.
		br := bufio.NewReaderSize(nil, 64<<10)
		step := max(1, len(b)/256)
		for n := len(b) - 1; n >= 0; n -= step {
			br.Reset(bytes.NewReader(b[:n]))
			if _, err := readSnapshot(br); err == nil {
				t.Fatalf("snapshot cut to %d of %d bytes restored", n, len(b))
			}
		}
	})
}

// sameError reports whether two decoded RPC errors say the same: both nil,
// or the same message and the same sentinels.
func sameError(a, b error) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	if a.Error() != b.Error() {
		return false
	}
	for _, s := range errSentinels {
		if errors.Is(a, s) != errors.Is(b, s) {
			return false
		}
	}
	return true
}

func sameResult(a, b Result) bool {
	if !sameError(a.Err, b.Err) || len(a.Results) != len(b.Results) {
		return false
	}
	for i := range a.Results {
		if !sameResult(a.Results[i], b.Results[i]) {
			return false
		}
	}
	a.Err, b.Err, a.Results, b.Results = nil, nil, nil, nil
	return reflect.DeepEqual(a, b)
}

// FuzzRPCFrame reads forwarding RPC frames from a stream as both ends do
// (readFrame), then decodes each body as every reply a client reads (an
// apply result, a status, a read index) and every request a server reads.
// A frame re-written with writeFrame reads back the same; a reply that
// decodes re-encodes to one that decodes the same; memory follows the
// bytes that arrive, not a frame length a peer declares.
// testdata/fuzz/FuzzRPCFrame holds a 5-byte frame declaring 8 MiB, which
// readFrame allocated up front, and an error reply with only unknown
// sentinel bits and no message, which re-encoded as success.
func FuzzRPCFrame(f *testing.F) {
	frame := func(kind byte, id uint64, body []byte) []byte {
		var buf bytes.Buffer
		w := bufio.NewWriter(&buf)
		if err := writeFrame(w, kind, id, body); err != nil {
			f.Fatal(err)
		}
		return buf.Bytes()
	}
	res := Result{Index: 7, Changed: true, Epoch: 3, Prev: Owner{Node: "n", Epoch: 2, Since: -5}, Present: true,
		Seqs: []uint64{1, 0, 300}, Dropped: 2, Results: []Result{{Index: 7, Err: ErrNoSession}, {Index: 7, Changed: true}}}
	apply := appendBytes(appendUvarint(nil, 5000), EncodeCommand(&Batch{Commands: sessionGoldenCmds()[:3]}))
	var stream []byte
	stream = append(stream, frame(rpcApply, 1, apply)...)
	stream = append(stream, frame(rpcApply|rpcReply, 1, appendResult(appendError(nil, nil), &res))...)
	stream = append(stream, frame(rpcRemove, 2, appendString(appendUvarint(nil, 1), "node2"))...)
	stream = append(stream, frame(rpcRemove|rpcReply, 2, appendError(nil, errors.Join(ErrNotLeader, ErrTimeout)))...)
	stream = append(stream, frame(rpcStatus, 3, nil)...)
	stream = append(stream, frame(rpcStatus|rpcReply, 3, appendUvarint(appendUvarint(appendUvarint(appendUvarint(appendError(nil, nil), 9), 8), 2), 8))...)
	stream = append(stream, frame(rpcReadIndex|rpcReply, 1<<40, appendUvarint(appendUvarint(appendError(nil, nil), 9), 4))...)
	f.Add(stream)
	f.Add([]byte{0x7f, 0xff, 0xff, 0xff, 1}) // a length beyond any frame
	f.Add(frame(rpcApply|rpcReply, 1, appendError(nil, &remoteError{msg: "new", sentinels: []error{ErrTimeout}})))
	const maxLen = 8<<20 + maxRPCFrameSlack // the default MaxBatchBytes
	f.Fuzz(func(t *testing.T, in []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(in), 32<<10)
		for {
			var kind byte
			var id uint64
			var body []byte
			var err error
			fuzzutil.AllocBound(t, fuzzutil.Limit(len(in), 8), func() { kind, id, body, err = readFrame(br, maxLen) })
			if err != nil {
				return
			}
			var buf bytes.Buffer
			if err := writeFrame(bufio.NewWriter(&buf), kind, id, body); err != nil {
				t.Fatal(err)
			}
			k2, id2, body2, err := readFrame(bufio.NewReader(&buf), maxLen)
			if err != nil || k2 != kind || id2 != id || !bytes.Equal(body2, body) {
				t.Fatalf("frame (%d, %d, %x) read back as (%d, %d, %x), %v", kind, id, body, k2, id2, body2, err)
			}
			checkRPCBody(t, body)
		}
	})
}

// checkRPCBody decodes body as each reply and request kind: what decodes
// must round-trip.
func checkRPCBody(t *testing.T, body []byte) {
	t.Helper()
	// Apply reply: error, then a result when the error is nil.
	r := reader{b: body}
	rerr := r.error()
	if r.err == nil && rerr == nil {
		res := r.result(0)
		if r.end() == nil {
			r2 := reader{b: appendResult(appendError(nil, nil), &res)}
			err2, res2 := r2.error(), r2.result(0)
			if r2.end() != nil || err2 != nil || !sameResult(res, res2) {
				t.Fatalf("result %+v round-tripped into %+v (%v)", res, res2, r2.err)
			}
		}
	} else if r.err == nil {
		r2 := reader{b: appendError(nil, rerr)}
		if err2 := r2.error(); r2.end() != nil || !sameError(rerr, err2) {
			t.Fatalf("error %q (%#v) round-tripped into %#v", rerr, rerr, err2)
		}
	}
	// Status and read-index replies, remove and apply requests: plain
	// fields, which must not panic whatever the bytes.
	for _, n := range []int{4, 2} {
		r := reader{b: body}
		_ = r.error()
		for range n {
			r.uvarint()
		}
		_ = r.end()
	}
	rr := reader{b: body}
	rr.uvarint()
	rr.str()
	_ = rr.end()
}

// FuzzMatchFilter checks the will matcher against the reference of
// internal/fuzzutil, which cluster.Match is checked against too (FuzzMatch
// there): the two packages' copies agree with each other through it.
func FuzzMatchFilter(f *testing.F) {
	for _, s := range [][2]string{
		{"a/#", "a"}, {"a/+/c", "a//c"}, {"+/+", "/"}, {"#", "$SYS/x"}, {"+/x", "$a/x"}, {"$SYS/#", "$SYS"},
		{"$share/g/a/+", "a/b"}, {"$SHARE/g/#", "x"}, {"a/#/b", "a/x/b"}, {"", ""}, {"+", "x"}, {"a/b/#", "a/b/c/d"},
		{"+/+/+", "a/b"}, {"a", "A"}, {"$sharex/a", "a"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, filter, topic string) {
		if got, want := isSharedFilter(filter), fuzzutil.HasSharePrefix(filter); got != want {
			t.Fatalf("isSharedFilter(%q) = %v, reference %v", filter, got, want)
		}
		if !fuzzutil.ValidFilter(filter) || isSharedFilter(filter) || !fuzzutil.ValidTopic(topic) {
			return // sessions hold valid filters (mochi checked them); wills have valid topics
		}
		got := matchFilter(filter, topic)
		if want := fuzzutil.Match(filter, topic); got != want {
			t.Fatalf("matchFilter(%q, %q) = %v, reference %v", filter, topic, got, want)
		}
		if got && topic[0] == '$' && (filter[0] == '+' || filter[0] == '#') {
			t.Fatalf("wildcard filter %q matched $ topic %q", filter, topic)
		}
	})
}
