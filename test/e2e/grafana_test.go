package e2e

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
)

// dashboardExprs returns the PromQL of every panel of the Grafana
// dashboard in deploy/grafana, failing on a panel without queries.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile("../../deploy/grafana/broker-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title      string `json:"title"`
			Type       string `json:"type"`
			Datasource struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	var exprs []string
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 || p.Datasource.UID != "${datasource}" {
			t.Fatalf("panel %q: %d queries, datasource %q", p.Title, len(p.Targets), p.Datasource.UID)
		}
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	if len(exprs) < 10 {
		t.Fatalf("only %d queries in the dashboard", len(exprs))
	}
	return exprs
}

// TestGrafanaDashboardQueriesExist: every metric the dashboard in
// deploy/grafana queries, and every label it selects on, is in /metrics of
// a running node after some traffic.
func TestGrafanaDashboardQueriesExist(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	sub := b.sub(t, "-i", "grafana-sub", "-c", "-q", "1", "-t", "grafana/#", "-E")
	sub.wait(t)
	b.mustPub(t, "-q", "1", "-t", "grafana/x", "-m", "1")
	b.mustPub(t, "-q", "1", "-r", "-t", "grafana/r", "-m", "1")
	code, body, err := b.HTTPGet("/metrics")
	if err != nil || code != 200 {
		t.Fatalf("/metrics: %d %v", code, err)
	}
	labels := map[string]map[string]bool{} // metric name -> label keys seen
	line := regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? `)
	key := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`)
	for _, l := range strings.Split(body, "\n") {
		m := line.FindStringSubmatch(l)
		if m == nil || strings.HasPrefix(l, "#") {
			continue
		}
		if labels[m[1]] == nil {
			labels[m[1]] = map[string]bool{}
		}
		for _, k := range key.FindAllStringSubmatch(m[2], -1) {
			labels[m[1]][k[1]] = true
		}
	}
	metric := regexp.MustCompile(`\b(broker_[a-z0-9_]+)(\{[^}]*\})?`)
	selector := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	seen := 0
	for _, expr := range dashboardExprs(t) {
		for _, m := range metric.FindAllStringSubmatch(expr, -1) {
			seen++
			have, ok := labels[m[1]]
			if !ok {
				t.Errorf("dashboard queries %s (in %q): not in /metrics", m[1], expr)
				continue
			}
			for _, s := range selector.FindAllStringSubmatch(m[2], -1) {
				if !have[s[1]] {
					t.Errorf("dashboard selects %s on label %q (in %q): /metrics has no such label", m[1], s[1], expr)
				}
			}
		}
	}
	if seen == 0 {
		t.Fatal("no broker_ metric found in the dashboard's queries")
	}
}
