package e2e

import (
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// TestBadConfig: a bad value exits with status 2 before serving, and
// stderr names where it came from: the flag, the environment variable, or
// the config file and line.
func TestBadConfig(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		args   []string
		env    []string
		config string // written to mosquitto.conf and passed with --config
		want   string // stderr must contain it; "CONF" is the config's path
	}{
		{name: "flag", args: []string{"--mqtt-addr", "nope"}, want: "--mqtt-addr"},
		{name: "env", env: []string{"BROKER_MQTT_ADDR=nope"}, want: "BROKER_MQTT_ADDR"},
		{name: "config_unknown_directive", want: "mosquitto.conf:3",
			config: "# migrated from the Docker Mosquitto\nallow_anonymous true\nno_such_directive on\n"},
		{name: "config_bad_value", want: "mosquitto.conf:2",
			config: "persistence true\nmessage_size_limit lots\n"},
		// Go's flag package spells the flag with one dash in its own errors.
		{name: "size_flag", args: []string{"--message-size-limit", "lots"}, want: "-message-size-limit"},
		{name: "env_bool", env: []string{"BROKER_ALLOW_ANONYMOUS=maybe"}, want: "BROKER_ALLOW_ANONYMOUS"},
		{name: "missing_password_file", args: []string{"--password-file", "/nonexistent/passwd"}, want: "--password-file"},
		{name: "unknown_flag", args: []string{"--no-such-flag"}, want: "no-such-flag"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			args := []string{"serve", "--node-id", "e2e-badconfig", "--data-dir", dir,
				"--http-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0"}
			if !hasFlag(tc.args, "--mqtt-addr") && len(tc.env) == 0 {
				args = append(args, "--mqtt-addr", "127.0.0.1:0")
			}
			if tc.config != "" {
				conf := filepath.Join(dir, "mosquitto.conf")
				writeFile(t, conf, tc.config)
				args = append(args, "--config", conf)
			}
			args = append(args, tc.args...)
			r := runCmd(t, 15*time.Second, tc.env, "", brokerBin, args...)
			if r.TimedOut || r.ExitCode != 2 || !strings.Contains(r.Stderr, tc.want) {
				t.Fatalf("want exit status 2 and stderr naming %q, got:\n%s", tc.want, r)
			}
		})
	}
}

// TestMosquittoConf: a mosquitto.conf carried over from the deployment
// being replaced configures the node: its listener (port and bind
// address), allow_anonymous, password_file and message_size_limit apply.
func TestMosquittoConf(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	pw := filepath.Join(dir, "passwd")
	mosquittoPasswd(t, pw, "alice", "from-conf", true)
	mqttAddr := freeAddr(t)
	conf := filepath.Join(dir, "mosquitto.conf")
	writeFile(t, conf, fmt.Sprintf(`# mosquitto.conf from the Docker deployment
persistence true
persistence_location %s/
log_dest stdout

listener %s 127.0.0.1
allow_anonymous false
password_file %s
message_size_limit 2048
max_queued_messages 1000
max_inflight_messages 20
`, filepath.Join(dir, "persist"), portOf(mqttAddr), pw))
	b := startBrokerSpec(t, brokerSpec{Args: []string{"--config", conf}, MQTTAddr: mqttAddr})

	s := b.sub(t, "-u", "alice", "-P", "from-conf", "-q", "1", "-t", "e2e/conf", "-C", "1")
	b.mustPub(t, "-u", "alice", "-P", "from-conf", "-q", "1", "-t", "e2e/conf", "-m", "configured")
	assertMessages(t, s.wait(t), msg("e2e/conf", 1, false, "configured"))
	assertRefused(t, b.pub(t, "-t", "e2e/conf", "-m", "anonymous"), false)

	c := connectV5(t, b.MQTTAddr, v5Options{ClientID: "e2e-conf", Username: "alice", Password: "from-conf"})
	if got := maxPacketSize(c); got != "2048" {
		t.Errorf("CONNACK Maximum Packet Size = %s, want 2048 (message_size_limit)", got)
	}
}

// TestGracefulShutdown: on SIGTERM readiness turns false, MQTT 5 clients
// get DISCONNECT 0x8B (server shutting down) before the socket closes,
// MQTT 3.1.1 clients get a plain close, the process exits 0, and nothing
// answers on its ports afterwards.
func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	b := startBroker(t, "--shutdown-timeout", "5s")
	c := connectV5(t, b.MQTTAddr, v5Options{ClientID: "e2e-sigterm-paho"})
	cp := packets.NewControlPacket(packets.CONNECT).Content.(*packets.Connect)
	cp.ClientID, cp.CleanStart, cp.KeepAlive = "e2e-sigterm-raw", true, 30
	raw5 := rawConnectV5(t, b.MQTTAddr, cp)
	raw311 := connectRawV311(t, b.MQTTAddr, "e2e-sigterm-v311", 30)

	b.Signal(syscall.SIGTERM)
	eventually(t, 10*time.Second, func() error {
		code, _, err := b.HTTPGet("/readyz")
		if err == nil && code == http.StatusOK {
			return fmt.Errorf("/readyz still 200 after SIGTERM")
		}
		return nil
	})
	if code := b.Wait(stopTimeout); code != 0 {
		t.Errorf("exit status after SIGTERM: %d, want 0", code)
	}

	select {
	case d := <-c.Disconnects:
		if d.ReasonCode != 0x8B {
			t.Errorf("paho client: DISCONNECT reason 0x%02X, want 0x8B", d.ReasonCode)
		}
	case <-time.After(msgTimeout):
		t.Errorf("paho client: no DISCONNECT from the server within %s", msgTimeout)
	}

	p, err := readPacket(raw5, msgTimeout)
	if err != nil {
		t.Errorf("raw MQTT 5 client: want DISCONNECT 0x8B, got %v", err)
	} else if d, ok := p.Content.(*packets.Disconnect); !ok || d.ReasonCode != 0x8B {
		t.Errorf("raw MQTT 5 client: want DISCONNECT 0x8B, got %s", p)
	}
	if r, err := readUntilClosed(raw311, msgTimeout); err != nil || len(r.Data) > 0 {
		t.Errorf("MQTT 3.1.1 client: want a plain close, got %v, bytes % x", err, r.Data)
	}

	if code, _, err := b.HTTPGet("/readyz"); err == nil {
		t.Errorf("/readyz answered %d after the process exited", code)
	}
	if conn, err := net.DialTimeout("tcp", b.MQTTAddr, time.Second); err == nil {
		conn.Close()
		t.Errorf("MQTT port %s still accepts connections after exit", b.MQTTAddr)
	}
}
