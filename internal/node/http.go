package node

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func (n *Node) routes() http.Handler {
	mux := http.NewServeMux()
	// Liveness: the process answers. It never depends on the cluster, so a
	// partition cannot make Kubernetes restart healthy nodes.
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", n.serveReady)
	mux.HandleFunc("GET /api/cluster", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(n.ClusterStatus())
	})
	// Admin: remove a dead node from the raft configuration for good (the
	// only way a member is removed besides a graceful leave). POST only, so
	// a stray GET from a browser or a probe cannot do it.
	mux.HandleFunc("POST /api/cluster/remove-node", n.adminOnly(func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("id")
		if id == "" {
			http.Error(w, "missing ?id=<node id>", http.StatusBadRequest)
			return
		}
		if !n.replReady(w) {
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		if err := n.repl.RemoveServer(ctx, id); err != nil {
			http.Error(w, fmt.Sprintf("remove %s: %v", id, err), http.StatusConflict)
			return
		}
		n.log.Warn("node removed from the raft configuration by an operator", "removed", id, "remote", r.RemoteAddr)
		fmt.Fprintf(w, "removed %s\n", id)
	}))
	mux.HandleFunc("GET /api/sessions", func(w http.ResponseWriter, r *http.Request) {
		writeList(w, r, n.Sessions(), func(s SessionInfo) string { return s.ClientID })
	})
	n.adminRoutes(mux) // admin.go
	mux.Handle("GET /metrics", promhttp.HandlerFor(n.reg, promhttp.HandlerOpts{Registry: n.reg}))
	if n.cfg.Pprof {
		// Behind the admin check: /cmdline shows the flags (secrets
		// included), and profiles cost CPU.
		mux.HandleFunc("/debug/pprof/", n.adminOnly(pprof.Index))
		mux.HandleFunc("/debug/pprof/cmdline", n.adminOnly(pprof.Cmdline))
		mux.HandleFunc("/debug/pprof/profile", n.adminOnly(pprof.Profile))
		mux.HandleFunc("/debug/pprof/symbol", n.adminOnly(pprof.Symbol))
		mux.HandleFunc("/debug/pprof/trace", n.adminOnly(pprof.Trace))
	}
	return mux
}

// serveReady answers 200 only when the node should receive clients: it
// has started, is not shutting down, and every registered check passes.
// The body lists each check, so a failing probe says why.
func (n *Node) serveReady(w http.ResponseWriter, _ *http.Request) {
	var b strings.Builder
	ok := n.ready.Load()
	if ok {
		b.WriteString("listeners: ok\n")
	} else {
		b.WriteString("listeners: not accepting (starting or shutting down)\n")
	}
	for _, c := range n.checks {
		if err := c.check(); err != nil {
			ok = false
			fmt.Fprintf(&b, "%s: %v\n", c.name, err)
		} else {
			fmt.Fprintf(&b, "%s: ok\n", c.name)
		}
	}
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_, _ = w.Write([]byte(b.String()))
}

// adminOnly guards an admin write. With --admin-token the request must
// carry "Authorization: Bearer <token>" (401 otherwise); without one, only
// requests from loopback are served (403 otherwise), so `kubectl exec ...
// broker cluster remove-node` inside the pod works and the network cannot.
func (n *Node) adminOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if tok := n.cfg.AdminToken; tok != "" {
			// The scheme is case-insensitive (RFC 7235); the token is not.
			auth := r.Header.Get("Authorization")
			ok := len(auth) > len("Bearer ") && strings.EqualFold(auth[:len("Bearer ")], "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(auth[len("Bearer "):])), []byte(tok)) != 1 {
				n.adminDenied.WithLabelValues("token").Inc()
				n.log.Warn("admin request refused: missing or wrong bearer token", "remote", r.RemoteAddr, "path", r.URL.Path)
				w.Header().Set("WWW-Authenticate", `Bearer realm="broker admin"`)
				http.Error(w, "admin writes need Authorization: Bearer <token> (the node's --admin-token)", http.StatusUnauthorized)
				return
			}
		} else if !fromLoopback(r) {
			n.adminDenied.WithLabelValues("not_loopback").Inc()
			n.log.Warn("admin request refused: no --admin-token configured and the request is not from loopback", "remote", r.RemoteAddr, "path", r.URL.Path)
			http.Error(w, "admin writes without a configured --admin-token are accepted from loopback only", http.StatusForbidden)
			return
		}
		h(w, r)
	}
}

func fromLoopback(r *http.Request) bool {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
