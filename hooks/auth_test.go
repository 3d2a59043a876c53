package hooks

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Fixtures written by the real mosquitto_passwd and checked against a real
// mosquitto; see internal/mosquitto/passwd_test.go and acl_test.go.
const (
	fixturePasswd = "../internal/mosquitto/testdata/passwd.mixed" // alice:alice-secret, dave:"dave pw with spaces", ...
	fixtureACL    = "../internal/mosquitto/testdata/acl.verified"
)

type recorder struct {
	mu       sync.Mutex
	failures []string
	denied   []string
}

func (r *recorder) opts(o AuthOptions) AuthOptions {
	o.OnAuthFailure = func(reason string) { r.mu.Lock(); r.failures = append(r.failures, reason); r.mu.Unlock() }
	o.OnACLDenied = func(access string) { r.mu.Lock(); r.denied = append(r.denied, access); r.mu.Unlock() }
	return o
}

func quietServer() *mqtt.Server {
	return mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
}

func newAuth(t *testing.T, o AuthOptions) *Auth {
	t.Helper()
	a, err := NewAuth(o)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// client builds a connected-looking mochi client the way attachClient does.
func client(t *testing.T, id, user string, version byte, will string) (*mqtt.Client, packets.Packet) {
	t.Helper()
	pk := packets.Packet{ProtocolVersion: version, Connect: packets.ConnectParams{
		ClientIdentifier: id, Username: []byte(user), UsernameFlag: user != "", Keepalive: 30,
	}}
	if will != "" {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload = true, will, []byte("gone")
	}
	cl := quietServer().NewClient(nil, "tcp", id, false)
	cl.ParseConnect("tcp", pk)
	return cl, pk
}

func TestAuthConnect(t *testing.T) {
	type attempt struct {
		user, password string
		noPassword     bool
		ok             bool
		reason         string
	}
	tests := []struct {
		name     string
		opts     AuthOptions
		attempts []attempt
	}{
		{"anonymous allowed, no password file", AuthOptions{AllowAnonymous: true}, []attempt{
			{user: "", ok: true},
			{user: "anyone", password: "x", ok: true}, // Mosquitto 2: a username is just a name then
		}},
		{"anonymous refused, no password file: nobody gets in", AuthOptions{}, []attempt{
			{user: "", reason: AuthReasonAnonymous},
			{user: "alice", password: "alice-secret", reason: AuthReasonUnknownUser},
		}},
		{"password file and anonymous", AuthOptions{AllowAnonymous: true, PasswordFile: fixturePasswd}, []attempt{
			{user: "", ok: true},
			{user: "alice", password: "alice-secret", ok: true},
			{user: "dave", password: "dave pw with spaces", ok: true}, // $6$ entry
			{user: "alice", password: "wrong", reason: AuthReasonBadPassword},
			{user: "alice", noPassword: true, reason: AuthReasonBadPassword},
			{user: "mallory", password: "alice-secret", reason: AuthReasonUnknownUser},
		}},
		{"password file only", AuthOptions{PasswordFile: fixturePasswd}, []attempt{
			{user: "", reason: AuthReasonAnonymous},
			{user: "carol smith", password: "pässwörd ✓", ok: true},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var rec recorder
			a := newAuth(t, rec.opts(tt.opts))
			var wantReasons []string
			for _, at := range tt.attempts {
				cl, pk := client(t, "c1", at.user, 4, "")
				pk.Connect.Password, pk.Connect.PasswordFlag = []byte(at.password), !at.noPassword && at.user != ""
				if got := a.OnConnectAuthenticate(cl, pk); got != at.ok {
					t.Errorf("user %q password %q: allowed=%v, want %v", at.user, at.password, got, at.ok)
				}
				if !at.ok {
					wantReasons = append(wantReasons, at.reason)
				}
			}
			if strings.Join(rec.failures, ",") != strings.Join(wantReasons, ",") {
				t.Errorf("failure reasons %v, want %v", rec.failures, wantReasons)
			}
		})
	}

	// The cluster's inline client is always allowed.
	a := newAuth(t, AuthOptions{PasswordFile: fixturePasswd, ACLFile: fixtureACL})
	inline := quietServer().NewClient(nil, "cluster", "cluster-forwarder", true)
	if !a.OnConnectAuthenticate(inline, packets.Packet{}) || !a.OnACLCheck(inline, "secret/x", true) || !a.OnACLCheck(inline, "secret/x", false) {
		t.Error("inline client refused")
	}
}

func TestAuthConnectLogsNoPassword(t *testing.T) {
	var buf bytes.Buffer
	a := newAuth(t, AuthOptions{PasswordFile: fixturePasswd, Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	cl, pk := client(t, "c1", "alice", 4, "")
	pk.Connect.Password, pk.Connect.PasswordFlag = []byte("s3cret-guess"), true
	a.OnConnectAuthenticate(cl, pk)
	out := buf.String()
	if !strings.Contains(out, "reason=bad_password") || strings.Contains(out, "s3cret-guess") || strings.Contains(out, "$7$") {
		t.Errorf("log = %q", out)
	}
}

func TestAuthDropsForbiddenWill(t *testing.T) {
	a := newAuth(t, AuthOptions{AllowAnonymous: true, ACLFile: fixtureACL})
	// alice may write w/#, not b/#; Mosquitto accepts both CONNECTs and never
	// publishes the forbidden will.
	for will, keep := range map[string]bool{"w/1": true, "b/1": false} {
		cl, pk := client(t, "c1", "alice", 5, will)
		if !a.OnConnectAuthenticate(cl, pk) {
			t.Fatalf("will %s: connect refused", will)
		}
		if kept := cl.Properties.Will.Flag == 1; kept != keep {
			t.Errorf("will %s kept=%v, want %v", will, kept, keep)
		}
	}
}

func TestAuthACLCheck(t *testing.T) {
	var rec recorder
	a := newAuth(t, rec.opts(AuthOptions{AllowAnonymous: true, ACLFile: fixtureACL}))
	v5, _ := client(t, "cl1", "alice", 5, "")
	tests := []struct {
		topic string
		write bool
		want  bool
	}{
		{"w/1", true, true},
		{"b/1", true, false},
		{"#", false, true},              // subscribe: could deliver a/...
		{"b/#", false, false},           // subscribe: nothing readable
		{"$SHARE/g/a/+", false, true},   // mochi treats the prefix case-insensitively
		{"$share/g/b/+", false, false},  //
		{"a/x", false, true},            // delivery (or plain subscribe)
		{"a/secret/y", false, false},    // deny in alice's block
		{"a/b", false, true},            // alice's allow wins over "pattern deny a/b", as in Mosquitto
		{"c/cl1/status", false, true},   // pattern %c
		{"p/alice/inbox", false, true},  // pattern %u
		{"p/admin/inbox", false, false}, //
	}
	for _, tt := range tests {
		if got := a.OnACLCheck(v5, tt.topic, tt.write); got != tt.want {
			t.Errorf("OnACLCheck(%q, write=%v) = %v, want %v", tt.topic, tt.write, got, tt.want)
		}
	}
	if got := strings.Join(rec.denied, ","); got != "write,subscribe,subscribe,read,read" {
		t.Errorf("denied accesses = %s", got)
	}

	// MQTT 3: the write check moves to OnPublish, which acks and drops.
	v4, _ := client(t, "cl2", "alice", 4, "")
	if !a.OnACLCheck(v4, "b/1", true) {
		t.Error("MQTT 3 write refused in OnACLCheck: mochi would disconnect the client")
	}
	if _, err := a.OnPublish(v4, packets.Packet{TopicName: "b/1"}); !errors.Is(err, packets.CodeSuccessIgnore) {
		t.Errorf("OnPublish(b/1) err = %v, want CodeSuccessIgnore", err)
	}
	if _, err := a.OnPublish(v4, packets.Packet{TopicName: "w/1"}); err != nil {
		t.Errorf("OnPublish(w/1) err = %v", err)
	}
	if _, err := a.OnPublish(v5, packets.Packet{TopicName: "b/1"}); err != nil {
		t.Errorf("MQTT 5 publishes are decided by OnACLCheck, got %v", err)
	}

	// Without an acl_file everything is allowed.
	open := newAuth(t, AuthOptions{AllowAnonymous: true})
	if !open.OnACLCheck(v5, "b/1", true) || !open.OnACLCheck(v5, "#", false) {
		t.Error("no acl_file must allow everything")
	}
}

func TestAuthLogsFirstDenialPerConnection(t *testing.T) {
	var buf bytes.Buffer
	var rec recorder
	o := rec.opts(AuthOptions{AllowAnonymous: true, ACLFile: fixtureACL, Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	a := newAuth(t, o)
	cl, _ := client(t, "cl1", "alice", 5, "")
	other, _ := client(t, "cl9", "alice", 5, "")
	for range 5 {
		a.OnACLCheck(cl, "b/x", false)
	}
	a.OnACLCheck(other, "b/x", false)
	if n := strings.Count(buf.String(), "acl denied"); n != 2 {
		t.Errorf("%d denial log lines for 2 connections, want 2:\n%s", n, buf.String())
	}
	if len(rec.denied) != 6 {
		t.Errorf("%d denials counted, want 6", len(rec.denied))
	}
	a.OnDisconnect(cl, nil, true)
	a.OnACLCheck(cl, "b/x", false) // a new connection (mochi reuses no Client) would log again
	if n := strings.Count(buf.String(), "acl denied"); n != 3 {
		t.Errorf("after disconnect: %d log lines, want 3", n)
	}
}

func TestAuthReload(t *testing.T) {
	dir := t.TempDir()
	aclPath, pwPath := filepath.Join(dir, "acl"), filepath.Join(dir, "passwd")
	pw, err := os.ReadFile(fixturePasswd)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, pwPath, string(pw))
	writeFile(t, aclPath, "user alice\ntopic read a/#\n")
	a := newAuth(t, AuthOptions{PasswordFile: pwPath, ACLFile: aclPath})
	cl, pk := client(t, "c1", "alice", 5, "")
	pk.Connect.Password, pk.Connect.PasswordFlag = []byte("alice-secret"), true

	if a.OnACLCheck(cl, "b/x", false) {
		t.Fatal("b/x allowed before reload")
	}
	writeFile(t, aclPath, "user alice\ntopic read a/#\ntopic read b/#\n")
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if !a.OnACLCheck(cl, "b/x", false) {
		t.Fatal("reload did not take effect")
	}

	// A broken file keeps the old rules and says where the problem is.
	writeFile(t, aclPath, "user alice\ntopic read b/#\ntopic raed c/#\n")
	err = a.Reload()
	if err == nil || !strings.Contains(err.Error(), aclPath+":3: topic \"raed\"") {
		t.Fatalf("reload error = %v", err)
	}
	if !a.OnACLCheck(cl, "b/x", false) || !a.OnACLCheck(cl, "a/x", false) {
		t.Error("failed reload dropped the old rules")
	}
	os.Remove(pwPath)
	if err := a.Reload(); err == nil || !strings.Contains(err.Error(), "load password_file") {
		t.Errorf("missing password file: %v", err)
	}
	if !a.OnConnectAuthenticate(cl, pk) {
		t.Error("failed reload dropped the old passwords")
	}
	if _, err := NewAuth(AuthOptions{ACLFile: filepath.Join(dir, "missing")}); err == nil {
		t.Error("NewAuth accepted a missing acl_file")
	}
	if err := a.Init(&AuthOptions{}); !errors.Is(err, ErrAuthInitConfig) {
		t.Errorf("Init(config) = %v", err)
	}
}

// TestAuthReloadRace runs checks while rules are swapped (meaningful under -race).
func TestAuthReloadRace(t *testing.T) {
	dir := t.TempDir()
	aclPath := filepath.Join(dir, "acl")
	writeFile(t, aclPath, "topic read a/#\n")
	a := newAuth(t, AuthOptions{AllowAnonymous: true, ACLFile: aclPath})
	cl, pk := client(t, "c1", "", 5, "")
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for range 200 {
				a.OnConnectAuthenticate(cl, pk)
				a.OnACLCheck(cl, "a/x", false)
				a.OnACLCheck(cl, "b/x", true)
			}
		})
	}
	for range 20 {
		if err := a.Reload(); err != nil {
			t.Error(err)
		}
	}
	wg.Wait()
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestAuthWithMochi drives a real mochi server over in-memory connections to
// check what clients actually receive: the reason codes required for MQTT 5,
// Mosquitto's behaviour for MQTT 3, and per-message delivery filtering.
func TestAuthWithMochi(t *testing.T) {
	aclPath := filepath.Join(t.TempDir(), "acl")
	writeFile(t, aclPath, "user alice\ntopic read a/#\ntopic deny a/secret/#\nuser dave\ntopic write #\n")
	srv := quietServer()
	a := newAuth(t, AuthOptions{PasswordFile: fixturePasswd, ACLFile: aclPath})
	if err := srv.AddHook(a, nil); err != nil {
		t.Fatal(err)
	}
	// Cleanups run last-in first-out: the client connections (registered by
	// dial) close first, so Close does not wait for keepalives to expire.
	t.Cleanup(func() { srv.Close() })

	// Refused CONNECTs: mochi answers 0x86 "bad username or password" on
	// MQTT 5 (Mosquitto: 0x87) and 5 "not authorised" on MQTT 3 (as Mosquitto).
	if code := dial(t, srv, 5, "mallory", "x").connackCode; code != packets.ErrBadUsernameOrPassword.Code {
		t.Errorf("v5 unknown user: CONNACK 0x%02x", code)
	}
	if code := dial(t, srv, 4, "", "").connackCode; code != 0x05 {
		t.Errorf("v3 anonymous: CONNACK 0x%02x", code)
	}

	alice := dial(t, srv, 5, "alice", "alice-secret")
	if alice.connackCode != 0 {
		t.Fatalf("alice refused: 0x%02x", alice.connackCode)
	}
	// SUBACK: granted, then 0x87 for a filter alice can never read.
	alice.send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "#"}, {Filter: "b/#"}}})
	if ack := alice.expect(t, packets.Suback); !bytes.Equal(ack.ReasonCodes, []byte{0x00, 0x87}) {
		t.Errorf("SUBACK reason codes % x, want 00 87", ack.ReasonCodes)
	}
	// PUBACK 0x87 for a refused MQTT 5 publish.
	alice.send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 2, TopicName: "b/1", Payload: []byte("x")})
	if ack := alice.expect(t, packets.Puback); ack.ReasonCode != 0x87 {
		t.Errorf("v5 PUBACK reason 0x%02x, want 0x87", ack.ReasonCode)
	}

	// A refused MQTT 3.1.1 publish is acked and the client stays
	// connected, as with Mosquitto (mochi alone would disconnect it).
	bob := dial(t, srv, 4, "bob", "b0b:with:colons")
	bob.send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7, TopicName: "b/1", Payload: []byte("x")})
	bob.expect(t, packets.Puback)
	bob.send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	bob.expect(t, packets.Pingresp)

	// Deliveries are checked per message: alice, subscribed to #, only
	// gets what she may read. mochi delivers synchronously in the
	// publisher's order, so a/x arriving first proves the others were dropped.
	dave := dial(t, srv, 4, "dave", "dave pw with spaces")
	for _, topic := range []string{"a/secret/y", "b/z", "a/x"} {
		dave.send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: []byte(topic)})
	}
	if got := alice.expect(t, packets.Publish); got.TopicName != "a/x" {
		t.Errorf("alice received %q, want a/x", got.TopicName)
	}
	alice.expectNothing(t)
}

type testConn struct {
	c           net.Conn
	version     byte
	in          chan packets.Packet
	connackCode byte
}

func dial(t *testing.T, srv *mqtt.Server, version byte, user, password string) *testConn {
	t.Helper()
	cc, sc := net.Pipe()
	go srv.EstablishConnection("test", sc)
	tc := &testConn{c: cc, version: version, in: make(chan packets.Packet, 16)}
	t.Cleanup(func() { cc.Close() })
	go tc.readLoop()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "t-" + user,
		Username: []byte(user), UsernameFlag: user != "", Password: []byte(password), PasswordFlag: password != "",
	}}
	tc.send(t, pk)
	tc.connackCode = tc.expect(t, packets.Connack).ReasonCode
	return tc
}

func (tc *testConn) send(t *testing.T, pk packets.Packet) {
	t.Helper()
	pk.ProtocolVersion = tc.version
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	default:
		t.Fatalf("cannot send %v", pk.FixedHeader.Type)
	}
	if err != nil {
		t.Fatal(err)
	}
	tc.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := tc.c.Write(buf.Bytes()); err != nil {
		t.Fatalf("write: %v", err)
	}
}

func (tc *testConn) readLoop() {
	defer close(tc.in)
	r := bufio.NewReader(tc.c)
	for {
		hb, err := r.ReadByte()
		if err != nil {
			return
		}
		pk := packets.Packet{ProtocolVersion: tc.version}
		if err := pk.FixedHeader.Decode(hb); err != nil {
			return
		}
		n, _, err := packets.DecodeLength(r)
		if err != nil {
			return
		}
		pk.FixedHeader.Remaining = n
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return
		}
		switch pk.FixedHeader.Type {
		case packets.Connack:
			err = pk.ConnackDecode(body)
		case packets.Suback:
			err = pk.SubackDecode(body)
		case packets.Puback:
			err = pk.PubackDecode(body)
		case packets.Publish:
			err = pk.PublishDecode(body)
		}
		if err != nil {
			return
		}
		tc.in <- pk
	}
}

func (tc *testConn) expect(t *testing.T, typ byte) packets.Packet {
	t.Helper()
	select {
	case pk, ok := <-tc.in:
		if !ok {
			t.Fatalf("connection closed while waiting for %s", packets.PacketNames[typ])
		}
		if pk.FixedHeader.Type != typ {
			t.Fatalf("got %s, want %s", packets.PacketNames[pk.FixedHeader.Type], packets.PacketNames[typ])
		}
		return pk
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", packets.PacketNames[typ])
	}
	return packets.Packet{}
}

// expectNothing checks that nothing else arrives. Earlier packets already
// proved ordering; the short wait only catches a stray late delivery.
func (tc *testConn) expectNothing(t *testing.T) {
	t.Helper()
	select {
	case pk := <-tc.in:
		t.Errorf("unexpected %s %q", packets.PacketNames[pk.FixedHeader.Type], pk.TopicName)
	case <-time.After(100 * time.Millisecond):
	}
}
