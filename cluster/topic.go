package cluster

import "strings"

// sharePrefix introduces a shared subscription. mochi compares it case
// insensitively ($SHARE, $share), so the route table does too: the key a
// caller announces must be the same string mochi stores the group under.
const sharePrefix = "$share/"

// ParseShared splits a shared subscription filter "$share/{group}/{filter}".
// ok is false for plain filters and for malformed shared filters (empty group,
// wildcard in the group, empty inner filter), which are then treated as plain
// filters that match nothing useful.
func ParseShared(filter string) (group, inner string, ok bool) {
	if len(filter) < len(sharePrefix) || !strings.EqualFold(filter[:len(sharePrefix)], sharePrefix) {
		return "", "", false
	}
	rest := filter[len(sharePrefix):]
	i := strings.IndexByte(rest, '/')
	if i <= 0 || i == len(rest)-1 {
		return "", "", false
	}
	group, inner = rest[:i], rest[i+1:]
	if strings.ContainsAny(group, "+#") {
		return "", "", false
	}
	return group, inner, true
}

// ValidFilter reports whether filter is a syntactically valid MQTT topic
// filter (shared filters are checked on their inner filter): '#' only as the
// whole last level, '+' only as a whole level, no NUL, not empty.
func ValidFilter(filter string) bool {
	if strings.IndexByte(filter, 0) >= 0 {
		return false // anywhere, the share group included
	}
	if first, _, _ := cut(filter); strings.EqualFold(first, sharePrefix[:len(sharePrefix)-1]) {
		_, inner, ok := ParseShared(filter)
		if !ok {
			return false
		}
		filter = inner
	}
	if filter == "" {
		return false
	}
	levels := strings.Split(filter, "/")
	for i, lvl := range levels {
		switch {
		case lvl == "#":
			if i != len(levels)-1 {
				return false
			}
		case lvl == "+":
		case strings.ContainsAny(lvl, "+#"):
			return false
		}
	}
	return true
}

// ValidTopic reports whether topic is a valid topic name for a PUBLISH: not
// empty, no wildcards, no NUL.
func ValidTopic(topic string) bool {
	return topic != "" && !strings.ContainsAny(topic, "+#\x00")
}

// Match reports whether the plain (non-shared) filter matches topic, following
// MQTT 3.1.1 §4.7 / MQTT 5 §4.7: '+' matches exactly one level (possibly
// empty), '#' matches the parent level and any number of child levels, and a
// filter starting with a wildcard does not match a topic starting with '$'.
func Match(filter, topic string) bool {
	if len(topic) > 0 && topic[0] == '$' && len(filter) > 0 && (filter[0] == '+' || filter[0] == '#') {
		return false
	}
	for {
		fl, frest, fmore := cut(filter)
		if fl == "#" && !fmore {
			return true
		}
		tl, trest, tmore := cut(topic)
		if fl != "+" && fl != tl {
			return false
		}
		switch {
		case !fmore && !tmore:
			return true
		case !tmore:
			// Topic exhausted: only a trailing "/#" still matches ("a/#" matches "a").
			return frest == "#"
		case !fmore:
			return false
		}
		filter, topic = frest, trest
	}
}

// cut returns the first level of s, the rest after the separator, and whether
// there was a separator at all (so "a/" yields "a", "", true).
func cut(s string) (level, rest string, more bool) {
	if i := strings.IndexByte(s, '/'); i >= 0 {
		return s[:i], s[i+1:], true
	}
	return s, "", false
}
