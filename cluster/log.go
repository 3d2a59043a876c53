package cluster

import (
	"bytes"
	"context"
	"log"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// memberlistLogger adapts memberlist's *log.Logger to slog. memberlist writes
// lines like "2024/01/02 15:04:05 [WARN] memberlist: text"; we strip the
// timestamp (log flags are 0) and map the bracketed level.
func memberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(&slogWriter{l: l.With("source", "memberlist")}, "", 0)
}

type slogWriter struct{ l *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	msg := bytes.TrimSpace(p)
	level := slog.LevelInfo
	for _, lv := range []struct {
		tag   string
		level slog.Level
	}{{"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo}, {"[WARN]", slog.LevelWarn}, {"[ERR]", slog.LevelError}, {"[ERROR]", slog.LevelError}} {
		if bytes.HasPrefix(msg, []byte(lv.tag)) {
			level = lv.level
			msg = bytes.TrimSpace(msg[len(lv.tag):])
			break
		}
	}
	msg = bytes.TrimPrefix(msg, []byte("memberlist: "))
	if w.l.Enabled(context.Background(), level) {
		w.l.Log(context.Background(), level, string(msg))
	}
	return len(p), nil
}

// rateLimited lets one log line through per interval: bad input from the
// network is counted every time but logged at a bounded rate.
type rateLimited struct {
	last  atomic.Int64
	every time.Duration
}

func (r *rateLimited) allow() bool {
	now := time.Now().UnixNano()
	last := r.last.Load()
	if now-last < int64(r.every) {
		return false
	}
	return r.last.CompareAndSwap(last, now)
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// perKeyLimiter allows one event per key (a remote address) per period, so
// a stranger hammering the cluster port costs one log line a minute while
// a second stranger is still seen at once. At most max keys are
// remembered; when full, entries older than the period are dropped, and if
// none are, the event is not logged (the metric still counts it).
type perKeyLimiter struct {
	every time.Duration
	max   int
	mu    sync.Mutex
	last  map[string]time.Time
}

func newPerKeyLimiter(every time.Duration, max int) *perKeyLimiter {
	return &perKeyLimiter{every: every, max: max, last: make(map[string]time.Time)}
}

func (l *perKeyLimiter) allow(key string) bool {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.last[key]; ok && now.Sub(t) < l.every {
		return false
	}
	if _, ok := l.last[key]; !ok && len(l.last) >= l.max {
		for k, t := range l.last {
			if now.Sub(t) >= l.every {
				delete(l.last, k)
			}
		}
		if len(l.last) >= l.max {
			return false
		}
	}
	l.last[key] = now
	return true
}
