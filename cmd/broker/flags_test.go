package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseServePrecedenceAndDefaults(t *testing.T) {
	o, err := parseServe([]string{"--mqtt-addr", "127.0.0.1:1999", "--node-id", "n1"},
		env(map[string]string{"BROKER_MQTT_ADDR": ":2000", "BROKER_HTTP_ADDR": "127.0.0.1:9000", "BROKER_JOIN": "a:1, b:2",
			"BROKER_CLUSTER_KEY": "0123456789abcdef0123"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	c := o.cfg
	if c.MQTTAddr != "127.0.0.1:1999" {
		t.Errorf("flag must beat env: mqtt-addr = %q", c.MQTTAddr)
	}
	if c.HTTPAddr != "127.0.0.1:9000" {
		t.Errorf("env not read: http-addr = %q", c.HTTPAddr)
	}
	if strings.Join(c.Join, "|") != "a:1|b:2" {
		t.Errorf("join = %q", c.Join)
	}
	if c.DataDir != "./data/n1" || c.MaxQueuedMessages != 1000 || c.MaxInflightMessages != 20 ||
		c.MaxPacketSize != 256<<20 || !c.AllowAnonymous || c.SessionExpiry != 7*24*time.Hour || c.AdvertiseHost != "n1" {
		t.Errorf("defaults not the Mosquitto deployment's: %+v", c)
	}
}

func TestParseServeErrorsNameTheSource(t *testing.T) {
	cases := []struct {
		name string
		args []string
		env  map[string]string
		want []string
	}{
		{"bad flag addr", []string{"--mqtt-addr", "nope"}, nil, []string{"flag --mqtt-addr", "nope"}},
		{"bad env addr", nil, map[string]string{"BROKER_MQTT_ADDR": "nope"}, []string{"environment BROKER_MQTT_ADDR"}},
		{"bad env int", nil, map[string]string{"BROKER_MAX_QUEUED_MESSAGES": "many"}, []string{"environment BROKER_MAX_QUEUED_MESSAGES", "many"}},
		{"queue too big", []string{"--max-queued-messages", "70000"}, nil, []string{"--max-queued-messages", "65535"}},
		{"tls without cert", []string{"--tls-addr", ":8883"}, nil, []string{"--tls-addr", "--tls-cert"}},
		{"missing password file", []string{"--password-file", "/nonexistent/pw"}, nil, []string{"--password-file", "/nonexistent/pw"}},
		{"bad size", []string{"--message-size-limit", "big"}, nil, []string{"message-size-limit", "256MB"}},
		{"bad expiry", []string{"--session-expiry", "soon"}, nil, []string{"session-expiry", "7d"}},
		{"stray argument", []string{"extra"}, nil, []string{"unexpected argument"}},
		{"bootstrap zero", []string{"--bootstrap-expect", "0"}, nil, []string{"--bootstrap-expect", "at least 1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseServe(append([]string{"--node-id", "n1"}, tc.args...), env(tc.env), io.Discard)
			if err == nil {
				err = o.validate()
			}
			var ue *usageError
			if !errors.As(err, &ue) {
				t.Fatalf("err = %v, want a usageError", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestParseDurationAndBytes(t *testing.T) {
	durations := map[string]time.Duration{"90s": 90 * time.Second, "12h": 12 * time.Hour, "7d": 7 * 24 * time.Hour,
		"2w": 14 * 24 * time.Hour, "1y": 365 * 24 * time.Hour, "0": 0}
	for in, want := range durations {
		if got, err := parseDuration(in); err != nil || got != want {
			t.Errorf("parseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "d", "-5s", "3x"} {
		if _, err := parseDuration(bad); err == nil {
			t.Errorf("parseDuration(%q) accepted", bad)
		}
	}
	sizes := map[string]uint32{"1024": 1024, "1KB": 1024, "256MB": 256 << 20, "1GB": 268435460, "0": 0}
	for in, want := range sizes {
		if got, err := parseBytes(in); err != nil || got != want {
			t.Errorf("parseBytes(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
}

func TestRunExitCodes(t *testing.T) {
	var stderr strings.Builder
	if code := run([]string{"serve", "--mqtt-addr", "nope"}, env(nil), io.Discard, &stderr); code != 2 {
		t.Errorf("bad config exit = %d, want 2", code)
	}
	if !strings.Contains(stderr.String(), "--mqtt-addr") {
		t.Errorf("stderr %q does not name the flag", stderr.String())
	}
	if code := run([]string{"frobnicate"}, env(nil), io.Discard, io.Discard); code != 2 {
		t.Errorf("unknown command exit = %d, want 2", code)
	}
	if code := run([]string{"version"}, env(nil), io.Discard, io.Discard); code != 0 {
		t.Errorf("version exit = %d", code)
	}
}

// TestClusterSecurityFlags: a node reachable from the network needs a
// cluster key (or an explicit --insecure-cluster); key and token files are
// read like mounted Secrets, several keys meaning a rotation.
func TestClusterSecurityFlags(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	keys := write("keys", "# rotation in progress\nnew-key-0123456789abcdef\n\nold-key-0123456789abcdef\n")
	token := write("token", "s3cret-token\n")
	empty := write("empty", "# nothing\n\n")
	shortOld := write("short-old", "new-key-0123456789abcdef\nold\n")
	parse := func(args ...string) (*serveOptions, error) {
		o, err := parseServe(append([]string{"--node-id", "n1"}, args...), env(nil), io.Discard)
		if err != nil {
			return nil, err
		}
		return o, o.validate()
	}
	loop := []string{"--gossip-addr", "127.0.0.1:7946", "--cluster-addr", "127.0.0.1:7947"}

	for _, tc := range []struct {
		name string
		args []string
		want []string // substrings of the error; nil: accepted
	}{
		{"defaults bind every interface", nil, []string{"--gossip-addr", "--cluster-key-file", "--cluster-key", "--insecure-cluster"}},
		{"cluster port on a routable address", []string{"--gossip-addr", "127.0.0.1:7946", "--cluster-addr", "10.0.0.5:7947"}, []string{"--cluster-addr", "--cluster-key-file"}},
		{"loopback only", loop, nil},
		{"localhost", []string{"--gossip-addr", "localhost:7946", "--cluster-addr", "[::1]:7947"}, nil},
		{"insecure on purpose", []string{"--insecure-cluster"}, nil},
		{"key file", []string{"--cluster-key-file", keys}, nil},
		{"key and key file", []string{"--cluster-key-file", keys, "--cluster-key", "0123456789abcdef0"}, []string{"--cluster-key-file", "both"}},
		{"empty key file", []string{"--cluster-key-file", empty}, []string{empty, "no secret"}},
		{"missing key file", []string{"--cluster-key-file", filepath.Join(dir, "nope")}, []string{"--cluster-key-file", "cannot read"}},
		{"short key", []string{"--cluster-key", "short"}, []string{"--cluster-key", "at least 16"}},
		{"short accepted key", []string{"--cluster-key-file", shortOld}, []string{"key 2 of " + shortOld, "at least 16"}},
		{"partial cluster tls", append([]string{"--cluster-tls-cert", keys}, loop...), []string{"--cluster-tls-ca"}},
		{"token file", append([]string{"--admin-token-file", token}, loop...), nil},
		{"two tokens", append([]string{"--admin-token-file", keys}, loop...), []string{"--admin-token-file", "exactly one"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parse(tc.args...)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var ue *usageError
			if !errors.As(err, &ue) {
				t.Fatalf("err = %v, want a usage error (exit 2)", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			_ = o
		})
	}
	o, err := parse("--cluster-key-file", keys, "--admin-token-file", token)
	if err != nil {
		t.Fatal(err)
	}
	if o.cfg.ClusterKey != "new-key-0123456789abcdef" || len(o.cfg.ClusterAcceptedKeys) != 1 || o.cfg.ClusterAcceptedKeys[0] != "old-key-0123456789abcdef" {
		t.Errorf("keys: primary %q, accepted %q", o.cfg.ClusterKey, o.cfg.ClusterAcceptedKeys)
	}
	if o.cfg.AdminToken != "s3cret-token" {
		t.Errorf("token %q", o.cfg.AdminToken)
	}
	// BROKER_CLUSTER_KEY_FILE works like the flag.
	o, err = parseServe([]string{"--node-id", "n1"}, env(map[string]string{"BROKER_CLUSTER_KEY_FILE": keys}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.validate(); err != nil || o.cfg.ClusterKey != "new-key-0123456789abcdef" {
		t.Fatalf("BROKER_CLUSTER_KEY_FILE: %v, key %q", err, o.cfg.ClusterKey)
	}
}
