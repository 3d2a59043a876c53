package node

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestOverview: /api/overview as the status page reads it: every member
// with its clients (n2's counted from the replicated ownership table), the
// raft leader, the deepest session queues and this node's warnings; / is
// the page itself.
func TestOverview(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	tc.client("n2", "ov-a")
	tc.client("n2", "ov-b")
	p := testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: "ov-p", CleanStart: true, SessionExpiry: 600})
	p.Sub(t, 1, "ov/q")
	p.Close()
	tc.awaitClosed(t, "ov-p")
	pub := tc.client("n1", "ov-pub")
	for range 3 {
		pub.Pub(t, "ov/q", 1, false, []byte("x"))
	}
	n1.log.Warn("a warning for the status page", "why", "test")

	testutil.Eventually(t, wait, func() error {
		o := n1.Overview()
		if len(o.Members) != 2 || o.Raft == nil || o.Raft.LeaderID == "" {
			return fmt.Errorf("members %+v, raft %+v", o.Members, o.Raft)
		}
		leaders := 0
		for _, m := range o.Members {
			if m.Leader {
				leaders++
			}
			if want := map[string]int{"n1": 1, "n2": 2}[m.ID]; m.Clients != want || m.State != "alive" || !m.Voter {
				return fmt.Errorf("member %+v: want alive voter with %d clients", m, want)
			}
		}
		if leaders != 1 {
			return fmt.Errorf("%d leaders: %+v", leaders, o.Members)
		}
		if o.Sessions.Count != 1 || o.Sessions.Queued != 3 || len(o.Sessions.Deepest) != 1 || o.Sessions.Deepest[0].ClientID != "ov-p" {
			return fmt.Errorf("sessions %+v", o.Sessions)
		}
		for _, w := range o.Warnings {
			if w.Message == "a warning for the status page" && w.Attrs["why"] == "test" && w.Attrs["node"] == "n1" {
				return nil
			}
		}
		return fmt.Errorf("warning not listed: %+v", o.Warnings)
	})

	resp, err := http.Get("http://" + n1.Addr("http") + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `fetch("api/overview"`) ||
		!strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") || resp.Header.Get("Content-Security-Policy") == "" {
		t.Fatalf("GET /: %d %v\n%.200s", resp.StatusCode, resp.Header, body)
	}
	if resp, err := http.Get("http://" + n1.Addr("http") + "/nothing"); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /nothing: %v %v", resp, err)
	}
}

// TestListsPage: /api/clients and /api/sessions page with ?limit= and
// ?after= (without them, the whole list as before).
func TestListsPage(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	for _, id := range []string{"pg-c", "pg-a", "pg-b"} {
		testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true, SessionExpiry: 600})
	}
	get := func(path string, v any) {
		t.Helper()
		resp, err := http.Get("http://" + n1.Addr("http") + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	// The cluster-wide list reads the ownership table: claims commit
	// after the CONNACK.
	testutil.Eventually(t, wait, func() error {
		if all := n1.AllClients(); len(all) != 3 {
			return fmt.Errorf("all clients: %+v", all)
		}
		return nil
	})
	for _, list := range []string{"/api/clients?", "/api/clients?all=1&", "/api/sessions?"} {
		var ids []string
		after := ""
		for pages := 0; ; pages++ {
			if pages > 3 {
				t.Fatalf("%s: no end", list)
			}
			var p Page[struct {
				ClientID string `json:"client_id"`
			}]
			get(list+"limit=2&after="+url.QueryEscape(after), &p)
			for _, it := range p.Items {
				ids = append(ids, it.ClientID)
			}
			if after = p.Next; after == "" {
				break
			}
		}
		if strings.Join(ids, ",") != "pg-a,pg-b,pg-c" {
			t.Fatalf("%s paged: %v", list, ids)
		}
	}
	var whole []ClientInfo
	get("/api/clients", &whole)
	if len(whole) != 3 {
		t.Fatalf("unpaged: %+v", whole)
	}
}
