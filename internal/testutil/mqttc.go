// Package testutil holds helpers shared by the in-process and end-to-end
// tests: an MQTT 5 test client and a condition poller.
package testutil

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/eclipse/paho.golang/paho/session/state"
)

// Eventually polls cond every 10 ms until it returns nil or timeout passes,
// then fails the test with cond's last error. It is the one way tests wait.
func Eventually(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Client is a connected MQTT 5 client (paho.golang) that collects every
// PUBLISH it receives on Msgs, in arrival order.
type Client struct {
	*paho.Client
	ID          string
	Conn        net.Conn // the socket: closing it drops the client without DISCONNECT
	Connack     *paho.Connack
	Msgs        chan *paho.Publish
	Disconnects chan *paho.Disconnect
}

// ClientOptions are the CONNECT settings a test may vary.
type ClientOptions struct {
	ID            string
	CleanStart    bool
	SessionExpiry uint32
	Will          *paho.WillMessage
	Buffer        int // size of Msgs; default 1000
	// Session, if set, is the client-side session state (in-flight QoS 2
	// ids) carried over from an earlier connection, as a real client that
	// resumes its session keeps it; it must not be shared by two live
	// connections.
	Session *state.State
	// ReceiveMaximum, if set, is sent in CONNECT.
	ReceiveMaximum uint16
	// WillDelay, if set, is the will's Will Delay Interval (seconds).
	WillDelay uint32
	// PacketTimeout bounds the wait for an acknowledgement (default
	// 10 s; a 256 MB durable message takes longer).
	PacketTimeout time.Duration
}

// Connect dials addr and completes an MQTT 5 CONNECT, failing the test on
// any error. The client disconnects at test cleanup.
func Connect(t testing.TB, addr string, o ClientOptions) *Client {
	t.Helper()
	c, err := TryConnect(addr, o)
	if err != nil {
		t.Fatalf("connect %s to %s: %v", o.ID, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TryConnect is Connect without the test: it returns the error.
func TryConnect(addr string, o ClientOptions) (*Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if o.Buffer == 0 {
		o.Buffer = 1000
	}
	c := &Client{ID: o.ID, Conn: conn, Msgs: make(chan *paho.Publish, o.Buffer), Disconnects: make(chan *paho.Disconnect, 4)}
	c.Client = paho.NewClient(paho.ClientConfig{
		ClientID: o.ID,
		Conn:     packets.NewThreadSafeConn(conn),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			c.Msgs <- pr.Packet // a full buffer blocks the client: the test sized it too small
			return true, nil
		}},
		OnServerDisconnect: func(d *paho.Disconnect) {
			select {
			case c.Disconnects <- d:
			default:
			}
		},
		OnClientError: func(error) {},
		PacketTimeout: cmp.Or(o.PacketTimeout, 10*time.Second),
		Session:       sessionOrNil(o.Session),
	})
	cp := &paho.Connect{ClientID: o.ID, KeepAlive: 30, CleanStart: o.CleanStart}
	if o.SessionExpiry > 0 || o.ReceiveMaximum > 0 {
		cp.Properties = &paho.ConnectProperties{}
		if o.SessionExpiry > 0 {
			se := o.SessionExpiry
			cp.Properties.SessionExpiryInterval = &se
		}
		if o.ReceiveMaximum > 0 {
			rm := o.ReceiveMaximum
			cp.Properties.ReceiveMaximum = &rm
		}
	}
	if o.Will != nil {
		cp.WillMessage, cp.WillProperties = o.Will, &paho.WillProperties{}
		if o.WillDelay > 0 {
			d := o.WillDelay
			cp.WillProperties.WillDelayInterval = &d
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	c.Connack = ca
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("CONNECT: %w", err)
	}
	return c, nil
}

// sessionOrNil avoids a typed nil in the interface (paho then makes its own).
func sessionOrNil(s *state.State) session.SessionManager {
	if s == nil {
		return nil
	}
	return s
}

// Close disconnects normally; it is safe to call twice.
func (c *Client) Close() {
	select {
	case <-c.Done():
		return
	default:
	}
	_ = c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
	}
}

// Sub subscribes to filters at qos and fails unless every one is granted.
func (c *Client) Sub(t testing.TB, qos byte, filters ...string) {
	t.Helper()
	s := &paho.Subscribe{}
	for _, f := range filters {
		s.Subscriptions = append(s.Subscriptions, paho.SubscribeOptions{Topic: f, QoS: qos})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := c.Subscribe(ctx, s)
	if err != nil {
		t.Fatalf("%s subscribe %v: %v", c.ID, filters, err)
	}
	for i, r := range sa.Reasons {
		if r >= 0x80 {
			t.Fatalf("%s subscribe %s refused: 0x%02x", c.ID, filters[i], r)
		}
	}
}

// Pub publishes and, for QoS 1 and 2, waits for the acknowledgement and
// fails unless it reports success.
func (c *Client) Pub(t testing.TB, topic string, qos byte, retain bool, payload []byte) {
	t.Helper()
	if err := c.TryPub(topic, qos, retain, payload); err != nil {
		t.Fatalf("%s publish %s: %v", c.ID, topic, err)
	}
}

// TryPub is Pub returning the error (a failure reason code included).
func (c *Client) TryPub(topic string, qos byte, retain bool, payload []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pr, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: payload})
	if err != nil {
		return err
	}
	if pr != nil && pr.ReasonCode >= 0x80 {
		return fmt.Errorf("reason code 0x%02x", pr.ReasonCode)
	}
	return nil
}

// ErrNoMessage is returned by Next when nothing arrives in time.
var ErrNoMessage = errors.New("no message")

// Next waits up to timeout for the next message.
func (c *Client) Next(timeout time.Duration) (*paho.Publish, error) {
	select {
	case p := <-c.Msgs:
		return p, nil
	case <-time.After(timeout):
		return nil, ErrNoMessage
	}
}

// MustNext is Next that fails the test when nothing arrives.
func (c *Client) MustNext(t testing.TB, timeout time.Duration) *paho.Publish {
	t.Helper()
	p, err := c.Next(timeout)
	if err != nil {
		t.Fatalf("%s: no message within %s", c.ID, timeout)
	}
	return p
}
