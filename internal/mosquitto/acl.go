package mosquitto

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"unicode"
)

// Access is what a client asks to do with a topic.
type Access uint8

const (
	// Read is receiving a PUBLISH on a topic name (delivery, including
	// retained messages).
	Read Access = iota + 1
	// Write is sending a PUBLISH to a topic name (including a will).
	Write
	// Subscribe is subscribing to a topic filter, which may contain
	// wildcards and a $share/<group>/ prefix.
	Subscribe
)

func (a Access) String() string {
	switch a {
	case Read:
		return "read"
	case Write:
		return "write"
	case Subscribe:
		return "subscribe"
	}
	return "unknown"
}

// Rule access bits, as in Mosquitto: "deny" is the absence of both.
const (
	bitRead  uint8 = 1
	bitWrite uint8 = 2
)

// ACL is a parsed Mosquitto acl_file. It is immutable and safe for
// concurrent use.
//
// Semantics, matching Mosquitto 2.0's built-in ACL check
// (src/security_default.c):
//
//   - "topic" lines before the first "user" line apply to anonymous
//     clients only; lines after "user NAME" apply to that username only
//     (repeated user blocks for one name merge). "pattern" lines apply to
//     every client wherever they appear.
//   - A client's own topic rules are checked first: a matching deny
//     refuses, then a matching rule granting the access allows. Only if
//     neither decides are the pattern rules checked the same way
//     (deny first). Nothing matching means refused. So deny beats allow
//     within a list, but a user's own allow is decided before any pattern
//     deny is looked at, exactly as in Mosquitto.
//   - In patterns %c is the client id and %u the username; a pattern using
//     %u never applies to anonymous clients. If the username or client id
//     contains + or #, every pattern check is refused (Mosquitto's
//     CVE-2017-7650 rule). Going further than Mosquitto, an allowing
//     pattern is skipped when a substituted value contains '/' or makes the
//     rule start with '$', so a client id such as "a/b" or "$SYS" cannot
//     reach another client's subtree or $SYS.
//   - Wildcards at the first level never match topics starting with '$'.
//
// Subscribe: Mosquitto 2.0 grants every SUBSCRIBE and filters each message
// at delivery time with the read check (verified against mosquitto 2.0.11:
// a user with only "topic read a/#" gets SUBACK 0 for "#" and "b/#" alike,
// then receives only a/...). mochi-mqtt asks the same question for a
// subscribe with a plain filter and for a delivery, so a plain filter must
// get exactly the read answer; for wildcard filters we keep that rule
// consistent: a filter is granted when at least one topic it matches could
// be readable (it intersects a read rule and no deny rule covers it whole).
// Deliveries are still checked one by one, so a granted filter never widens
// what is received; a refused one could never have delivered anything. The
// one difference from Mosquitto is that SUBACK reports 0x87/0x80 for such
// useless subscriptions instead of granting them silently.
type ACL struct {
	anon     ruleList
	users    map[string]*ruleList
	patterns ruleList
	rules    int
}

type ruleList struct {
	deny, allow []rule
}

type rule struct {
	bits   uint8 // 0 = deny
	filter string
	levels []level
	dollar bool // filter starts with '$'
	useC   bool // pattern contains %c
	useU   bool // pattern contains %u
	line   int
}

type levelKind uint8

const (
	lvLit  levelKind = iota
	lvPlus           // +
	lvHash           // #
	lvTmpl           // literal containing %c or %u (patterns only)
)

type level struct {
	kind levelKind
	s    string
}

// Rules is the number of topic and pattern rules, for logging.
func (a *ACL) Rules() int {
	if a == nil {
		return 0
	}
	return a.rules
}

// ParseACL parses a Mosquitto acl_file. It accepts everything Mosquitto
// accepts, with the same meaning (including "topic X" meaning readwrite X);
// it is more lenient only about whitespace: tabs separate words and lines
// may be indented, including comments.
func ParseACL(name string, r io.Reader) (*ACL, error) {
	a := &ACL{users: map[string]*ruleList{}}
	var errs []error
	fail := func(line int, directive, value, msg string, args ...any) {
		if len(errs) < maxErrors {
			errs = append(errs, &ConfigError{File: name, Line: line, Directive: directive, Value: value, Msg: fmt.Sprintf(msg, args...)})
		}
	}
	cur := &a.anon // topic lines before any user line: anonymous clients
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 256*1024)
	n := 0
	for sc.Scan() {
		n++
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == '#' {
			continue
		}
		keyword, rest := cutWord(text)
		switch keyword {
		case "user":
			if rest == "" {
				fail(n, keyword, "", "missing username; use e.g. \"user alice\"")
				continue
			}
			// Usernames may contain spaces: Mosquitto takes the rest of the line.
			l := a.users[rest]
			if l == nil {
				l = &ruleList{}
				a.users[rest] = l
			}
			cur = l
		case "topic", "pattern":
			if rest == "" {
				fail(n, keyword, "", "missing topic; use e.g. %q", keyword+" read sensors/#")
				continue
			}
			accessWord, topic := cutWord(rest)
			var bits uint8
			if topic == "" {
				// "topic a/b" means readwrite; so does "topic read", whose
				// topic is then literally "read" (Mosquitto does the same).
				topic, bits = accessWord, bitRead|bitWrite
			} else {
				switch accessWord {
				case "read":
					bits = bitRead
				case "write":
					bits = bitWrite
				case "readwrite":
					bits = bitRead | bitWrite
				case "deny":
					bits = 0
				default:
					fail(n, keyword, accessWord, "unknown access; use read, write, readwrite or deny, e.g. %q", keyword+" read sensors/#")
					continue
				}
			}
			if msg := checkFilter(topic); msg != "" {
				fail(n, keyword, topic, "%s", msg)
				continue
			}
			ru := newRule(topic, bits, keyword == "pattern", n)
			if keyword == "pattern" {
				a.patterns.add(ru)
			} else {
				cur.add(ru)
			}
			a.rules++
		default:
			fail(n, keyword, "", "unknown keyword; ACL lines start with topic, pattern or user (comments with #)")
		}
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, &ConfigError{File: name, Line: n + 1, Msg: "cannot read the file: " + err.Error()})
	}
	if err := joinErrors(errs); err != nil {
		return nil, err
	}
	return a, nil
}

// cutWord splits off the first whitespace-separated word and returns the
// trimmed remainder.
func cutWord(s string) (word, rest string) {
	i := strings.IndexFunc(s, unicode.IsSpace)
	if i < 0 {
		return s, ""
	}
	return s[:i], strings.TrimSpace(s[i:])
}

func (l *ruleList) add(r rule) {
	if r.bits == 0 {
		l.deny = append(l.deny, r)
	} else {
		l.allow = append(l.allow, r)
	}
}

func newRule(filter string, bits uint8, pattern bool, line int) rule {
	r := rule{bits: bits, filter: filter, dollar: strings.HasPrefix(filter, "$"), line: line}
	for _, s := range strings.Split(filter, "/") {
		lv := level{kind: lvLit, s: s}
		switch {
		case s == "+":
			lv.kind = lvPlus
		case s == "#":
			lv.kind = lvHash
		case pattern && (strings.Contains(s, "%c") || strings.Contains(s, "%u")):
			lv.kind = lvTmpl
			r.useC = r.useC || strings.Contains(s, "%c")
			r.useU = r.useU || strings.Contains(s, "%u")
		}
		r.levels = append(r.levels, lv)
	}
	return r
}

// checkFilter validates a topic filter like mosquitto_sub_topic_check:
// + and # must fill a whole level and # must be last. It returns "" when
// the filter is valid.
func checkFilter(f string) string {
	if f == "" {
		return "empty topic filter"
	}
	if len(f) > 65535 {
		return "topic filter longer than 65535 bytes"
	}
	levels := strings.Split(f, "/")
	for i, lv := range levels {
		if lv == "+" || (lv == "#" && i == len(levels)-1) {
			continue
		}
		if strings.ContainsAny(lv, "+#") {
			return "invalid topic filter: + and # must fill a whole level and # must be last, e.g. \"sensors/+/temp\" or \"sensors/#\""
		}
	}
	return ""
}

// Allowed reports whether the client may perform access on topic. username
// "" means an anonymous client. For Read and Write, topic is a topic name
// (wildcards refused); for Subscribe it is a filter, optionally shared
// ($share/<group>/<filter>; the group is not checked). A nil ACL refuses
// everything: "no acl_file" is the caller's decision, not the ACL's.
func (a *ACL) Allowed(clientID, username, topic string, access Access) bool {
	if a == nil || topic == "" {
		return false
	}
	q := query{access: access, topic: topic, v: vars{clientID: clientID, username: username}}
	switch access {
	case Read, Write:
		if strings.ContainsAny(topic, "+#") {
			return false
		}
	case Subscribe:
		f, ok := stripShare(topic)
		if !ok || checkFilter(f) != "" {
			return false
		}
		q.filter = strings.Split(f, "/")
	default:
		return false
	}

	own := &a.anon
	if username != "" {
		own = a.users[username] // nil: no user block, only patterns apply
	}
	if own != nil {
		if allowed, decided := own.decide(&q, false); decided {
			return allowed
		}
	}
	if len(a.patterns.deny) == 0 && len(a.patterns.allow) == 0 {
		return false
	}
	// Mosquitto refuses every pattern check for such clients; without
	// this, a client id of "#" would match "pattern read %c/#" as "#/#".
	if strings.ContainsAny(username, "+#") || strings.ContainsAny(clientID, "+#") {
		return false
	}
	allowed, _ := a.patterns.decide(&q, true)
	return allowed
}

// stripShare removes a $share/<group>/ prefix: the ACL is about the topics a
// subscription can receive, which the group does not change.
func stripShare(f string) (string, bool) {
	if !strings.HasPrefix(f, "$share/") {
		return f, true
	}
	rest := f[len("$share/"):]
	group, filter, ok := strings.Cut(rest, "/")
	if !ok || group == "" || filter == "" || strings.ContainsAny(group, "+#") {
		return "", false
	}
	return filter, true
}

type vars struct {
	clientID, username string
}

// sub expands %c and %u in one pattern level.
func (v *vars) sub(s string) string {
	switch s {
	case "%c":
		return v.clientID
	case "%u":
		return v.username
	}
	return strings.NewReplacer("%c", v.clientID, "%u", v.username).Replace(s)
}

type query struct {
	access Access
	topic  string   // Read/Write: the topic name
	filter []string // Subscribe: the filter's levels
	v      vars
}

// decide returns (allowed, true) when a rule of the list decides, and
// (false, false) when none matches and the caller should look further.
func (l *ruleList) decide(q *query, patterns bool) (allowed, decided bool) {
	need := bitRead
	if q.access == Write {
		need = bitWrite
	}
	for i := range l.deny {
		r := &l.deny[i]
		if patterns {
			if skip, slow := r.patternState(&q.v, false); skip {
				continue
			} else if slow != nil {
				r = slow
			}
		}
		if r.covers(q) {
			return false, true
		}
	}
	for i := range l.allow {
		r := &l.allow[i]
		if r.bits&need == 0 {
			continue
		}
		if patterns {
			if skip, _ := r.patternState(&q.v, true); skip {
				continue
			}
		}
		if r.overlaps(q) {
			return true, true
		}
	}
	return false, false
}

// patternState decides how a pattern rule applies to this client. skip means
// the rule does not apply. slow, for deny rules only, is the rule rebuilt from
// the substituted text, used when a substituted value contains '/' (so level
// boundaries move, as they do in Mosquitto's string substitution): denying
// more is always safe, allowing more is not, so allow rules are skipped
// instead.
func (r *rule) patternState(v *vars, allow bool) (skip bool, slow *rule) {
	if r.useU && v.username == "" {
		return true, nil // Mosquitto: %u patterns never apply to anonymous clients
	}
	unsafe := (r.useC && strings.Contains(v.clientID, "/")) ||
		(r.useU && strings.Contains(v.username, "/")) ||
		(!r.dollar && r.levels[0].kind == lvTmpl && strings.HasPrefix(v.sub(r.levels[0].s), "$"))
	if !unsafe {
		return false, nil
	}
	if allow {
		return true, nil
	}
	var b strings.Builder
	for i, lv := range r.levels {
		if i > 0 {
			b.WriteByte('/')
		}
		if lv.kind == lvTmpl {
			b.WriteString(v.sub(lv.s))
		} else {
			b.WriteString(lv.s)
		}
	}
	nr := newRule(b.String(), r.bits, false, r.line)
	return false, &nr
}

// covers is the deny test: for a topic name, the rule matches it; for a
// filter, the rule matches every topic the filter can match.
func (r *rule) covers(q *query) bool {
	if q.access == Subscribe {
		return coversFilter(r, q.filter, &q.v)
	}
	return matchTopic(r, q.topic, &q.v)
}

// overlaps is the allow test: for a topic name, the rule matches it; for a
// filter, the rule matches at least one topic the filter can match.
func (r *rule) overlaps(q *query) bool {
	if q.access == Subscribe {
		return intersectsFilter(r, q.filter, &q.v)
	}
	return matchTopic(r, q.topic, &q.v)
}
