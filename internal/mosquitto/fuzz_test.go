package mosquitto

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
	"testing"
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
		cfg, warns, err := parseConfig("fuzz.conf", strings.NewReader(data), fuzzIncludes)
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
		pf, err := ParsePasswordFile("fuzz", strings.NewReader(data))
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
		a, err := ParseACL("fuzz", strings.NewReader(data))
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
