package cluster

import (
	"fmt"
	"math/rand/v2"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

func TestMatchTable(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/b", "a/b/c", false},
		{"a/b/c", "a/b", false},
		{"a/+", "a/b", true},
		{"a/+", "a/", true}, // '+' matches an empty level
		{"a/+", "a", false},
		{"a/+", "a/b/c", false},
		{"+/+", "/", true},
		{"+", "/", false},
		{"/+", "/x", true},
		{"a/#", "a", true}, // '#' includes the parent level
		{"a/#", "a/", true},
		{"a/#", "a/b/c", true},
		{"a/#", "ab", false},
		{"#", "a", true},
		{"#", "/", true},
		{"#", "a/b/c", true},
		{"+/#", "a", true},
		{"+/b/#", "a/b", true},
		{"a/+/c", "a/b/c", true},
		{"a/+/c", "a/b/d", false},
		{"#", "$SYS/x", false}, // [MQTT-4.7.2-1]
		{"+/x", "$SYS/x", false},
		{"+/#", "$SYS", false},
		{"$SYS/#", "$SYS/x", true},
		{"$SYS/+", "$SYS/x", true},
		{"a/$x", "a/$x", true},
		{"+/$x", "a/$x", true}, // the rule is about the first level of the topic only
		{"sport/tennis/+", "sport/tennis/player1", true},
		{"sport/tennis/+", "sport/tennis/player1/ranking", false},
		{"sport/#", "sport", true},
	}
	for _, tt := range tests {
		if got := Match(tt.filter, tt.topic); got != tt.want {
			t.Errorf("Match(%q, %q) = %v, want %v", tt.filter, tt.topic, got, tt.want)
		}
	}
}

func TestParseShared(t *testing.T) {
	tests := []struct {
		in, group, inner string
		ok               bool
	}{
		{"$share/g/a/b", "g", "a/b", true},
		{"$SHARE/g/#", "g", "#", true},
		{"$Share/grp/+/x", "grp", "+/x", true},
		{"$share/g/", "", "", false},
		{"$share//a", "", "", false},
		{"$share/g", "", "", false},
		{"$share/g+/a", "", "", false},
		{"$shared/g/a", "", "", false},
		{"a/b", "", "", false},
		{"$share", "", "", false},
	}
	for _, tt := range tests {
		g, in, ok := ParseShared(tt.in)
		if g != tt.group || in != tt.inner || ok != tt.ok {
			t.Errorf("ParseShared(%q) = %q, %q, %v; want %q, %q, %v", tt.in, g, in, ok, tt.group, tt.inner, tt.ok)
		}
	}
}

func TestValidFilter(t *testing.T) {
	valid := []string{"a", "a/b", "+", "#", "a/+/b", "a/#", "+/+/#", "/", "$SYS/#", "$share/g/a/#", "$SHARE/g/+"}
	invalid := []string{"", "a/#/b", "a#", "a/b+", "#/a", "$share/g", "$share//a", "$share/g+/a", "$share", "a\x00b", "$share/g/a#",
		"$share/g\x00/a"} // NUL in the group (found by FuzzMatch)
	for _, f := range valid {
		if !ValidFilter(f) {
			t.Errorf("ValidFilter(%q) = false, want true", f)
		}
	}
	for _, f := range invalid {
		if ValidFilter(f) {
			t.Errorf("ValidFilter(%q) = true, want false", f)
		}
	}
}

// oracleMatch is an independent definition of MQTT matching: the filter is
// compiled to a regular expression, level by level.
func oracleMatch(filter, topic string) bool {
	if strings.HasPrefix(topic, "$") && (strings.HasPrefix(filter, "+") || strings.HasPrefix(filter, "#")) {
		return false
	}
	var re strings.Builder
	re.WriteString("^")
	levels := strings.Split(filter, "/")
	for i, l := range levels {
		switch l {
		case "#":
			// "#" alone matches everything; "x/#" matches "x" and "x/anything".
			if i == 0 {
				re.WriteString(".*")
			} else {
				re.WriteString("(/.*)?")
			}
			continue
		case "+":
			if i > 0 {
				re.WriteString("/")
			}
			re.WriteString("[^/]*")
		default:
			if i > 0 {
				re.WriteString("/")
			}
			re.WriteString(regexp.QuoteMeta(l))
		}
	}
	re.WriteString("$")
	return regexp.MustCompile(re.String()).MatchString(topic)
}

var (
	topicLevels  = []string{"a", "b", "", "$SYS", "$x", "long-level"}
	filterLevels = []string{"a", "b", "", "$SYS", "$x", "+", "+"}
)

func randTopic(r *rand.Rand) string {
	n := 1 + r.IntN(4)
	parts := make([]string, n)
	for i := range parts {
		parts[i] = topicLevels[r.IntN(len(topicLevels))]
	}
	t := strings.Join(parts, "/")
	if t == "" {
		t = "a"
	}
	return t
}

func randFilter(r *rand.Rand) string {
	n := 1 + r.IntN(4)
	parts := make([]string, 0, n)
	for i := 0; i < n; i++ {
		parts = append(parts, filterLevels[r.IntN(len(filterLevels))])
	}
	if r.IntN(3) == 0 {
		parts = append(parts[:r.IntN(len(parts))], "#")
	}
	f := strings.Join(parts, "/")
	if f == "" {
		f = "#"
	}
	return f
}

// TestMatchProperty checks Match against the regular-expression oracle on
// random (filter, topic) pairs over a small alphabet, so that the corner
// cases (empty levels, '$' levels, trailing '#') come up often.
func TestMatchProperty(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	hits := 0
	for i := 0; i < 50000; i++ {
		f, tp := randFilter(r), randTopic(r)
		if !ValidFilter(f) {
			t.Fatalf("generator produced invalid filter %q", f)
		}
		want := oracleMatch(f, tp)
		if got := Match(f, tp); got != want {
			t.Fatalf("Match(%q, %q) = %v, oracle says %v", f, tp, got, want)
		}
		if want {
			hits++
		}
	}
	if hits < 5000 {
		t.Fatalf("only %d matching pairs: the generator does not exercise matches", hits)
	}
}

// TestIndexMatchesBruteForce checks the trie against Match over a random
// route table (plain and shared filters on several nodes), including after
// random removals, which exercises trie pruning.
func TestIndexMatchesBruteForce(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	type route struct{ filter, node string }
	for round := 0; round < 20; round++ {
		var x routeIndex
		var routes []route
		for i := 0; i < 60; i++ {
			f := randFilter(r)
			if r.IntN(4) == 0 {
				f = fmt.Sprintf("$share/g%d/%s", r.IntN(2), f)
			}
			rt := route{f, fmt.Sprintf("n%d", r.IntN(4))}
			if x.add(rt.filter, rt.node) {
				routes = append(routes, rt)
			}
		}
		for i := 0; i < 20; i++ {
			k := r.IntN(len(routes))
			if !x.remove(routes[k].filter, routes[k].node) {
				t.Fatalf("remove(%v) = false", routes[k])
			}
			routes = slices.Delete(routes, k, k+1)
		}
		if x.size != len(routes) {
			t.Fatalf("index size %d, want %d", x.size, len(routes))
		}
		for i := 0; i < 300; i++ {
			topic := randTopic(r)
			wantPlain := map[string]bool{}
			wantShared := map[string]map[string]bool{}
			for _, rt := range routes {
				if _, inner, ok := ParseShared(rt.filter); ok {
					if Match(inner, topic) {
						if wantShared[rt.filter] == nil {
							wantShared[rt.filter] = map[string]bool{}
						}
						wantShared[rt.filter][rt.node] = true
					}
				} else if Match(rt.filter, topic) {
					wantPlain[rt.node] = true
				}
			}
			var res matchResult
			x.match(topic, &res)
			if got, want := sortedSet(res.plain), sortedKeys(wantPlain); !slices.Equal(got, want) {
				t.Fatalf("topic %q: plain nodes %v, want %v", topic, got, want)
			}
			gotShared := map[string][]string{}
			for _, sm := range res.shared {
				if _, dup := gotShared[sm.Group]; dup {
					t.Fatalf("topic %q: group %q reported twice", topic, sm.Group)
				}
				gotShared[sm.Group] = sortedSet(sm.Nodes)
			}
			if len(gotShared) != len(wantShared) {
				t.Fatalf("topic %q: shared %v, want %v", topic, gotShared, wantShared)
			}
			for g, nodes := range wantShared {
				if !slices.Equal(gotShared[g], sortedKeys(nodes)) {
					t.Fatalf("topic %q group %q: nodes %v, want %v", topic, g, gotShared[g], sortedKeys(nodes))
				}
			}
		}
		// Remove everything: the trie must collapse to an empty root.
		for _, rt := range routes {
			x.remove(rt.filter, rt.node)
		}
		if !x.root.empty() || x.size != 0 {
			t.Fatalf("trie not empty after removing every route: %+v", x.root)
		}
	}
}

func sortedSet(s []string) []string {
	out := slices.Clone(s)
	sort.Strings(out)
	if len(slices.Compact(slices.Clone(out))) != len(out) {
		return append(out, "<duplicate>")
	}
	if out == nil {
		out = []string{}
	}
	return out
}

func sortedKeys(m map[string]bool) []string {
	out := []string{}
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// BenchmarkMatch compares the trie with a linear scan over 10,000 routes
// spread over 5 nodes (Home Assistant style: many exact device topics plus a
// few wildcards).
func BenchmarkMatch(b *testing.B) {
	var x routeIndex
	type route struct{ filter, node string }
	var routes []route
	for i := 0; i < 10000; i++ {
		f := fmt.Sprintf("homeassistant/sensor/dev%d/state", i)
		if i%100 == 0 {
			f = fmt.Sprintf("custom/site%d/+/temp", i)
		}
		n := fmt.Sprintf("n%d", i%5)
		x.add(f, n)
		routes = append(routes, route{f, n})
	}
	x.add("teslamate/#", "n1")
	routes = append(routes, route{"teslamate/#", "n1"})
	topic := "homeassistant/sensor/dev4242/state"
	b.Run("trie", func(b *testing.B) {
		var res matchResult
		for b.Loop() {
			res.reset()
			x.match(topic, &res)
		}
	})
	b.Run("linear", func(b *testing.B) {
		for b.Loop() {
			var nodes []string
			for _, r := range routes {
				if Match(r.filter, topic) && !slices.Contains(nodes, r.node) {
					nodes = append(nodes, r.node)
				}
			}
		}
	})
}
