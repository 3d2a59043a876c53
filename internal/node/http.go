package node

import (
	"context"
	"encoding/json"
	"fmt"
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
	mux.HandleFunc("POST /api/cluster/remove-node", func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("id")
		if id == "" {
			http.Error(w, "missing ?id=<node id>", http.StatusBadRequest)
			return
		}
		if n.repl == nil {
			http.Error(w, "replication not started", http.StatusServiceUnavailable)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		if err := n.repl.RemoveServer(ctx, id); err != nil {
			http.Error(w, fmt.Sprintf("remove %s: %v", id, err), http.StatusConflict)
			return
		}
		n.log.Warn("node removed from the raft configuration by an operator", "removed", id)
		fmt.Fprintf(w, "removed %s\n", id)
	})
	mux.HandleFunc("GET /api/sessions", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(n.Sessions())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(n.reg, promhttp.HandlerOpts{Registry: n.reg}))
	if n.cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
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
