package cluster

import "strings"

// routeIndex is a trie over filter levels answering "which remote nodes have a
// filter matching this topic". It is written only under routeTable.mu and read
// under its read lock; it has no lock of its own.
//
// Plain filters and shared filters live in the same trie: a shared filter
// "$share/g/a/+" is indexed at the path of its inner filter "a/+" and keyed by
// the full string, because the full string is what identifies the group in
// mochi (Subscribers.Shared) and on the wire.
type routeIndex struct {
	root trieNode
	size int // number of (filter, node) entries
}

type trieNode struct {
	children map[string]*trieNode
	plain    map[string]struct{}            // node ids with this exact plain filter
	shared   map[string]map[string]struct{} // full shared filter -> node ids
}

func (t *trieNode) empty() bool {
	return len(t.children) == 0 && len(t.plain) == 0 && len(t.shared) == 0
}

// sharedMatch lists, for one shared group (full filter), the remote nodes that
// have at least one member.
type sharedMatch struct {
	Group string
	Nodes []string
}

// matchResult is the answer of routeIndex.match. It is reused across calls
// (see Node.Forward) to keep the publish path allocation-light.
type matchResult struct {
	plain  []string
	shared []sharedMatch
}

func (m *matchResult) reset() {
	m.plain = m.plain[:0]
	for i := range m.shared {
		m.shared[i].Nodes = m.shared[i].Nodes[:0]
	}
	m.shared = m.shared[:0]
}

// add records that node has filter. It returns false if it was already there.
func (x *routeIndex) add(filter, node string) bool {
	group := ""
	path := filter
	if _, inner, ok := ParseShared(filter); ok {
		group, path = filter, inner
	}
	t := &x.root
	for lvl, rest, more := cut(path); ; lvl, rest, more = cut(rest) {
		c := t.children[lvl]
		if c == nil {
			if t.children == nil {
				t.children = make(map[string]*trieNode)
			}
			c = &trieNode{}
			t.children[lvl] = c
		}
		t = c
		if !more {
			break
		}
	}
	var set map[string]struct{}
	if group == "" {
		if t.plain == nil {
			t.plain = make(map[string]struct{})
		}
		set = t.plain
	} else {
		if t.shared == nil {
			t.shared = make(map[string]map[string]struct{})
		}
		set = t.shared[group]
		if set == nil {
			set = make(map[string]struct{})
			t.shared[group] = set
		}
	}
	if _, ok := set[node]; ok {
		return false
	}
	set[node] = struct{}{}
	x.size++
	return true
}

// remove deletes (filter, node) and prunes trie nodes left empty, so a churn
// of distinct filters does not grow the trie forever.
func (x *routeIndex) remove(filter, node string) bool {
	group := ""
	path := filter
	if _, inner, ok := ParseShared(filter); ok {
		group, path = filter, inner
	}
	var stack [16]*trieNode
	nodes := append(stack[:0], &x.root)
	var levels []string
	t := &x.root
	for lvl, rest, more := cut(path); ; lvl, rest, more = cut(rest) {
		t = t.children[lvl]
		if t == nil {
			return false
		}
		nodes = append(nodes, t)
		levels = append(levels, lvl)
		if !more {
			break
		}
	}
	if group == "" {
		if _, ok := t.plain[node]; !ok {
			return false
		}
		delete(t.plain, node)
	} else {
		set := t.shared[group]
		if _, ok := set[node]; !ok {
			return false
		}
		delete(set, node)
		if len(set) == 0 {
			delete(t.shared, group)
		}
	}
	x.size--
	for i := len(nodes) - 1; i > 0 && nodes[i].empty(); i-- {
		delete(nodes[i-1].children, levels[i-1])
	}
	return true
}

// match appends to res the nodes whose plain filters match topic (each node
// once) and, per matching shared group, the nodes holding that group.
func (x *routeIndex) match(topic string, res *matchResult) {
	dollar := strings.HasPrefix(topic, "$")
	x.walk(&x.root, topic, true, dollar, res)
}

func (x *routeIndex) walk(t *trieNode, topic string, root, dollar bool, res *matchResult) {
	lvl, rest, more := cut(topic)
	wild := !(root && dollar) // [MQTT-4.7.2-1]: no wildcard match of $ topics at the first level
	if wild {
		if h := t.children["#"]; h != nil {
			collect(h, res)
		}
		if p := t.children["+"]; p != nil {
			x.step(p, rest, more, res)
		}
	}
	if lvl == "+" || lvl == "#" {
		return // not a valid topic level; never treat it as a literal
	}
	if c := t.children[lvl]; c != nil {
		x.step(c, rest, more, res)
	}
}

// step continues the walk below t after one topic level was consumed.
func (x *routeIndex) step(t *trieNode, rest string, more bool, res *matchResult) {
	if !more {
		collect(t, res)
		// "a/#" also matches "a".
		if h := t.children["#"]; h != nil {
			collect(h, res)
		}
		return
	}
	x.walk(t, rest, false, false, res)
}

func collect(t *trieNode, res *matchResult) {
outer:
	for n := range t.plain {
		for _, have := range res.plain {
			if have == n {
				continue outer
			}
		}
		res.plain = append(res.plain, n)
	}
	for g, set := range t.shared {
		var sm *sharedMatch
		if len(res.shared) < cap(res.shared) {
			res.shared = res.shared[:len(res.shared)+1]
		} else {
			res.shared = append(res.shared, sharedMatch{})
		}
		sm = &res.shared[len(res.shared)-1]
		sm.Group = g
		sm.Nodes = sm.Nodes[:0]
		for n := range set {
			sm.Nodes = append(sm.Nodes, n)
		}
	}
}
