package replication

import "strings"

// matchFilter reports whether the plain (non-shared) MQTT topic filter
// matches topic (MQTT 5 §4.7): '+' matches exactly one level, possibly
// empty; '#' matches its parent level and any number of child levels; a
// filter starting with a wildcard does not match a topic starting with '$'.
// The state machine matches wills against the sessions' subscriptions with
// it (PublishWill); it must agree with mochi's topic index, which the hooks
// use for every other publish. This package imports neither mochi nor
// cluster (make deps-check), hence its own copy.
func matchFilter(filter, topic string) bool {
	if topic != "" && topic[0] == '$' && filter != "" && (filter[0] == '+' || filter[0] == '#') {
		return false
	}
	for {
		fl, frest, fmore := cutLevel(filter)
		if fl == "#" && !fmore {
			return true
		}
		tl, trest, tmore := cutLevel(topic)
		if fl != "+" && fl != tl {
			return false
		}
		switch {
		case !fmore && !tmore:
			return true
		case !tmore:
			return frest == "#" // "a/#" matches "a"
		case !fmore:
			return false
		}
		filter, topic = frest, trest
	}
}

// isSharedFilter reports whether filter is a shared subscription
// ($share/group/filter, prefix compared case-insensitively as mochi does).
func isSharedFilter(filter string) bool {
	const p = "$share/"
	return len(filter) >= len(p) && strings.EqualFold(filter[:len(p)], p)
}

func cutLevel(s string) (level, rest string, more bool) {
	if i := strings.IndexByte(s, '/'); i >= 0 {
		return s[:i], s[i+1:], true
	}
	return s, "", false
}

// MatchFilter is matchFilter for callers outside the state machine (the
// admin API's retained listing).
func MatchFilter(filter, topic string) bool { return matchFilter(filter, topic) }
