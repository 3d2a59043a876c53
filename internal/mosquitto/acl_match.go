package mosquitto

import "strings"

// Topic matching for ACL rules. A rule is a topic filter (levels of literal,
// +, #, or, in patterns, a literal containing %c/%u). Three questions are
// asked of it:
//
//   - matchTopic: does the rule match this topic name? (Read, Write)
//   - coversFilter: does it match every topic a filter matches? (deny rules
//     for Subscribe)
//   - intersectsFilter: does it match at least one topic a filter
//     matches? (allow rules for Subscribe)
//
// For a filter without wildcards all three give the same answer, which the
// tests check: mochi asks the same question for a subscription to a plain
// topic and for a delivery on it, so the answers must agree.
//
// '$' topics: wildcards in the first level never match a topic whose first
// level starts with '$' (MQTT 4.7.2), so a rule and a topic (or filter) can
// only meet when both or neither start with '$'.

// text is a rule level with %c/%u substituted.
func (r *rule) text(i int, v *vars) string {
	if r.levels[i].kind == lvTmpl {
		return v.sub(r.levels[i].s)
	}
	return r.levels[i].s
}

// matchTopic walks the topic without splitting it: it runs for every
// delivery to a subscriber, so it should not allocate.
func matchTopic(r *rule, topic string, v *vars) bool {
	if (topic[0] == '$') != r.dollar {
		return false
	}
	rest := topic
	for i := 0; i < len(r.levels); i++ {
		if r.levels[i].kind == lvHash {
			return true
		}
		j := strings.IndexByte(rest, '/')
		tl := rest
		if j >= 0 {
			tl = rest[:j]
		}
		if r.levels[i].kind != lvPlus && r.text(i, v) != tl {
			return false
		}
		if j < 0 {
			// The topic has ended: so must the rule, unless all that is
			// left is "/#", which also matches the parent level.
			left := len(r.levels) - i - 1
			return left == 0 || (left == 1 && r.levels[i+1].kind == lvHash)
		}
		rest = rest[j+1:]
	}
	return false // the topic has more levels than the rule
}

// filterDollar reports whether every topic the filter matches starts with
// '$' (a literal first level starting with '$'); otherwise none does.
func filterDollar(f []string) bool {
	return f[0] != "+" && f[0] != "#" && strings.HasPrefix(f[0], "$")
}

func coversFilter(r *rule, f []string, v *vars) bool {
	if filterDollar(f) != r.dollar {
		return false
	}
	for i := 0; ; i++ {
		if i < len(r.levels) && r.levels[i].kind == lvHash {
			return true
		}
		if i == len(f) {
			return i == len(r.levels)
		}
		if i == len(r.levels) {
			return false
		}
		switch fl := f[i]; fl {
		case "#":
			return false // the rule has no # here, so it misses deeper topics
		case "+":
			if r.levels[i].kind != lvPlus {
				return false
			}
		default:
			if r.levels[i].kind != lvPlus && r.text(i, v) != fl {
				return false
			}
		}
	}
}

func intersectsFilter(r *rule, f []string, v *vars) bool {
	if filterDollar(f) != r.dollar {
		return false
	}
	for i := 0; ; i++ {
		rEnd, fEnd := i == len(r.levels), i == len(f)
		if !rEnd && r.levels[i].kind == lvHash {
			return true
		}
		if !fEnd && f[i] == "#" {
			return true
		}
		if rEnd || fEnd {
			return rEnd && fEnd
		}
		if f[i] == "+" || r.levels[i].kind == lvPlus {
			continue
		}
		if r.text(i, v) != f[i] {
			return false
		}
	}
}
