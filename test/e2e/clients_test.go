package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/gorilla/websocket"
)

const (
	cliTimeout  = 15 * time.Second // one mosquitto_pub / mosquitto_passwd run
	subDeadline = 30 * time.Second // the most a mosquitto_sub may live
	msgTimeout  = 10 * time.Second // waiting for one message on a Go client
)

// ---------------------------------------------------------------------------
// Messages as the tests compare them

// message is what a subscriber saw: topic, QoS, retain flag and payload.
type message struct {
	Topic   string
	QoS     int
	Retain  bool
	Payload string
}

func msg(topic string, qos int, retain bool, payload string) message {
	return message{Topic: topic, QoS: qos, Retain: retain, Payload: payload}
}

func (m message) String() string {
	p := m.Payload
	if len(p) > 64 {
		p = fmt.Sprintf("%s...(%d bytes)", p[:32], len(p))
	}
	return fmt.Sprintf("{%s q%d r%v %q}", m.Topic, m.QoS, m.Retain, p)
}

// assertMessages fails unless got equals want exactly, in order.
func assertMessages(t testing.TB, got []message, want ...message) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("messages received:\n  got  %v\n  want %v", got, want)
	}
}

// ---------------------------------------------------------------------------
// Debian's mosquitto clients

func lookPath(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found (%v): install Debian's mosquitto-clients (make test does)", name, err)
	}
	return p
}

// hostArgs are mosquitto_pub/mosquitto_sub flags that reach the node's
// plain MQTT listener.
func (b *Broker) hostArgs() []string {
	host := "127.0.0.1"
	if h, _, err := net.SplitHostPort(b.MQTTAddr); err == nil && net.ParseIP(h) != nil && !net.ParseIP(h).IsUnspecified() {
		host = h // a node on its own loopback address (statefulset_test.go)
	}
	return []string{"-h", host, "-p", portOf(b.MQTTAddr)}
}

// pub runs mosquitto_pub against the node; the caller checks the result.
func (b *Broker) pub(t testing.TB, args ...string) cliResult {
	t.Helper()
	return mosquittoPub(t, "", append(b.hostArgs(), args...)...)
}

// mustPub runs mosquitto_pub against the node and fails on a non-zero exit.
func (b *Broker) mustPub(t testing.TB, args ...string) {
	t.Helper()
	mustSucceed(t, b.pub(t, args...))
}

func mustSucceed(t testing.TB, r cliResult) {
	t.Helper()
	if r.ExitCode != 0 || r.TimedOut {
		t.Fatalf("command failed:\n%s", r)
	}
}

// mosquittoPub runs mosquitto_pub with args (host flags included) and stdin.
func mosquittoPub(t testing.TB, stdin string, args ...string) cliResult {
	t.Helper()
	return runCmd(t, cliTimeout, nil, stdin, lookPath(t, "mosquitto_pub"), args...)
}

// subFormat makes mosquitto_sub print each message on one line that no
// debug line (-d) can look like: topic, QoS, retain flag, hex payload.
const subFormat = "MSG\t%t\t%q\t%r\t%x"

// subProc is a running mosquitto_sub.
type subProc struct {
	cmdline string
	cmd     *exec.Cmd
	stderr  lockedBuffer

	mu       sync.Mutex
	lines    []string
	granted  string // the codes of the "Subscribed (mid: n): ..." line
	done     chan struct{}
	exitCode int
}

// sub starts mosquitto_sub against the node's plain listener and returns
// once the broker has acknowledged the subscription (SUBACK).
func (b *Broker) sub(t testing.TB, args ...string) *subProc {
	t.Helper()
	return startSub(t, b.hostArgs(), args...)
}

// startSub starts mosquitto_sub with host flags and args and waits for its
// SUBACK. Unless args set -W, it exits on its own after subDeadline.
func startSub(t testing.TB, hostArgs []string, args ...string) *subProc {
	t.Helper()
	s := launchSub(t, hostArgs, args...)
	eventually(t, 10*time.Second, func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.granted != "" {
			return nil
		}
		select {
		case <-s.done:
			return stopPolling(fmt.Errorf("mosquitto_sub exited (%d) before SUBACK:\n%s", s.exitCode, s.outputLocked()))
		default:
			return fmt.Errorf("mosquitto_sub not subscribed yet: %s", s.cmdline)
		}
	})
	return s
}

// launchSub starts mosquitto_sub without waiting for anything.
func launchSub(t testing.TB, hostArgs []string, args ...string) *subProc {
	t.Helper()
	// stdbuf: mosquitto_sub's debug lines are block-buffered on a pipe;
	// line buffering lets the harness see the SUBACK as it happens.
	full := append([]string{"-oL", lookPath(t, "mosquitto_sub"), "-d", "-F", subFormat}, hostArgs...)
	full = append(full, args...)
	if !hasFlag(args, "-W") {
		full = append(full, "-W", strconv.Itoa(int(subDeadline/time.Second)))
	}
	cmd := exec.Command(lookPath(t, "stdbuf"), full...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	s := &subProc{cmdline: shellQuote("mosquitto_sub", full[2:]), cmd: cmd, done: make(chan struct{})}
	cmd.Stderr = &s.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("mosquitto_sub stdout: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", s.cmdline, err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			s.lines = append(s.lines, line)
			if rest, ok := strings.CutPrefix(line, "Subscribed (mid: "); ok && s.granted == "" {
				_, codes, _ := strings.Cut(rest, ": ")
				s.granted = codes
			}
			s.mu.Unlock()
		}
		_ = cmd.Wait()
		s.mu.Lock()
		s.exitCode = cmd.ProcessState.ExitCode()
		s.mu.Unlock()
		close(s.done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-s.done
	})
	return s
}

func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag {
			return true
		}
	}
	return false
}

func (s *subProc) outputLocked() string {
	return fmt.Sprintf("$ %s\nstdout:\n%s\nstderr:\n%s", s.cmdline, strings.Join(s.lines, "\n"), s.stderr.String())
}

// Granted is the reason codes of the SUBACK as mosquitto_sub printed them.
func (s *subProc) Granted() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.granted
}

// messagesLocked parses the message lines received so far.
func (s *subProc) messagesLocked() ([]message, error) {
	var out []message
	for _, line := range s.lines {
		rest, ok := strings.CutPrefix(line, "MSG\t")
		if !ok {
			continue
		}
		f := strings.Split(rest, "\t")
		if len(f) != 4 {
			return out, fmt.Errorf("unparsable message line %q", line)
		}
		qos, err1 := strconv.Atoi(f[1])
		retain, err2 := strconv.Atoi(f[2])
		payload, err3 := hex.DecodeString(f[3])
		if err := errors.Join(err1, err2, err3); err != nil {
			return out, fmt.Errorf("message line %q: %w", line, err)
		}
		out = append(out, message{Topic: f[0], QoS: qos, Retain: retain == 1, Payload: string(payload)})
	}
	return out, nil
}

// Kill ends mosquitto_sub with SIGKILL: its socket closes without DISCONNECT.
func (s *subProc) Kill(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill mosquitto_sub: %v", err)
	}
	s.result(t)
}

// result waits for mosquitto_sub to exit and returns its exit status and
// the messages it printed.
func (s *subProc) result(t testing.TB) (int, []message) {
	t.Helper()
	eventually(t, subDeadline+5*time.Second, func() error {
		select {
		case <-s.done:
			return nil
		default:
			return fmt.Errorf("mosquitto_sub still running: %s", s.cmdline)
		}
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	msgs, err := s.messagesLocked()
	if err != nil {
		t.Fatalf("%v\n%s", err, s.outputLocked())
	}
	return s.exitCode, msgs
}

// wait waits for mosquitto_sub to exit after its -C count and returns the
// messages; any other exit (timeout -W, refused, error) fails the test.
func (s *subProc) wait(t testing.TB) []message {
	t.Helper()
	code, msgs := s.result(t)
	if code != 0 {
		s.mu.Lock()
		out := s.outputLocked()
		s.mu.Unlock()
		t.Fatalf("mosquitto_sub exit status %d (27 = -W timeout: expected messages did not all arrive); got %d message(s): %v\n%s",
			code, len(msgs), msgs, out)
	}
	return msgs
}

// ---------------------------------------------------------------------------
// paho.golang MQTT 5 client

type v5Options struct {
	ClientID      string
	Username      string
	Password      string
	KeepAlive     uint16
	NoCleanStart  bool
	SessionExpiry uint32
	Will          *paho.WillMessage
}

// v5Client is a connected paho.golang client that collects what it receives.
type v5Client struct {
	*paho.Client
	Connack     *paho.Connack
	Msgs        chan *paho.Publish    // every PUBLISH received, in order
	Disconnects chan *paho.Disconnect // DISCONNECT packets from the server
}

func dialTCP(t testing.TB, addr string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return conn
}

// connectV5 connects a paho client over TCP to addr and fails the test
// unless the CONNACK accepts it.
func connectV5(t testing.TB, addr string, o v5Options) *v5Client {
	t.Helper()
	c, err := connectV5Conn(t, dialTCP(t, addr), o)
	if err != nil {
		t.Fatalf("MQTT 5 connect to %s as %q: %v", addr, o.ClientID, err)
	}
	return c
}

// connectV5Conn runs the MQTT 5 handshake on conn. On a refused CONNECT it
// returns the error and (when one arrived) the CONNACK in the client.
func connectV5Conn(t testing.TB, conn net.Conn, o v5Options) (*v5Client, error) {
	t.Helper()
	c := &v5Client{
		Msgs:        make(chan *paho.Publish, 1000),
		Disconnects: make(chan *paho.Disconnect, 10),
	}
	c.Client = paho.NewClient(paho.ClientConfig{
		ClientID: o.ClientID,
		Conn:     packets.NewThreadSafeConn(conn),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){
			func(pr paho.PublishReceived) (bool, error) {
				select {
				case c.Msgs <- pr.Packet:
				default: // far more than any test expects; next() reports what is missing
				}
				return true, nil
			},
		},
		OnServerDisconnect: func(d *paho.Disconnect) {
			select {
			case c.Disconnects <- d:
			default:
			}
		},
		OnClientError: func(error) {},
		PacketTimeout: msgTimeout,
	})
	cp := &paho.Connect{
		ClientID:   o.ClientID,
		KeepAlive:  o.KeepAlive,
		CleanStart: !o.NoCleanStart,
	}
	if o.KeepAlive == 0 {
		cp.KeepAlive = 30
	}
	if o.Username != "" {
		cp.Username, cp.UsernameFlag = o.Username, true
	}
	if o.Password != "" {
		cp.Password, cp.PasswordFlag = []byte(o.Password), true
	}
	if o.SessionExpiry > 0 {
		se := o.SessionExpiry
		cp.Properties = &paho.ConnectProperties{SessionExpiryInterval: &se}
	}
	if o.Will != nil {
		cp.WillMessage = o.Will
		cp.WillProperties = &paho.WillProperties{}
	}
	ctx, cancel := context.WithTimeout(context.Background(), msgTimeout)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	c.Connack = ca
	if err != nil {
		_ = conn.Close()
		if ca != nil {
			return c, fmt.Errorf("CONNACK reason 0x%02X: %w", ca.ReasonCode, err)
		}
		return c, err
	}
	t.Cleanup(func() {
		select {
		case <-c.Done():
			return
		default:
		}
		_ = c.Disconnect(&paho.Disconnect{ReasonCode: 0})
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Errorf("client %s did not shut down", o.ClientID)
		}
	})
	return c, nil
}

// subscribe sends one SUBSCRIBE and returns the SUBACK reason codes; paho's
// error for a refused filter is expected and ignored when a SUBACK came.
func (c *v5Client) subscribe(t testing.TB, subs ...paho.SubscribeOptions) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), msgTimeout)
	defer cancel()
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs})
	if sa == nil {
		t.Fatalf("SUBSCRIBE %v: no SUBACK: %v", subs, err)
	}
	return sa.Reasons
}

// publish sends one PUBLISH; for QoS 1 and 2 it returns the reason code of
// the PUBACK (or PUBREC/PUBCOMP), for QoS 0 it returns 0.
func (c *v5Client) publish(t testing.TB, topic string, qos byte, retain bool, payload []byte) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), msgTimeout)
	defer cancel()
	pr, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: payload})
	if pr == nil {
		t.Fatalf("PUBLISH %s qos %d: no acknowledgement: %v", topic, qos, err)
	}
	return pr.ReasonCode
}

// next returns the next message the client received, or fails the test.
func (c *v5Client) next(t testing.TB) message {
	t.Helper()
	select {
	case p := <-c.Msgs:
		return message{Topic: p.Topic, QoS: int(p.QoS), Retain: p.Retain, Payload: string(p.Payload)}
	case <-time.After(msgTimeout):
		t.Fatalf("client %s: no message within %s", c.ClientID(), msgTimeout)
		return message{}
	}
}

// expect receives len(want) messages and compares them, in order.
func (c *v5Client) expect(t testing.TB, want ...message) {
	t.Helper()
	var got []message
	for range want {
		got = append(got, c.next(t))
	}
	assertMessages(t, got, want...)
}

// ---------------------------------------------------------------------------
// Raw packets, for what a well-behaved client library will not send

// readPacket reads one MQTT 5 packet with a deadline.
func readPacket(conn net.Conn, timeout time.Duration) (*packets.ControlPacket, error) {
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	return packets.ReadPacket(conn)
}

// rawConnectV5 dials addr, sends cp and returns the connection once a
// CONNACK accepting it arrived.
func rawConnectV5(t testing.TB, addr string, cp *packets.Connect) net.Conn {
	t.Helper()
	conn := dialTCP(t, addr)
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := cp.WriteTo(conn); err != nil {
		t.Fatalf("write CONNECT: %v", err)
	}
	p, err := readPacket(conn, msgTimeout)
	if err != nil {
		t.Fatalf("read CONNACK: %v", err)
	}
	ca, ok := p.Content.(*packets.Connack)
	if !ok || ca.ReasonCode != 0 {
		t.Fatalf("want CONNACK 0x00, got %s", p)
	}
	return conn
}

// connectV311 is a hand-made MQTT 3.1.1 CONNECT: clean session, no will,
// no credentials.
func connectV311(clientID string, keepalive uint16) []byte {
	var vh bytes.Buffer
	vh.Write([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02})
	vh.Write([]byte{byte(keepalive >> 8), byte(keepalive)})
	vh.Write([]byte{byte(len(clientID) >> 8), byte(len(clientID))})
	vh.WriteString(clientID)
	return append([]byte{0x10, byte(vh.Len())}, vh.Bytes()...)
}

// closedResult is how a connection ended from the client's side.
type closedResult struct {
	Data    []byte        // bytes the server sent before closing
	Elapsed time.Duration // from the call until the close was seen
}

// readUntilClosed reads until the server closes the connection (EOF or
// reset). It returns an error when the connection is still open after
// timeout.
func readUntilClosed(conn net.Conn, timeout time.Duration) (closedResult, error) {
	start := time.Now()
	if err := conn.SetReadDeadline(start.Add(timeout)); err != nil {
		return closedResult{}, err
	}
	data, err := io.ReadAll(conn)
	r := closedResult{Data: data, Elapsed: time.Since(start)}
	var ne net.Error
	switch {
	case err == nil, errors.Is(err, syscall.ECONNRESET):
		return r, nil
	case errors.As(err, &ne) && ne.Timeout():
		return r, fmt.Errorf("server did not close the connection within %s (received % x)", timeout, data)
	default:
		return r, fmt.Errorf("read: %w", err)
	}
}

// ---------------------------------------------------------------------------
// WebSocket

// wsConn carries MQTT over a gorilla websocket as a net.Conn: each Write
// is one binary message; Read continues across message boundaries.
type wsConn struct {
	*websocket.Conn
	rmu sync.Mutex
	r   io.Reader
}

var _ net.Conn = (*wsConn)(nil)

func dialWS(t testing.TB, url string) net.Conn {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second}
	ws, resp, err := d.Dial(url, nil)
	if err != nil {
		status := ""
		if resp != nil {
			status = resp.Status
		}
		t.Fatalf("websocket dial %s: %v %s", url, err, status)
	}
	if got := ws.Subprotocol(); got != "mqtt" {
		t.Errorf("websocket subprotocol %q, want \"mqtt\"", got)
	}
	return &wsConn{Conn: ws}
}

func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for {
		if c.r == nil {
			_, r, err := c.NextReader()
			if err != nil {
				return 0, err
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (c *wsConn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}
