package logx

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestRateLimit(t *testing.T) {
	var buf bytes.Buffer
	h := RateLimit(slog.NewTextHandler(&buf, nil), time.Minute)
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	log := func(at time.Duration, msg string) {
		r := slog.NewRecord(base.Add(at), slog.LevelWarn, msg, 0)
		if err := h.Handle(t.Context(), r); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 100 {
		log(time.Duration(i)*time.Millisecond, "bad packet")
	}
	log(time.Second, "other")
	log(2*time.Minute, "bad packet")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("got %d lines, want 3:\n%s", len(lines), buf.String())
	}
	if !strings.Contains(lines[2], "suppressed=99") {
		t.Errorf("third line %q should report 99 suppressed", lines[2])
	}
}

func TestNewRejectsBadSettings(t *testing.T) {
	if _, err := New(&bytes.Buffer{}, "xml", "info"); err == nil {
		t.Error("format xml accepted")
	}
	if _, err := New(&bytes.Buffer{}, "json", "loud"); err == nil {
		t.Error("level loud accepted")
	}
}

// TestRecentKeepsLastWarnings: only Warn and above are kept, the newest n,
// oldest first, with the attributes of With and of the record.
func TestRecentKeepsLastWarnings(t *testing.T) {
	r := NewRecent(3)
	if e := r.Entries(); e == nil || len(e) != 0 {
		t.Fatalf("no warnings yet: %#v, want an empty list (the status page reads null as an error)", e)
	}
	log := slog.New(r.Wrap(slog.DiscardHandler)).With("node", "n1")
	log.Info("not kept")
	for i := range 5 {
		log.WithGroup("g").Warn("w", "i", i)
	}
	log.Error("e", "err", "boom")
	got := r.Entries()
	if len(got) != 3 || got[0].Attrs["g.i"] != "3" || got[1].Attrs["g.i"] != "4" || got[2].Message != "e" ||
		got[2].Level != "ERROR" || got[2].Attrs["node"] != "n1" || got[2].Attrs["err"] != "boom" {
		t.Fatalf("entries: %+v", got)
	}
}
