package hooks

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/mqtt-ha/broker/internal/backoff"
)

// Listener serves MQTT on an already bound net.Listener, over plain TCP (TLS
// when the net.Listener is a tls listener) or WebSocket. mochi's own listeners
// bind inside Serve, so a caller cannot learn the port of ":0" and cannot
// guard the pre-CONNECT phase; this one wraps every connection in a
// guardedConn that does the jobs described on that type.
type Listener struct {
	id        string
	ln        net.Listener
	websocket bool
	guard     ConnGuard

	log    *slog.Logger
	httpSv *http.Server
	closed atomic.Bool
	wg     sync.WaitGroup
}

var _ listeners.Listener = (*Listener)(nil)

// ConnGuard holds what every accepted connection is held to before and
// around the MQTT session.
type ConnGuard struct {
	// ConnectTimeout bounds the time between accept and a complete CONNECT,
	// so that sockets that never speak (or a flood of them) are reaped.
	ConnectTimeout time.Duration
	// MaxPacketSize is the largest MQTT packet accepted (fixed header
	// included); 0 means no limit. mochi enforces the limit by closing the
	// connection; the guard adds the MQTT 5 DISCONNECT 0x95 the spec asks for.
	MaxPacketSize uint32
	// Metrics, if set, counts connections that fail before a session exists.
	Metrics *Metrics
	// Log, if set, gets one line per connection refused before CONNECT
	// (MaxConnectSize, not a CONNECT): give it a rate-limited handler.
	Log *slog.Logger
	// WriteStall, when positive, closes a connection whose socket takes no
	// bytes for that long (writeStalled).
	WriteStall time.Duration
	// Ended, when set, is called with the connection mochi was given once
	// mochi is done with it: mochi calls no hook when a connection ends
	// before its session is established (a CONNACK that could not be
	// written), and the cluster hook must learn of it (Cluster.ConnectionEnded).
	Ended func(net.Conn)
}

// NewListener wraps ln. id names the listener in logs and metrics.
func NewListener(id string, ln net.Listener, ws bool, guard ConnGuard) *Listener {
	if guard.Log != nil {
		guard.Log = guard.Log.With("listener", id)
	}
	return &Listener{id: id, ln: ln, websocket: ws, guard: guard}
}

// ID implements listeners.Listener.
func (l *Listener) ID() string { return l.id }

// Address implements listeners.Listener.
func (l *Listener) Address() string { return l.ln.Addr().String() }

// Protocol implements listeners.Listener.
func (l *Listener) Protocol() string {
	if l.websocket {
		return "ws"
	}
	return "tcp"
}

// Init implements listeners.Listener.
func (l *Listener) Init(log *slog.Logger) error {
	l.log = log
	return nil
}

// Serve implements listeners.Listener; it returns when the listener is closed.
func (l *Listener) Serve(establish listeners.EstablishFn) {
	if l.websocket {
		l.serveWebsocket(establish)
		return
	}
	var pause backoff.Accept
	var warned time.Time
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				if !l.closed.Load() {
					l.log.Error("listener socket closed; not accepting clients any more", "error", err)
				}
				return
			}
			// EMFILE (a connection storm past the file descriptor limit)
			// and friends: the socket is fine, so back off and go on, as
			// net/http and the cluster ports do. Returning here left the
			// node up but unreachable over MQTT for good.
			l.guard.Metrics.acceptError(l.id)
			if time.Since(warned) > time.Minute {
				warned = time.Now()
				l.log.Warn("accept failed; retrying with backoff (logged again after a minute)", "error", err)
			}
			time.Sleep(pause.Failed())
			continue
		}
		pause.Succeeded()
		l.handle(conn, establish)
	}
}

func (l *Listener) handle(conn net.Conn, establish listeners.EstablishFn) {
	gc := newGuardedConn(conn, l.guard, time.Now())
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		// mochi logs establish errors itself through OnDisconnect paths; the
		// ones that end a connection before a session exists (timeouts,
		// malformed CONNECT, bad credentials) are counted by the guard.
		_ = establish(l.id, gc)
		l.ended(gc)
	}()
}

func (l *Listener) ended(gc net.Conn) {
	_ = gc.Close()
	if l.guard.Ended != nil {
		l.guard.Ended(gc)
	}
}

func (l *Listener) serveWebsocket(establish listeners.EstablishFn) {
	upgrader := websocket.Upgrader{
		Subprotocols: []string{"mqtt"},
		// MQTT clients are not browsers acting on behalf of a third-party
		// page with ambient credentials; authentication is MQTT's own.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		c, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return // the upgrader already answered with an HTTP error
		}
		conn := &wsConn{Conn: c.UnderlyingConn(), c: c}
		accepted, ok := r.Context().Value(acceptedKey{}).(time.Time)
		if !ok {
			accepted = time.Now()
		}
		gc := newGuardedConn(conn, l.guard, accepted)
		_ = establish(l.id, gc)
		l.ended(gc)
	})
	l.httpSv = &http.Server{
		Handler: mux,
		// The upgrade request and the CONNECT after it share one connect
		// timeout, counted from accept.
		ReadHeaderTimeout: l.guard.ConnectTimeout,
		// Without it a connection kept alive after a refused upgrade
		// (a plain HTTP request) would wait for the next one forever.
		IdleTimeout: l.guard.ConnectTimeout,
		ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
			return context.WithValue(ctx, acceptedKey{}, time.Now())
		},
		// An upgrade request is a few hundred bytes; net/http's default
		// allows 1 MB of headers per connection before CONNECT.
		MaxHeaderBytes: maxUpgradeHeaderBytes,
	}
	err := l.httpSv.Serve(l.ln)
	if err != nil && !errors.Is(err, http.ErrServerClosed) && !l.closed.Load() {
		l.log.Error("websocket listener stopped", "listener", l.id, "error", err)
	}
}

// Close implements listeners.Listener: stop accepting, then let mochi
// disconnect this listener's clients (MQTT 5 clients get 0x8B).
func (l *Listener) Close(closeClients listeners.CloseFn) {
	l.StopAccepting()
	closeClients(l.id)
}

// StopAccepting closes the socket so no new client connects; connected
// clients are untouched.
func (l *Listener) StopAccepting() {
	if l.closed.CompareAndSwap(false, true) {
		if l.httpSv != nil {
			// Shutdown does not wait for hijacked (upgraded) connections.
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = l.httpSv.Shutdown(ctx)
			cancel()
		}
		_ = l.ln.Close()
	}
}

// acceptedKey keys the time a WebSocket connection was accepted in its
// requests' context.
type acceptedKey struct{}

// maxUpgradeHeaderBytes bounds the HTTP headers of a WebSocket upgrade
// request (cookies included), like a reverse proxy's default.
const maxUpgradeHeaderBytes = 64 << 10

// wsConn carries the MQTT byte stream in binary WebSocket messages, as
// MQTT-over-WebSocket clients expect (one MQTT packet may span messages).
type wsConn struct {
	net.Conn
	c *websocket.Conn
	r io.Reader // the message being read, nil between messages
}

func (ws *wsConn) Read(p []byte) (int, error) {
	for {
		if ws.r == nil {
			op, r, err := ws.c.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errors.New("websocket: MQTT requires binary messages")
			}
			ws.r = r
		}
		n, err := ws.r.Read(p)
		if errors.Is(err, io.EOF) {
			ws.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (ws *wsConn) Write(p []byte) (int, error) {
	if err := ws.c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// SetWriteDeadline goes to gorilla, which sets the socket's write deadline
// to its own before every frame it writes (the embedded socket's would be
// overwritten). Only guardedConn calls it, under its write lock.
func (ws *wsConn) SetWriteDeadline(t time.Time) error { return ws.c.SetWriteDeadline(t) }
