// Package logx holds the broker's logging helpers: the handler constructor
// used by cmd/broker and a rate limiter for libraries that log per packet.
package logx

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// New returns a logger writing text (format "text") or JSON ("json") at
// level to w. An empty format picks text on a terminal and JSON otherwise,
// which is what a container log collector wants.
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "":
		if f, ok := w.(*os.File); ok && isTerminal(f) {
			return slog.New(slog.NewTextHandler(w, opts)), nil
		}
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: use text or json", format)
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// RateLimit wraps h so that records with the same level and message are
// written at most once per window; the next one written after a quiet
// spell carries "suppressed" with the number dropped. It exists for mochi,
// which logs a warning for every bad packet and failed connection: a flood
// of junk must not become a flood of log lines.
func RateLimit(h slog.Handler, window time.Duration) slog.Handler {
	return &rateLimited{h: h, window: window, state: &rlState{seen: map[string]*rlEntry{}}}
}

type rateLimited struct {
	h      slog.Handler
	window time.Duration
	state  *rlState
}

type rlState struct {
	mu   sync.Mutex
	seen map[string]*rlEntry
}

type rlEntry struct {
	last       time.Time
	suppressed int
}

func (r *rateLimited) Enabled(ctx context.Context, l slog.Level) bool { return r.h.Enabled(ctx, l) }

func (r *rateLimited) Handle(ctx context.Context, rec slog.Record) error {
	key := rec.Level.String() + "\x00" + rec.Message
	r.state.mu.Lock()
	e, ok := r.state.seen[key]
	if !ok {
		if len(r.state.seen) > 1024 { // bounded: messages are constants, but be safe
			clear(r.state.seen)
		}
		e = &rlEntry{}
		r.state.seen[key] = e
	}
	if ok && rec.Time.Sub(e.last) < r.window {
		e.suppressed++
		r.state.mu.Unlock()
		return nil
	}
	n := e.suppressed
	e.last, e.suppressed = rec.Time, 0
	r.state.mu.Unlock()
	if n > 0 {
		rec = rec.Clone()
		rec.AddAttrs(slog.Int("suppressed", n))
	}
	return r.h.Handle(ctx, rec)
}

func (r *rateLimited) WithAttrs(as []slog.Attr) slog.Handler {
	return &rateLimited{h: r.h.WithAttrs(as), window: r.window, state: r.state}
}

func (r *rateLimited) WithGroup(name string) slog.Handler {
	return &rateLimited{h: r.h.WithGroup(name), window: r.window, state: r.state}
}

// Rewrite wraps h so that every attribute of a record passes through f
// first (attributes added with With are not rewritten). It exists for
// mochi, which logs whole packets, payload included, when a hook refuses
// one: a log line must never carry message payloads (they may be secret,
// and a 256 MB payload made a 350 MB line).
func Rewrite(h slog.Handler, f func(slog.Attr) slog.Attr) slog.Handler {
	return &rewriting{h: h, f: f}
}

type rewriting struct {
	h slog.Handler
	f func(slog.Attr) slog.Attr
}

func (r *rewriting) Enabled(ctx context.Context, l slog.Level) bool { return r.h.Enabled(ctx, l) }

func (r *rewriting) Handle(ctx context.Context, rec slog.Record) error {
	out := slog.NewRecord(rec.Time, rec.Level, rec.Message, rec.PC)
	rec.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(r.f(a))
		return true
	})
	return r.h.Handle(ctx, out)
}

func (r *rewriting) WithAttrs(as []slog.Attr) slog.Handler {
	return &rewriting{h: r.h.WithAttrs(as), f: r.f}
}

func (r *rewriting) WithGroup(name string) slog.Handler {
	return &rewriting{h: r.h.WithGroup(name), f: r.f}
}

// Recent keeps the last records at Warn or above, for the status page's
// "recent warnings": an operator sees what went wrong lately without
// reading the logs. Bounded: the oldest entry gives way.
type Recent struct {
	mu      sync.Mutex
	entries []Entry
	next    int
	full    bool
}

// Entry is one record kept by Recent.
type Entry struct {
	Time    time.Time         `json:"time"`
	Level   string            `json:"level"`
	Message string            `json:"message"`
	Attrs   map[string]string `json:"attrs,omitempty"`
}

// NewRecent keeps the last n records.
func NewRecent(n int) *Recent { return &Recent{entries: make([]Entry, max(n, 1))} }

// Wrap returns h, also recording into r what reaches it at Warn or above.
func (r *Recent) Wrap(h slog.Handler) slog.Handler { return &recording{h: h, r: r} }

// Entries returns the kept records, oldest first (never nil: the status
// page reads an empty JSON list, not null).
func (r *Recent) Entries() []Entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Entry, 0, len(r.entries))
	if r.full {
		out = append(out, r.entries[r.next:]...)
	}
	return append(out, r.entries[:r.next]...)
}

func (r *Recent) add(e Entry) {
	r.mu.Lock()
	r.entries[r.next] = e
	r.next = (r.next + 1) % len(r.entries)
	r.full = r.full || r.next == 0
	r.mu.Unlock()
}

type recording struct {
	h     slog.Handler
	r     *Recent
	group string      // prefix of attribute keys (WithGroup)
	attrs []slog.Attr // from WithAttrs, keys already prefixed
}

// Enabled: warnings are kept even where the log level hides them.
func (h *recording) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn || h.h.Enabled(ctx, l)
}

func (h *recording) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level >= slog.LevelWarn {
		e := Entry{Time: rec.Time, Level: rec.Level.String(), Message: rec.Message, Attrs: map[string]string{}}
		// Resolved: a LogValuer (one that redacts, say) is honoured.
		for _, a := range h.attrs {
			e.Attrs[a.Key] = a.Value.Resolve().String()
		}
		rec.Attrs(func(a slog.Attr) bool {
			e.Attrs[h.group+a.Key] = a.Value.Resolve().String()
			return true
		})
		h.r.add(e)
		if !h.h.Enabled(ctx, rec.Level) {
			return nil
		}
	}
	return h.h.Handle(ctx, rec)
}

func (h *recording) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.h = h.h.WithAttrs(as)
	c.attrs = slices.Clone(h.attrs)
	for _, a := range as {
		c.attrs = append(c.attrs, slog.Attr{Key: h.group + a.Key, Value: a.Value})
	}
	return &c
}

func (h *recording) WithGroup(name string) slog.Handler {
	c := *h
	c.h = h.h.WithGroup(name)
	c.group = h.group + name + "."
	return &c
}
