package mosquitto

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/mqtt-ha/broker/internal/fuzzutil"
)

// fuzzFS is an in-memory include_dir source, so the config fuzzer never reads
// the real disk whatever include_dir line it invents.
type fuzzFS map[string]string

func (m fuzzFS) ConfFiles(dir string) ([]string, error) {
	var out []string
	for p := range m {
		if path.Dir(p) == path.Clean(dir) && strings.HasSuffix(p, ".conf") {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		return nil, fs.ErrNotExist
	}
	sort.Strings(out) // the parser re-sorts; start from a fixed order
	return out, nil
}

func (m fuzzFS) Open(p string) (io.ReadCloser, error) {
	s, ok := m[p]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return io.NopCloser(strings.NewReader(s)), nil
}

var fuzzIncludes = fuzzFS{
	"conf.d/a.conf": "listener 1884\nallow_anonymous true\n",
	"conf.d/B.conf": "max_keepalive 60\nlog_dest stdout\n",
	"conf.d/c.conf": "include_dir conf.d\n", // nested: always an error
	"ok.d/x.conf":   "persistence true\n",
}

func addFileSeeds(f *testing.F, paths ...string) {
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
}

func FuzzParseConfig(f *testing.F) {
	addFileSeeds(f, "testdata/mosquitto.conf")
	for _, s := range []string{
		"", "listener 1883\n", "port 1883\nbind_address ::1\nlistener 1884 127.0.0.1\n",
		"include_dir ok.d\n", "include_dir conf.d\n", "per_listener_settings true\nlistener 1\nallow_anonymous true\nlistener 2\n",
		"listener 8883\ncertfile a\nkeyfile b\ncafile c\nrequire_certificate true\n",
		"persistent_client_expiration 9223372036854775807y\n", "connection b\naddress x\n",
		"max_packet_size 4294967296\n", "message_size_limit -1\n", "listener 1883 # c\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data string) {
		var cfg *Config
		var warns []Warning
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(data), 64), func() {
			cfg, warns, err = parseConfig("fuzz.conf", strings.NewReader(data), fuzzIncludes)
		})
		if err != nil {
			if cfg != nil {
				t.Fatal("config returned with an error")
			}
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.File == "" || ce.Line < 1 {
				t.Fatalf("error is not a located *ConfigError: %#v", err)
			}
			return
		}
		for _, w := range warns {
			if w.File == "" || w.Directive == "" || w.Msg == "" {
				t.Fatalf("incomplete warning %#v", w)
			}
		}
		seen := map[string]bool{}
		for _, l := range cfg.Listeners {
			if l.Port < 1 || l.Port > 65535 || (l.Protocol != ProtocolMQTT && l.Protocol != ProtocolWebsockets) {
				t.Fatalf("bad listener %+v", l)
			}
			if seen[l.Addr()] {
				t.Fatalf("duplicate listener %s", l.Addr())
			}
			seen[l.Addr()] = true
			if (l.CertFile == "") != (l.KeyFile == "") {
				t.Fatalf("half-configured TLS %+v", l)
			}
		}
		if cfg.MaxKeepalive < 10 || cfg.MaxKeepalive > 65535 || cfg.MessageSizeLimit < 0 ||
			cfg.MessageSizeLimit > mqttMaxPayload || cfg.MaxQueuedMessages < 0 || cfg.MaxInflightMessages < 0 ||
			cfg.PersistentClientExpiration < 0 || cfg.SysInterval < 0 {
			t.Fatalf("value out of range: %+v", cfg)
		}
		if len(cfg.Listeners) > 0 && cfg.Sources["allow_anonymous"] == (Source{}) && cfg.AllowAnonymous {
			t.Fatal("anonymous allowed by default although a listener is configured")
		}
	})
}

func FuzzParsePasswordFile(f *testing.F) {
	addFileSeeds(f, "testdata/passwd.pbkdf2", "testdata/passwd.sha512", "testdata/passwd.mixed")
	for _, s := range []string{
		"", "u:p\n", "u:$6$$\n", "u:$7$1$$$\n", "u:$7$-1$MDEyMzQ1Njc4OWFi$x\n", ":\n", "a:$6$a$b:c\n",
		"u:$6$MDEyMzQ1Njc4OWFi$" + strings.Repeat("A", 86) + "==\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data string) {
		var pf *PasswordFile
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(data), 64), func() { pf, err = ParsePasswordFile("fuzz", strings.NewReader(data)) })
		if err != nil {
			if pf != nil {
				t.Fatal("file returned with an error")
			}
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.Value != "" {
				t.Fatalf("want a *ConfigError without Value: %#v", err)
			}
			assertNoHashInError(t, data, err.Error())
			return
		}
		for user, e := range pf.users {
			if !pf.Has(user) || len(e.salt) != pwSaltLen || len(e.hash) != pwHashLen {
				t.Fatalf("bad entry for %q", user)
			}
			if e.iterations <= 1000 && pf.Verify(user, "not the password") {
				t.Fatalf("%q accepted a made-up password", user)
			}
		}
	})
}

// formatHash writes e the way mosquitto_passwd does (padded base64).
func formatHash(e *pwEntry) string {
	b64 := base64.StdEncoding.EncodeToString
	if e.kind == pwPBKDF2 {
		return fmt.Sprintf("$7$%d$%s$%s", e.iterations, b64(e.salt), b64(e.hash))
	}
	return fmt.Sprintf("$6$%s$%s", b64(e.salt), b64(e.hash))
}

// FuzzPasswordHash parses one hash field (what follows "user:"). A field
// that parses re-formats the way mosquitto_passwd writes it into a field
// that parses to the same entry; a password hashed with the entry's salt
// and iterations verifies against it and a different password does not;
// a refusal is a message that does not quote the field.
func FuzzPasswordHash(f *testing.F) {
	for _, p := range []string{"testdata/passwd.pbkdf2", "testdata/passwd.sha512", "testdata/passwd.mixed"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if _, field, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, "#") {
				f.Add(field, "password")
			}
		}
	}
	f.Add("$7$0101$MDEyMzQ1Njc4OWFi$"+strings.Repeat("A", 86), "") // unpadded, leading zero
	f.Add("$7$+5$MDEyMzQ1Njc4OWFi$"+strings.Repeat("A", 86)+"==", "p")
	f.Add("$6$MDEyMzQ1Njc4OWFi$"+strings.Repeat("A", 85)+"\r==", "p")
	f.Fuzz(func(t *testing.T, field, password string) {
		e, msg := parsePasswordHash(field)
		if (e == nil) == (msg == "") {
			t.Fatalf("parsePasswordHash = %v, %q", e, msg)
		}
		if e == nil {
			if len(field) >= 24 && strings.Contains(msg, field) {
				t.Fatalf("refusal quotes the field: %s", msg)
			}
			return
		}
		canon := formatHash(e)
		if e2, msg := parsePasswordHash(canon); msg != "" || !reflect.DeepEqual(e, e2) {
			t.Fatalf("%q re-formatted as %q parses to %+v (%s)", field, canon, e2, msg)
		}
		if e.iterations > 1000 {
			return // slow; FuzzParsePasswordFile has the same limit
		}
		sum, err := e.digest(password)
		if err != nil {
			t.Fatal(err)
		}
		pf := &PasswordFile{users: map[string]*pwEntry{"u": {kind: e.kind, iterations: e.iterations, salt: e.salt, hash: sum}}}
		if !pf.Verify("u", password) || pf.Verify("u", password+"x") || pf.Verify("v", password) {
			t.Fatalf("verification of a hash made with %q's parameters is wrong", canon)
		}
	})
}

// assertNoHashInError checks that no long hash field of the input shows up in
// an error. Short fields and fields that also occur in a username (which
// errors do quote) are skipped: they could appear by coincidence.
func assertNoHashInError(t *testing.T, data, msg string) {
	t.Helper()
	var users []string
	lines := strings.Split(data, "\n")
	for _, line := range lines {
		if u, _, ok := strings.Cut(line, ":"); ok {
			users = append(users, u)
		}
	}
	allUsers := strings.Join(users, "\n")
	for _, line := range lines {
		_, field, ok := strings.Cut(line, ":")
		field = strings.TrimSpace(field)
		if !ok || len(field) < 24 || strings.ContainsAny(field, " \t") || strings.Contains(allUsers, field) {
			continue
		}
		if strings.Contains(msg, field) {
			t.Fatalf("error quotes a hash field: %s", msg)
		}
	}
}

func FuzzParseACL(f *testing.F) {
	b, err := os.ReadFile("testdata/acl.verified")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(b), "cl1", "alice", "a/x")
	f.Add(string(b), "anon1", "", "c/anon1/z")
	f.Add("pattern read %c/#\npattern deny %c/x\n", "a/b", "", "a/b/x")
	f.Add("topic read $SYS/#\n", "c", "", "$SYS/x")
	f.Add("user u\ntopic read +/b\ntopic deny a/#\n", "c", "u", "a/b")
	f.Add("pattern readwrite x%cy/%u\n", "$", "u", "x$y/u")
	f.Fuzz(func(t *testing.T, data, clientID, username, topic string) {
		var a *ACL
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(data), 64), func() { a, err = ParseACL("fuzz", strings.NewReader(data)) })
		if err != nil {
			var ce *ConfigError
			if a != nil || !errors.As(err, &ce) || ce.Line < 1 {
				t.Fatalf("bad error: %#v", err)
			}
			return
		}
		read := a.Allowed(clientID, username, topic, Read)
		a.Allowed(clientID, username, topic, Write)
		sub := a.Allowed(clientID, username, topic, Subscribe)
		if len(topic) > 256 || topic == "" || strings.ContainsAny(topic, "+#") || strings.HasPrefix(topic, "$share/") {
			return
		}
		// A plain filter is indistinguishable from a delivery in mochi.
		if sub != read {
			t.Fatalf("topic %q: Subscribe=%v Read=%v", topic, sub, read)
		}
		// A readable topic is never hidden by refusing a filter that matches it.
		if read {
			for _, flt := range filtersMatching(topic) {
				if !a.Allowed(clientID, username, flt, Subscribe) {
					t.Fatalf("%q readable but filter %q refused", topic, flt)
				}
			}
		}
	})
}
