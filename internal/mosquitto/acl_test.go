package mosquitto

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func mustACL(t testing.TB, text string) *ACL {
	t.Helper()
	a, err := ParseACL("acl", strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

type aclCase struct {
	client, user, topic string
	access              Access
	want                bool
}

func runACLCases(t *testing.T, a *ACL, cases []aclCase) {
	t.Helper()
	for _, c := range cases {
		if got := a.Allowed(c.client, c.user, c.topic, c.access); got != c.want {
			t.Errorf("Allowed(client=%q, user=%q, %q, %s) = %v, want %v", c.client, c.user, c.topic, c.access, got, c.want)
		}
	}
}

// TestACLVerifiedAgainstMosquitto: every Read/Write expectation here was
// observed on mosquitto 2.0.11 with testdata/acl.verified (a subscriber to
// "#" as each client, admin publishing each topic; denied publishes got
// PUBACK rc 0 on MQTT 3.1.1 and 0x87 on MQTT 5).
func TestACLVerifiedAgainstMosquitto(t *testing.T) {
	f, err := os.Open("testdata/acl.verified")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, err := ParseACL("testdata/acl.verified", f)
	if err != nil {
		t.Fatal(err)
	}
	runACLCases(t, a, []aclCase{
		{"cl1", "alice", "a/x", Read, true},
		{"cl1", "alice", "a/secret/y", Read, false}, // deny beats allow in the user's list
		{"cl1", "alice", "a/b", Read, true},         // the user's allow decides before "pattern deny a/b"
		{"cl1", "alice", "b/z", Read, false},
		{"cl1", "alice", "anon/1", Read, false}, // anonymous rules are not alice's
		{"cl1", "alice", "p/alice/q", Read, true},
		{"cl1", "alice", "c/cl1/z", Read, true},
		{"cl1", "alice", "w/1", Read, false}, // write-only rule
		{"cl1", "alice", "anonw/1", Read, false},
		{"cl1", "alice", "$SYS/broker/version", Read, false},
		{"cl1", "alice", "b/1", Write, false},
		{"cl1", "alice", "w/1", Write, true},
		{"anon1", "", "anon/1", Read, true},
		{"anon1", "", "c/anon1/z", Read, true},
		{"anon1", "", "a/x", Read, false},
		{"anon1", "", "anonw/1", Read, false},
		{"anon1", "", "p//q", Read, false}, // %u patterns never apply to anonymous clients
		{"anon1", "", "anonw/1", Write, true},
		{"adm", "admin", "b/z", Read, true},
		{"adm", "admin", "a/b", Read, true},
		{"adm", "admin", "$SYS/broker/version", Read, false}, // # does not match $ topics
	})
}

func TestACLSemantics(t *testing.T) {
	a := mustACL(t, `
# anonymous
topic public/#
topic read

user alice
topic read a/#
topic readwrite a/own/#
topic deny a/own/secret
topic read $SYS/broker/#

user john doe
topic read names/with spaces

user alice
topic write merged/#

user a+b
topic read plus/#

pattern readwrite dev/%c/#
pattern read users/%u/inbox
pattern read mixed/x%cy/#
pattern read %c/private/#
pattern deny vault/%c/x
pattern read vault/#
`)
	runACLCases(t, a, []aclCase{
		// "topic X" is readwrite; "topic read" is the topic "read" (as in Mosquitto).
		{"c", "", "public/x", Read, true},
		{"c", "", "public/x", Write, true},
		{"c", "", "public", Read, true}, // # also matches the parent level
		{"c", "", "read", Write, true},
		{"c", "", "publicx", Read, false},
		// A deny in the list wins wherever it appears.
		{"c", "alice", "a/own/x", Write, true},
		{"c", "alice", "a/own/secret", Read, false},
		{"c", "alice", "a/own/secret", Write, false},
		{"c", "alice", "a/x", Write, false},
		{"c", "alice", "merged/1", Write, true}, // repeated user blocks merge
		{"c", "alice", "$SYS/broker/uptime", Read, true},
		{"c", "alice", "$SYS/other", Read, false},
		{"c", "john doe", "names/with spaces", Read, true},
		{"c", "john", "names/with spaces", Read, false},
		// Own rules are checked even when patterns are refused for '+'.
		{"c", "a+b", "plus/1", Read, true},
		{"c", "a+b", "dev/c/1", Read, false},
		// Patterns.
		{"dev1", "", "dev/dev1/temp", Write, true},
		{"dev1", "", "dev/dev2/temp", Write, false},
		{"dev1", "bob", "users/bob/inbox", Read, true},
		{"dev1", "bob", "users/eve/inbox", Read, false},
		{"dev1", "", "users//inbox", Read, false},
		{"7", "", "mixed/x7y/z", Read, true}, // %c inside a level, as Mosquitto substitutes
		{"7", "", "mixed/x8y/z", Read, false},
		{"me", "", "me/private/a", Read, true},
		// Substituted values must not widen access.
		{"#", "", "dev/#/x", Write, false}, // Mosquitto's rule: any + or # refuses patterns
		{"+", "", "dev/anything/x", Write, false},
		{"c", "#", "users/#/inbox", Read, false},
		{"a/b", "", "dev/a/b/x", Write, false}, // would be inside client "a"'s subtree
		{"a", "", "dev/a/b/x", Write, true},
		{"x", "u/v", "users/u/v/inbox", Read, false},
		{"$SYS", "", "$SYS/private/a", Read, false}, // %c must not make a rule reach $SYS
		// Deny patterns still apply with such values (denying more is safe).
		{"k", "", "vault/k/x", Read, false},
		{"k", "", "vault/k/y", Read, true},
		{"k/j", "", "vault/k/j/x", Read, false},
		{"k/j", "", "vault/k/j/y", Read, true},
		// Wildcards in a topic name are refused.
		{"c", "", "public/+", Read, false},
		{"c", "", "public/#", Write, false},
		{"c", "", "", Read, false},
	})

	var nilACL *ACL
	if nilACL.Allowed("c", "", "public/x", Read) {
		t.Error("nil ACL allowed access")
	}
	empty := mustACL(t, "# nothing\n")
	if empty.Allowed("c", "", "x", Read) || empty.Allowed("c", "u", "x", Write) || empty.Allowed("c", "", "#", Subscribe) {
		t.Error("empty ACL allowed access")
	}
}

func TestACLSubscribe(t *testing.T) {
	a := mustACL(t, `
user alice
topic read a/#
topic deny a/secret/#
topic write w/#
topic read $SYS/broker/#
user admin
topic #
pattern read p/%u/#
pattern read $SYS/%c/#
`)
	runACLCases(t, a, []aclCase{
		{"c", "alice", "#", Subscribe, true},     // could deliver a/...; each delivery is still checked
		{"c", "alice", "+/x", Subscribe, true},   // a/x is readable
		{"c", "alice", "a/+/x", Subscribe, true}, // a/b/x is readable, a/secret/x is not
		{"c", "alice", "a/x", Subscribe, true},
		{"c", "alice", "a", Subscribe, true}, // a/# matches its parent
		{"c", "alice", "b/#", Subscribe, false},
		{"c", "alice", "b/x", Subscribe, false},
		{"c", "alice", "w/#", Subscribe, false}, // write-only
		{"c", "alice", "a/secret/#", Subscribe, false},
		{"c", "alice", "a/secret/+/z", Subscribe, false},
		{"c", "alice", "a/secret", Subscribe, false},
		{"c", "alice", "$SYS/#", Subscribe, true},
		{"c", "alice", "$SYS/other/#", Subscribe, false},
		{"c", "alice", "+/broker/#", Subscribe, true}, // a/broker/x is readable
		{"node1", "", "+/node1/#", Subscribe, false},  // + never matches $SYS/node1/...
		{"c", "alice", "p/alice/#", Subscribe, true},
		{"c", "alice", "p/+/#", Subscribe, true},
		{"c", "alice", "p/bob/#", Subscribe, false},
		{"c", "alice", "$share/g/a/#", Subscribe, true},
		{"c", "alice", "$share/g/b/#", Subscribe, false},
		{"c", "alice", "$share/g", Subscribe, false},
		{"c", "alice", "$share//a/x", Subscribe, false},
		{"c", "alice", "$share/+/a/x", Subscribe, false},
		{"c", "alice", "a/#/x", Subscribe, false},
		{"c", "alice", "a/x+", Subscribe, false},
		{"c", "admin", "#", Subscribe, true},
		{"c", "admin", "$SYS/#", Subscribe, true}, // $SYS/c/... via the pattern, not via "#"
		{"c", "admin", "$SYS/x", Subscribe, false},
		{"node1", "admin", "$SYS/node1/#", Subscribe, true},
		{"node1", "", "$SYS/#", Subscribe, true},
		{"node1", "", "$SYS/node2/#", Subscribe, false},
	})
}

// TestACLSubscribePlainFilterIsRead: mochi cannot tell a subscription to a
// plain topic from a delivery on it, so both answers must agree; and a
// filter must be granted whenever some topic it matches is readable.
func TestACLSubscribePlainFilterIsRead(t *testing.T) {
	a := mustACL(t, `
topic read anon/#
topic deny anon/no
user u
topic read a/#
topic read +/b
topic deny a/x/#
topic read $SYS/+/load
topic write w
pattern read %c/#
pattern deny d/%u
pattern readwrite e/%u/+
`)
	topics := []string{"a", "a/b", "a/x", "a/x/y", "b/b", "x/b", "$SYS/a/load", "$SYS/load", "w",
		"c1/z", "c2/z", "d/u", "e/u/1", "e/u", "e/u/1/2", "anon/no", "anon/yes", "/b", "a//", "$x/b"}
	for _, user := range []string{"", "u", "v"} {
		for _, client := range []string{"c1", "c/2", "$SYS"} {
			for _, topic := range topics {
				read := a.Allowed(client, user, topic, Read)
				if sub := a.Allowed(client, user, topic, Subscribe); sub != read {
					t.Errorf("client %q user %q topic %q: Subscribe=%v Read=%v", client, user, topic, sub, read)
				}
				if !read {
					continue
				}
				for _, f := range filtersMatching(topic) {
					if !a.Allowed(client, user, f, Subscribe) {
						t.Errorf("client %q user %q: %q readable but filter %q refused", client, user, topic, f)
					}
				}
			}
		}
	}
}

// filtersMatching returns some filters that match topic: each level replaced
// by +, each suffix replaced by #, and the shared forms. A first-level
// wildcard does not match a topic starting with '$', so that level is kept.
func filtersMatching(topic string) []string {
	levels := strings.Split(topic, "/")
	var out []string
	for i := range levels {
		if i == 0 && strings.HasPrefix(topic, "$") {
			continue
		}
		l := append([]string(nil), levels...)
		l[i] = "+"
		out = append(out, strings.Join(l, "/"))
		out = append(out, strings.Join(append(append([]string(nil), levels[:i]...), "#"), "/"))
	}
	out = append(out, topic+"/#", "$share/g/"+topic)
	return out
}

func TestParseACLErrors(t *testing.T) {
	tests := []struct{ text, want string }{
		{"topic foo a/b\n", `acl:1: topic "foo": unknown access; use read, write, readwrite or deny, e.g. "topic read sensors/#"`},
		{"\npattern read a/#/b\n", `acl:2: pattern "a/#/b": invalid topic filter: + and # must fill a whole level and # must be last, e.g. "sensors/+/temp" or "sensors/#"`},
		{"topic read a+\n", `acl:1: topic "a+": invalid topic filter`},
		{"user\n", `acl:1: user: missing username; use e.g. "user alice"`},
		{"topic\n", `acl:1: topic: missing topic; use e.g. "topic read sensors/#"`},
		{"users alice\n", `acl:1: users: unknown keyword; ACL lines start with topic, pattern or user (comments with #)`},
	}
	for _, tt := range tests {
		_, err := ParseACL("acl", strings.NewReader(tt.text))
		if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want prefix %s", tt.text, err, tt.want)
		}
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Line == 0 {
			t.Errorf("%q: not a located *ConfigError: %#v", tt.text, err)
		}
	}
	_, err := ParseACL("acl", strings.NewReader("bogus\ntopic read ok\nbogus\n"))
	if err == nil || !strings.Contains(err.Error(), "acl:1: bogus") || !strings.Contains(err.Error(), "acl:3: bogus") {
		t.Errorf("want both errors, got %v", err)
	}
}

func BenchmarkACLReadPattern(b *testing.B) {
	a := mustACL(b, "user alice\ntopic read a/#\npattern read devices/%c/#\npattern deny devices/%c/secret\n")
	for b.Loop() {
		if !a.Allowed("sensor-17", "bob", "devices/sensor-17/temp/now", Read) {
			b.Fatal("denied")
		}
	}
}
