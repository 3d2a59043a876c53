package node

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestAdminWritesNeedTokenOrLoopback: remove-node (every admin write) needs
// the bearer token when one is configured, and comes from loopback when
// none is; reads stay open.
func TestAdminWritesNeedTokenOrLoopback(t *testing.T) {
	nodes := map[string]*Node{
		"":       newTestCluster(t, "open").nodes["open"],
		"s3cret": newTunedCluster(t, func(c *Config) { c.AdminToken = "s3cret" }, "guarded").nodes["guarded"],
	}
	for _, tc := range []struct {
		name, token, remote, auth string
		want                      int
	}{
		{"no token, loopback", "", "127.0.0.1:5000", "", http.StatusBadRequest}, // reaches the handler: no ?id
		{"no token, ipv6 loopback", "", "[::1]:5000", "", http.StatusBadRequest},
		{"no token, from the network", "", "10.1.2.3:5000", "", http.StatusForbidden},
		{"token, missing", "s3cret", "127.0.0.1:5000", "", http.StatusUnauthorized},
		{"token, wrong", "s3cret", "127.0.0.1:5000", "Bearer nope", http.StatusUnauthorized},
		{"token, other scheme", "s3cret", "127.0.0.1:5000", "Basic s3cret", http.StatusUnauthorized},
		{"token, right, from the network", "s3cret", "10.1.2.3:5000", "Bearer s3cret", http.StatusBadRequest},
		{"token, scheme in lower case", "s3cret", "10.1.2.3:5000", "bearer s3cret", http.StatusBadRequest},
		{"token, empty", "s3cret", "127.0.0.1:5000", "Bearer ", http.StatusUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := nodes[tc.token]
			before := counterValue(t, n.reg, "broker_admin_denied_total", "reason", "token") + counterValue(t, n.reg, "broker_admin_denied_total", "reason", "not_loopback")
			h := n.routes()
			req := httptest.NewRequest(http.MethodPost, "/api/cluster/remove-node", nil)
			req.RemoteAddr = tc.remote
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tc.want {
				t.Fatalf("status %d (%s), want %d", rec.Code, strings.TrimSpace(rec.Body.String()), tc.want)
			}
			if tc.want == http.StatusUnauthorized && !strings.Contains(rec.Header().Get("WWW-Authenticate"), "Bearer") {
				t.Error("401 without WWW-Authenticate: Bearer")
			}
			denied := counterValue(t, n.reg, "broker_admin_denied_total", "reason", "token") + counterValue(t, n.reg, "broker_admin_denied_total", "reason", "not_loopback")
			if (denied-before == 1) != (tc.want == http.StatusUnauthorized || tc.want == http.StatusForbidden) {
				t.Errorf("denied counter %v", denied)
			}
			// Reads need nothing.
			req = httptest.NewRequest(http.MethodGet, "/healthz", nil)
			req.RemoteAddr = "10.1.2.3:5000"
			rec = httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != http.StatusOK {
				t.Fatalf("/healthz from the network: %d", rec.Code)
			}
		})
	}
	// The same over a real socket: no token, then the right one.
	post := func(auth string) int {
		req, _ := http.NewRequest(http.MethodPost, "http://"+nodes["s3cret"].Addr("http")+"/api/cluster/remove-node?id=nobody", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post(""); code != http.StatusUnauthorized {
		t.Fatalf("no token: %d", code)
	}
	if code := post("Bearer s3cret"); code == http.StatusUnauthorized || code == http.StatusForbidden {
		t.Fatalf("right token refused: %d", code)
	}
}

// TestPprofIsAdminOnly: /debug/pprof/cmdline shows the command line, the
// cluster key and admin token included; with --pprof it is an admin
// endpoint, not open to the network.
func TestPprofIsAdminOnly(t *testing.T) {
	n := newTunedCluster(t, func(c *Config) { c.Pprof, c.AdminToken = true, "s3cret" }, "pp").nodes["pp"]
	for _, tc := range []struct {
		auth string
		want int
	}{{"", http.StatusUnauthorized}, {"Bearer s3cret", http.StatusOK}} {
		req := httptest.NewRequest(http.MethodGet, "/debug/pprof/cmdline", nil)
		req.RemoteAddr = "10.1.2.3:5000"
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		rec := httptest.NewRecorder()
		n.routes().ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Fatalf("auth %q: status %d, want %d", tc.auth, rec.Code, tc.want)
		}
	}
}
