package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

// Failover time: a persistent session (QoS 1 subscription, session expiry
// 300 s) is connected to the victim node; the tool SIGKILLs the victim's
// process and measures, from the kill, how long until
//   - a retained QoS 1 publish is acknowledged by a surviving node, and
//   - the session resumes on a surviving node (CONNACK with session
//     present 1, clean start off).
// Both are retried every 50 ms, each attempt bounded by a second, over
// the survivors in turn, as a client with a list of broker addresses does.

type failoverResult struct {
	Label      string  `json:"label"`
	RetainedMs float64 `json:"retained_ms"`
	SessionMs  float64 `json:"session_ms"`
	RetainedOn string  `json:"retained_on"`
	SessionOn  string  `json:"session_on"`
}

const (
	failoverAttempt = time.Second
	failoverPause   = 50 * time.Millisecond
	failoverLimit   = 60 * time.Second
)

func failover(victim string, survivors []string, pid int) (failoverResult, error) {
	var res failoverResult
	id := fmt.Sprintf("mqttload-failover-%d", time.Now().UnixNano())
	topic := "mqttload/failover/" + id
	if _, err := subscribedSession(victim, id, topic); err != nil {
		return res, fmt.Errorf("on the victim: %w", err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return res, fmt.Errorf("kill %d: %w", pid, err)
	}
	killed := time.Now()
	var wg sync.WaitGroup
	var retErr, sessErr error
	wg.Add(2)
	go func() {
		defer wg.Done()
		res.RetainedOn, retErr = retry(survivors, killed, func(addr string) error {
			c, err := connect(addr, id+"-pub", false, nil)
			if err != nil {
				return err
			}
			defer func() { _ = c.Disconnect(&paho.Disconnect{}) }()
			ctx, cancel := context.WithTimeout(context.Background(), failoverAttempt)
			defer cancel()
			r, err := c.Publish(ctx, &paho.Publish{Topic: topic + "/retained", QoS: 1, Retain: true, Payload: []byte("failover")})
			if err == nil && r != nil && r.ReasonCode >= 0x80 {
				err = fmt.Errorf("PUBACK reason 0x%02x", r.ReasonCode)
			}
			return err
		})
		res.RetainedMs = float64(time.Since(killed).Microseconds()) / 1000
	}()
	go func() {
		defer wg.Done()
		res.SessionOn, sessErr = retry(survivors, killed, func(addr string) error {
			c, err := connectSession(addr, id, false)
			if err != nil {
				return err
			}
			// Session expiry 0 at DISCONNECT ends it: nothing left behind.
			zero := uint32(0)
			defer func() {
				_ = c.Disconnect(&paho.Disconnect{Properties: &paho.DisconnectProperties{SessionExpiryInterval: &zero}})
			}()
			return nil
		})
		res.SessionMs = float64(time.Since(killed).Microseconds()) / 1000
	}()
	wg.Wait()
	return res, errors.Join(retErr, sessErr)
}

// errSessionLost: a resume found no session (session present 0).
var errSessionLost = errors.New("session present 0: the session was lost")

// retry runs try on the survivors in turn until it succeeds, and returns
// the address it succeeded on; errSessionLost ends it at once.
func retry(addrs []string, since time.Time, try func(addr string) error) (string, error) {
	var last error
	for i := 0; time.Since(since) < failoverLimit; i++ {
		addr := addrs[i%len(addrs)]
		if last = try(addr); last == nil {
			return addr, nil
		} else if errors.Is(last, errSessionLost) {
			return "", last
		}
		time.Sleep(failoverPause)
	}
	return "", fmt.Errorf("nothing succeeded within %v: %w", failoverLimit, last)
}

// connectSession connects id with clean start as given, session expiry
// 300 s, each step bounded by failoverAttempt; a resume (clean start off)
// must find the session (session present 1).
// subscribedSession starts a new persistent session (session expiry 300 s)
// on addr, subscribed to topic at QoS 1.
func subscribedSession(addr, id, topic string) (*paho.Client, error) {
	sess, err := connectSession(addr, id, true)
	if err != nil {
		return nil, fmt.Errorf("session: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := sess.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}}}); err != nil {
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	return sess, nil
}

func connectSession(addr, id string, clean bool) (*paho.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, failoverAttempt)
	if err != nil {
		return nil, err
	}
	c := paho.NewClient(paho.ClientConfig{ClientID: id, Conn: packets.NewThreadSafeConn(conn), OnClientError: func(error) {}})
	ctx, cancel := context.WithTimeout(context.Background(), failoverAttempt)
	defer cancel()
	expiry := uint32(300)
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: id, KeepAlive: 30, CleanStart: clean,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	if !clean && !ca.SessionPresent {
		// The CONNECT opened a new, empty session: end it, and stop.
		zero := uint32(0)
		_ = c.Disconnect(&paho.Disconnect{Properties: &paho.DisconnectProperties{SessionExpiryInterval: &zero}})
		return nil, fmt.Errorf("resume on %s: %w", addr, errSessionLost)
	}
	return c, nil
}
