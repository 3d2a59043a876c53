package mosquitto

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

func parseConf(t *testing.T, text string) (*Config, []Warning, error) {
	t.Helper()
	return ParseConfig("mosquitto.conf", strings.NewReader(text))
}

// TestParseConfigDeployment parses the config of the pod being replaced.
func TestParseConfigDeployment(t *testing.T) {
	cfg, warns, err := ParseConfigFile("testdata/mosquitto.conf")
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Listeners: []Listener{{
			Port: 1883, Protocol: ProtocolMQTT, MaxConnections: -1,
			Source: Source{File: "testdata/mosquitto.conf", Line: 15},
		}},
		AllowAnonymous:             true,
		AllowZeroLengthClientID:    true,
		MessageSizeLimit:           268435455,
		MaxQueuedMessages:          1000,
		MaxInflightMessages:        20,
		MaxKeepalive:               65535,
		Persistence:                true,
		PersistenceLocation:        "/mosquitto/data/",
		PersistenceFile:            "mosquitto.db",
		RetainAvailable:            true,
		PersistentClientExpiration: 14 * 24 * time.Hour,
		SysInterval:                10 * time.Second,
		ConnectionMessages:         true,
	}
	got := *cfg
	got.Sources = nil
	if !reflect.DeepEqual(&got, want) {
		t.Errorf("config:\n got %+v\nwant %+v", got, *want)
	}
	if src := cfg.Sources["max_inflight_messages"]; src != (Source{"testdata/mosquitto.conf", 21}) {
		t.Errorf("source of max_inflight_messages = %v", src)
	}
	var ws []string
	for _, w := range warns {
		ws = append(ws, w.Directive+"@"+strconv.Itoa(w.Line))
	}
	wantWarn := []string{"autosave_interval@7", "log_dest@9", "log_type@10", "log_type@11", "log_timestamp@12"}
	if !reflect.DeepEqual(ws, wantWarn) {
		t.Errorf("warnings = %v, want %v", ws, wantWarn)
	}
	if s := warns[1].String(); !strings.HasPrefix(s, "testdata/mosquitto.conf:9: log_dest: ignored") {
		t.Errorf("warning text = %q", s)
	}
}

func TestParseConfigValues(t *testing.T) {
	tests := []struct {
		name string
		conf string
		want func(c *Config) any // returns the value under test
		val  any
	}{
		{"defaults without listener allow anonymous", "", func(c *Config) any { return c.AllowAnonymous }, true},
		{"listener without allow_anonymous refuses anonymous (Mosquitto 2)", "listener 1883\n", func(c *Config) any { return c.AllowAnonymous }, false},
		{"port alone also counts as a listener", "port 1883\n", func(c *Config) any { return c.AllowAnonymous }, false},
		{"allow_anonymous true", "listener 1883\nallow_anonymous true\n", func(c *Config) any { return c.AllowAnonymous }, true},
		{"last allow_anonymous wins", "allow_anonymous true\nallow_anonymous false\n", func(c *Config) any { return c.AllowAnonymous }, false},
		{"default limits", "", func(c *Config) any {
			return []any{c.MaxQueuedMessages, c.MaxInflightMessages, c.MaxKeepalive, c.MessageSizeLimit, c.MaxPacketSize}
		}, []any{1000, 20, 65535, int64(0), int64(0)}},
		{"limits", "max_queued_messages 5\nmax_inflight_messages 0\nmax_keepalive 60\nmax_packet_size 1024\nmessage_size_limit 0\n", func(c *Config) any {
			return []any{c.MaxQueuedMessages, c.MaxInflightMessages, c.MaxKeepalive, c.MessageSizeLimit, c.MaxPacketSize}
		}, []any{5, 0, 60, int64(0), int64(1024)}},
		{"negative queue means no limit", "max_queued_messages -1\n", func(c *Config) any { return c.MaxQueuedMessages }, 0},
		{"files", "password_file /etc/m/passwd\nacl_file /etc/m/acl\n", func(c *Config) any { return c.PasswordFile + "|" + c.ACLFile }, "/etc/m/passwd|/etc/m/acl"},
		{"persistence", "persistence true\npersistence_file store.db\n", func(c *Config) any { return []any{c.Persistence, c.PersistenceFile} }, []any{true, "store.db"}},
		{"retain_available false", "retain_available false\n", func(c *Config) any { return c.RetainAvailable }, false},
		{"sys_interval 0 disables $SYS", "sys_interval 0\n", func(c *Config) any { return c.SysInterval }, time.Duration(0)},
		{"connection_messages false", "connection_messages false\n", func(c *Config) any { return c.ConnectionMessages }, false},
		{"allow_zero_length_clientid false", "allow_zero_length_clientid false\n", func(c *Config) any { return c.AllowZeroLengthClientID }, false},
		{"expiration month is 30 days", "persistent_client_expiration 1m\n", func(c *Config) any { return c.PersistentClientExpiration }, 30 * 24 * time.Hour},
		{"expiration hours", "persistent_client_expiration 1h\n", func(c *Config) any { return c.PersistentClientExpiration }, time.Hour},
		{"expiration weeks", "persistent_client_expiration 2w\n", func(c *Config) any { return c.PersistentClientExpiration }, 14 * 24 * time.Hour},
		{"expiration years", "persistent_client_expiration 1y\n", func(c *Config) any { return c.PersistentClientExpiration }, 365 * 24 * time.Hour},
		{"trailing comment ignored", "listener 1883 # plain MQTT\nallow_anonymous true # inside the cluster\n", func(c *Config) any {
			return []any{len(c.Listeners), c.Listeners[0].Bind, c.AllowAnonymous}
		}, []any{1, "", true}},
		{"tabs and indentation", "\tlistener\t1884   127.0.0.1 \r\n", func(c *Config) any { return c.Listeners[0].Addr() }, "127.0.0.1:1884"},
		{"ipv6 bind", "listener 1883 ::1\n", func(c *Config) any { return c.Listeners[0].Addr() }, "[::1]:1883"},
		{"websockets and tls listener", "listener 1883\nlistener 8883\ncertfile /c.crt\nkeyfile /c.key\ncafile /ca.crt\nrequire_certificate true\ntls_version tlsv1.3\nlistener 9001\nprotocol websockets\nmax_connections -5\n", func(c *Config) any {
			var out []any
			for _, l := range c.Listeners {
				out = append(out, l.Port, l.Protocol, l.TLS(), l.RequireCertificate, l.TLSVersion, l.MaxConnections)
			}
			return out
		}, []any{1883, "mqtt", false, false, "", -1, 8883, "mqtt", true, true, "tlsv1.3", -1, 9001, "websockets", false, false, "", -1}},
		{"default listener from port and bind_address comes first", "listener 1884\nport 1885\nbind_address 127.0.0.1\n", func(c *Config) any {
			return []any{c.Listeners[0].Addr(), c.Listeners[0].Default, c.Listeners[0].Line, c.Listeners[1].Addr()}
		}, []any{"127.0.0.1:1885", true, 2, ":1884"}},
		{"listener options before any listener go to the default listener", "max_connections 10\nport 1883\n", func(c *Config) any { return c.Listeners[0].MaxConnections }, 10},
		{"per_listener_settings with one listener", "per_listener_settings true\nlistener 1883\nallow_anonymous true\npassword_file /p\n", func(c *Config) any {
			return []any{c.PerListenerSettings, c.AllowAnonymous, c.PasswordFile}
		}, []any{true, true, "/p"}},
		{"per_listener_settings: settings above the only listener belong to the unused default listener", "per_listener_settings true\nallow_anonymous true\nlistener 1883\n", func(c *Config) any { return c.AllowAnonymous }, false},
		{"per_listener_settings with identical listeners", "per_listener_settings true\nlistener 1883\nallow_anonymous true\nlistener 1884\nallow_anonymous true\n", func(c *Config) any { return c.AllowAnonymous }, true},
		{"use_identity_as_username false is harmless", "listener 1883\nuse_identity_as_username false\n", func(c *Config) any { return len(c.Listeners) }, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _, err := parseConf(t, tt.conf)
			if err != nil {
				t.Fatal(err)
			}
			if got := tt.want(cfg); !reflect.DeepEqual(got, tt.val) {
				t.Errorf("got %#v, want %#v", got, tt.val)
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		conf string
		want string // the complete error text
	}{
		{"\n\nlistener 1883\n\n\n\n\n\n\n\n\nmessage_size_limit abc\n",
			`mosquitto.conf:12: message_size_limit "abc": not a number of bytes; use e.g. "message_size_limit 268435455"`},
		{"message_size_limit 268435456\n",
			`mosquitto.conf:1: message_size_limit "268435456": out of range (0 to 268435455); use e.g. "message_size_limit 268435455"`},
		{"max_packet_size 19\n", `mosquitto.conf:1: max_packet_size "19": out of range (20 to 4294967295); use e.g. "max_packet_size 268435460"`},
		{"max_keepalive 0\n", `mosquitto.conf:1: max_keepalive "0": out of range (10 to 65535); use e.g. "max_keepalive 65535"`},
		{"max_inflight_messages 70000\n", `mosquitto.conf:1: max_inflight_messages "70000": out of range (-2147483648 to 65535); use e.g. "max_inflight_messages 20"`},
		{"bogus 1\n", `mosquitto.conf:1: bogus: unknown directive; check the spelling (directives are lower case) or remove the line`},
		{"Listener 1883\n", `mosquitto.conf:1: Listener: unknown directive; directives are case sensitive; write "listener"`},
		{"allow_anonymous yes\n", `mosquitto.conf:1: allow_anonymous "yes": not a boolean; use "allow_anonymous true" or "allow_anonymous false"`},
		{"allow_anonymous\n", `mosquitto.conf:1: allow_anonymous: missing value; use e.g. "allow_anonymous true"`},
		{"password_file /a b\n", `mosquitto.conf:1: password_file "b": unexpected extra value (values cannot contain spaces); use e.g. "password_file /mosquitto/config/passwd"`},
		{"password_file /a\npassword_file /b\n", `mosquitto.conf:2: password_file "/b": already set at mosquitto.conf:1; keep only one`},
		{"persistent_client_expiration 5s\n", `mosquitto.conf:1: persistent_client_expiration "5s": not a duration; use a positive whole number followed by h (hours), d (days), w (weeks), m (months of 30 days) or y (years), e.g. "persistent_client_expiration 14d"`},
		{"persistent_client_expiration 0d\n", `mosquitto.conf:1: persistent_client_expiration "0d": not a duration; use a positive whole number followed by h (hours), d (days), w (weeks), m (months of 30 days) or y (years), e.g. "persistent_client_expiration 14d"`},
		{"listener 70000\n", `mosquitto.conf:1: listener "70000": not a TCP port (1-65535); use e.g. "listener 1883"`},
		{"listener 0 /run/mosquitto.sock\n", `mosquitto.conf:1: listener "0": unix socket listeners are not supported; use a TCP port, e.g. "listener 1883"`},
		{"listener 1883\nlistener 1883\n", `mosquitto.conf:2: listener ":1883": address already used by the listener at mosquitto.conf:1; give each listener its own port`},
		{"listener 1883\nprotocol foo\n", `mosquitto.conf:2: protocol "foo": unknown protocol; use "protocol mqtt" or "protocol websockets"`},
		{"listener 8883\ncertfile /c\n", `mosquitto.conf:1: listener ":8883": TLS needs both certfile and keyfile on this listener; add the missing one (or remove both for plain MQTT)`},
		{"listener 8883\nrequire_certificate true\n", `mosquitto.conf:1: listener ":8883": cafile/require_certificate/tls_version only make sense on a TLS listener; add certfile and keyfile, or remove them`},
		{"listener 1883\nuse_identity_as_username true\n", `mosquitto.conf:2: use_identity_as_username "true": client-certificate identities as usernames are not supported; authenticate with password_file instead`},
		{"listener 1883\nmount_point app/\n", `mosquitto.conf:2: mount_point: mount points are not supported; remove the line and use full topic names in clients and the acl_file`},
		{"auth_plugin /usr/lib/x.so\n", `mosquitto.conf:1: auth_plugin: plugins are not supported; use password_file and acl_file`},
		{"auth_opt_db x\n", `mosquitto.conf:1: auth_opt_db: plugins are not supported; remove the plugin and its options and use password_file and acl_file`},
		{"connection other\naddress 10.0.0.1:1883\ntopic # both 0\nremote_password hunter2\n", `mosquitto.conf:1: connection: bridges are not supported; remove this connection block (the cluster replaces bridging between brokers)`},
		{"remote_password hunter2\n", `mosquitto.conf:1: remote_password: only valid inside a bridge (connection) block, and bridges are not supported; remove the line`},
		{"allow_anonymous true\nper_listener_settings true\n", `mosquitto.conf:2: per_listener_settings "true": must be set before any other security setting (as in Mosquitto); move it to the top of the file`},
		{"per_listener_settings true\nlistener 1883\nallow_anonymous true\nlistener 1884\n", `mosquitto.conf:4: listener: per_listener_settings true gives this listener different allow_anonymous/password_file/acl_file/allow_zero_length_clientid settings than the listener at mosquitto.conf:2, but this broker applies one set to every listener; make them identical, or set per_listener_settings false and keep one set`},
		{"include_dir /nonexistent-dir-for-test\n", `mosquitto.conf:1: include_dir "/nonexistent-dir-for-test": cannot read the directory (no such file or directory); check the path (relative paths start from the working directory)`},
		{"upgrade_outgoing_qos true\n", `mosquitto.conf:1: upgrade_outgoing_qos "true": not supported (a non-standard option); remove the line: messages are delivered at min(publish QoS, subscription QoS)`},
		{"max_qos 1\n", `mosquitto.conf:1: max_qos "1": limiting QoS per listener is not supported; remove the line (QoS 2 is allowed)`},
		{"set_tcp_nodelay maybe\n", `mosquitto.conf:1: set_tcp_nodelay "maybe": not a boolean; use "set_tcp_nodelay true" or "set_tcp_nodelay false"`},
		{"log_dest\n", `mosquitto.conf:1: log_dest: missing value; remove the line (ignored: the broker logs structured lines to stderr)`},
	}
	for _, tt := range tests {
		t.Run(strings.SplitN(tt.conf, "\n", 2)[0], func(t *testing.T) {
			_, _, err := parseConf(t, tt.conf)
			if err == nil {
				t.Fatal("no error")
			}
			if err.Error() != tt.want {
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.File != "mosquitto.conf" || ce.Line == 0 || ce.Directive == "" {
				t.Errorf("not a located *ConfigError: %#v", err)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Error("error leaks a bridge password")
			}
		})
	}
}

func TestParseConfigReportsSeveralErrors(t *testing.T) {
	_, _, err := parseConf(t, "bogus 1\nmax_keepalive x\nlistener 1883\n")
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"mosquitto.conf:1: bogus", "mosquitto.conf:2: max_keepalive"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	var many strings.Builder
	for range 50 {
		many.WriteString("bogus\n")
	}
	_, _, err = parseConf(t, many.String())
	if !strings.Contains(err.Error(), "30 more problems not shown") {
		t.Errorf("error count not capped: %v", err)
	}
}

func TestParseConfigWarnings(t *testing.T) {
	tests := []struct {
		conf, directive string
	}{
		{"log_dest file /var/log/mosquitto.log\n", "log_dest"},
		{"pid_file /run/mosquitto.pid\n", "pid_file"},
		{"user mosquitto\n", "user"},
		{"autosave_interval 1800\n", "autosave_interval"},
		{"max_queued_bytes 1000000\n", "max_queued_bytes"},
		{"set_tcp_nodelay false\n", "set_tcp_nodelay"},
		{"queue_qos0_messages true\n", "queue_qos0_messages"},
		{"port 1883\n", "port"},
		{"listener 1883\nciphers ECDHE\n", "ciphers"},
		{"retry_interval 20\n", "retry_interval"},
		{"certfile /c\nlistener 1883\n", "certfile"}, // default listener never started
		{"max_queued_messages -1\n", "max_queued_messages"},
		{"", "listener"}, // no listener: localhost-only mode in Mosquitto
	}
	for _, tt := range tests {
		t.Run(tt.directive, func(t *testing.T) {
			_, warns, err := parseConf(t, tt.conf)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range warns {
				if w.Directive == tt.directive && w.File == "mosquitto.conf" {
					return
				}
			}
			t.Errorf("no warning for %s in %v", tt.directive, warns)
		})
	}
	for _, quiet := range []string{"listener 1883\nmax_queued_bytes 0\nset_tcp_nodelay true\nqueue_qos0_messages false\ncheck_retain_source false\nconnection_messages true\n"} {
		if _, warns, err := parseConf(t, quiet); err != nil || len(warns) != 0 {
			t.Errorf("%q: warnings %v, err %v", quiet, warns, err)
		}
	}
}

func TestIncludeDir(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The order from mosquitto.conf(5): 00, 01, A, a, B, b. Each file adds
	// a listener so the resulting order is visible.
	write("b.conf", "listener 6\n")
	write("B.conf", "listener 5\n")
	write("a.conf", "listener 4\n")
	write("A.conf", "listener 3\n")
	write("01.conf", "listener 2\n")
	write("00.conf", "listener 1\n")
	write("notes.txt", "bogus\n")
	write(".conf", "bogus\n")
	if err := os.Mkdir(filepath.Join(dir, "sub.conf"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "00.conf"), filepath.Join(dir, "zz-link.conf")); err != nil {
		t.Fatal(err)
	}

	_, _, err := parseConf(t, "include_dir "+dir+"\n")
	// zz-link.conf repeats listener 1: a symlink (as in a ConfigMap) is read.
	want := filepath.Join(dir, "zz-link.conf") + `:1: listener ":1": address already used by the listener at ` + filepath.Join(dir, "00.conf") + ":1"
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error = %v, want prefix %s", err, want)
	}
	os.Remove(filepath.Join(dir, "zz-link.conf"))

	cfg, _, err := parseConf(t, "allow_anonymous true\ninclude_dir "+dir+"\n")
	if err != nil {
		t.Fatal(err)
	}
	var ports []int
	for _, l := range cfg.Listeners {
		ports = append(ports, l.Port)
	}
	if !reflect.DeepEqual(ports, []int{1, 2, 3, 4, 5, 6}) {
		t.Errorf("include order = %v", ports)
	}
	if got := cfg.Listeners[2].Source; got != (Source{filepath.Join(dir, "A.conf"), 1}) {
		t.Errorf("listener source = %v", got)
	}

	// Errors inside an included file name that file and line.
	write("c.conf", "\nmax_keepalive never\n")
	_, _, err = parseConf(t, "include_dir "+dir+"\n")
	want = filepath.Join(dir, "c.conf") + `:2: max_keepalive "never": not a number`
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error = %v, want prefix %s", err, want)
	}

	// include_dir is only honoured in the main file.
	os.Remove(filepath.Join(dir, "c.conf"))
	write("d.conf", "include_dir "+dir+"\n")
	_, _, err = parseConf(t, "include_dir "+dir+"\n")
	if err == nil || !strings.Contains(err.Error(), "d.conf:1: include_dir") {
		t.Errorf("nested include_dir: %v", err)
	}
}

func TestIncludeLess(t *testing.T) {
	got := []string{"b.conf", "a.conf", "B.conf", "00.conf", "A.conf", "01.conf", "a_b.conf", "ab.conf"}
	sortIncludes(got)
	want := []string{"00.conf", "01.conf", "A.conf", "a.conf", "ab.conf", "a_b.conf", "B.conf", "b.conf"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("order = %v, want %v", got, want)
	}
}
