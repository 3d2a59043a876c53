package fuzzutil

import "strings"

// The reference follows MQTT 5 §4.7 and §4.8.2 literally, level by level,
// with none of the production code's shortcuts (no cut loop, no trie), so
// that a disagreement points at one of the two.

// ValidTopic reports whether topic is a valid topic name for a PUBLISH:
// not empty, no wildcard character, no NUL.
func ValidTopic(topic string) bool {
	return topic != "" && !strings.ContainsAny(topic, "+#\x00")
}

// ValidFilter reports whether filter is a valid topic filter: no NUL
// anywhere [MQTT-1.5.4-2], not empty, every level either "#" (last level
// only), "+", or free of both wildcard characters. A filter whose first
// level is "$share" (any case, as mochi compares it) must be a shared
// subscription "$share/{group}/{filter}" with a non-empty group free of
// wildcards and a non-empty valid inner filter. (UTF-8 validity is left to
// the MQTT packet decoder.)
func ValidFilter(filter string) bool {
	if strings.Contains(filter, "\x00") {
		return false
	}
	levels := strings.Split(filter, "/")
	if strings.EqualFold(levels[0], "$share") {
		if len(levels) < 3 || levels[1] == "" || strings.ContainsAny(levels[1], "+#") {
			return false
		}
		levels = levels[2:]
		filter = strings.Join(levels, "/")
	}
	if filter == "" {
		return false
	}
	for i, l := range levels {
		if l == "#" && i != len(levels)-1 {
			return false
		}
		if l != "#" && l != "+" && strings.ContainsAny(l, "+#") {
			return false
		}
	}
	return true
}

// SharedInner returns the inner filter of a shared subscription filter
// and true, or "" and false for a filter that is not one.
func SharedInner(filter string) (string, bool) {
	levels := strings.Split(filter, "/")
	if !strings.EqualFold(levels[0], "$share") || !ValidFilter(filter) {
		return "", false
	}
	return strings.Join(levels[2:], "/"), true
}

// HasSharePrefix reports whether filter starts with "$share/" in any case.
func HasSharePrefix(filter string) bool {
	return len(filter) >= 7 && strings.EqualFold(filter[:7], "$share/")
}

// Match reports whether the valid plain filter matches the valid topic:
// "+" matches exactly one level (possibly empty), "#" matches its parent
// level and any number of levels below, other levels match themselves, and
// a filter whose first level is a wildcard never matches a topic starting
// with '$' [MQTT-4.7.2-1].
func Match(filter, topic string) bool {
	f, t := strings.Split(filter, "/"), strings.Split(topic, "/")
	if (f[0] == "+" || f[0] == "#") && strings.HasPrefix(topic, "$") {
		return false
	}
	for i, l := range f {
		switch {
		case l == "#":
			return true
		case i >= len(t):
			return false
		case l != "+" && l != t[i]:
			return false
		}
	}
	return len(f) == len(t)
}
