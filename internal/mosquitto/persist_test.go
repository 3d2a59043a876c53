package mosquitto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"testing"
)

// testdata/mosquitto-2.0.11.db was written by Debian's mosquitto 2.0.11
// at shutdown after:
//
//	mosquitto_pub -r -q 1 -t imp/ret/a -m "retained A"
//	mosquitto_pub -V 5 -r -q 1 -t imp/ret/b -m "retained B" -D publish content-type text/plain -D publish user-property k v
//	mosquitto_sub -c -i sess1 -q 1 -t 'imp/q/#' -E
//	mosquitto_sub -V 5 -c -i sess5 -x 3600 -q 2 -t 'imp/q5/#' -E
//	for i in 1 2 3; do mosquitto_pub -q 1 -t imp/q/x -m "q1-$i"; done
//	mosquitto_pub -V 5 -q 2 -t imp/q5/y -m "q5" -D publish message-expiry-interval 3000
//
// (test/e2e's TestImportMosquitto writes a fresh one with the mosquitto
// on the machine.)
func readTestDB(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/mosquitto-2.0.11.db")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadDBOfMosquitto2(t *testing.T) {
	db, err := ReadDB(bytes.NewReader(readTestDB(t)))
	if err != nil {
		t.Fatal(err)
	}
	if db.Version != 6 || len(db.Problems) != 0 {
		t.Fatalf("version %d, problems %v", db.Version, db.Problems)
	}
	retained := map[string]*Message{}
	for _, m := range db.Retained {
		retained[m.Topic] = m
	}
	if len(retained) != 2 || string(retained["imp/ret/a"].Payload) != "retained A" || retained["imp/ret/a"].QoS != 1 {
		t.Fatalf("retained: %+v", db.Retained)
	}
	b := retained["imp/ret/b"]
	if string(b.Payload) != "retained B" || b.Properties.ContentType != "text/plain" ||
		len(b.Properties.User) != 1 || b.Properties.User[0].Key != "k" || b.Properties.User[0].Val != "v" {
		t.Fatalf("retained with MQTT 5 properties: %+v", b)
	}
	if len(db.Sessions) != 2 {
		t.Fatalf("sessions: %+v", db.Sessions)
	}
	s1, s5 := db.Sessions[0], db.Sessions[1]
	if s1.ClientID != "sess1" || s1.ExpiryInterval != 0xFFFFFFFF ||
		len(s1.Subscriptions) != 1 || s1.Subscriptions[0] != (Subscription{Filter: "imp/q/#", QoS: 1}) {
		t.Fatalf("MQTT 3.1.1 session: %+v", s1)
	}
	if len(s1.Queue) != 3 {
		t.Fatalf("sess1 queue: %d messages", len(s1.Queue))
	}
	for i, q := range s1.Queue {
		if want := "q1-" + string(rune('1'+i)); string(q.Payload) != want || q.Topic != "imp/q/x" || q.QoS != 1 ||
			q.Incoming || q.State != StateQueued {
			t.Fatalf("sess1 message %d: %+v %q, want %q queued", i, q, q.Payload, want)
		}
	}
	if s5.ClientID != "sess5" || s5.ExpiryInterval != 3600 || s5.ExpiresAt == 0 ||
		len(s5.Subscriptions) != 1 || s5.Subscriptions[0].Filter != "imp/q5/#" || s5.Subscriptions[0].QoS != 2 {
		t.Fatalf("MQTT 5 session: %+v", s5)
	}
	if len(s5.Queue) != 1 || string(s5.Queue[0].Payload) != "q5" || s5.Queue[0].QoS != 2 || s5.Queue[0].Expiry == 0 {
		t.Fatalf("sess5 queue: %+v", s5.Queue)
	}
}

// TestReadDBRefusesDamage: every truncation of a real file is reported
// as corrupt (never a panic, never silently short), with what came before
// the damage; a wrong header is not taken for a database at all.
func TestReadDBRefusesDamage(t *testing.T) {
	full := readTestDB(t)
	whole, _ := ReadDB(bytes.NewReader(full))
	for n := len(magic) + 8; n < len(full); n++ {
		db, err := ReadDB(bytes.NewReader(full[:n]))
		var ce *CorruptError
		if n == len(full) || isChunkBoundary(t, full, n) {
			// A file cut at a chunk boundary reads as a shorter file:
			// Mosquitto's format has no end marker or length to tell.
			continue
		}
		if !errors.As(err, &ce) {
			t.Fatalf("cut at %d of %d: %v, want a CorruptError", n, len(full), err)
		}
		if db == nil || len(db.Retained) > len(whole.Retained) || len(db.Sessions) > len(whole.Sessions) {
			t.Fatalf("cut at %d: %+v", n, db)
		}
	}
	if _, err := ReadDB(bytes.NewReader([]byte("listener 1883\n"))); !errors.Is(err, ErrNotMosquittoDB) {
		t.Fatalf("a config file: %v", err)
	}
	bad := bytes.Clone(full)
	bad[len(magic)+7] = 3
	if _, err := ReadDB(bytes.NewReader(bad)); err == nil {
		t.Fatal("format version 3 accepted")
	}
}

// isChunkBoundary reports whether n is where a chunk of full starts.
func isChunkBoundary(t *testing.T, full []byte, n int) bool {
	t.Helper()
	at := len(magic) + 8
	for at < len(full) {
		if at == n {
			return true
		}
		at += 8 + int(uint32(full[at+4])<<24|uint32(full[at+5])<<16|uint32(full[at+6])<<8|uint32(full[at+7]))
	}
	return false
}

func FuzzReadDB(f *testing.F) {
	b, err := os.ReadFile("testdata/mosquitto-2.0.11.db")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:100])
	f.Fuzz(func(t *testing.T, data []byte) {
		db, err := ReadDB(bytes.NewReader(data))
		if err == nil && db == nil {
			t.Fatal("no error and no database")
		}
	})
}

// TestReadDBDoesNotAllocateClaims: a chunk header claiming 257 MB in a
// 31-byte file is refused without allocating the claim (found by review:
// it allocated 257 MB, and the fuzzer crawled).
func TestReadDBDoesNotAllocateClaims(t *testing.T) {
	b := append(bytes.Clone(magic), 0, 0, 0, 0, 0, 0, 0, 6)
	b = binary.BigEndian.AppendUint32(b, chunkMsgStore)
	b = binary.BigEndian.AppendUint32(b, 268435455)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := ReadDB(bytes.NewReader(b))
	runtime.ReadMemStats(&after)
	var ce *CorruptError
	if !errors.As(err, &ce) {
		t.Fatalf("%v, want a CorruptError", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 8<<20 {
		t.Fatalf("allocated %d MB for a %d-byte file", n>>20, len(b))
	}
}
