package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

// Backlog: a persistent session (QoS 1 subscription, session expiry 300 s)
// subscribes on --sub and goes away; n QoS 1 messages are published to it
// on --pub (inflight at a time); then the session resumes on --sub and the
// tool measures the time to its CONNACK and until the whole backlog has
// arrived (what a device that was offline, or whose node died, waits for).

type backlogResult struct {
	Label     string  `json:"label"`
	Messages  int     `json:"messages"`
	Received  int64   `json:"received"`
	ConnackMs float64 `json:"connack_ms"`
	DrainS    float64 `json:"drain_s"`
	DrainMsgs float64 `json:"drain_msgs_per_s"`
}

const backlogLimit = 5 * time.Minute

func backlog(pubAddr, subAddr string, n, size, inflight int) (backlogResult, error) {
	res := backlogResult{Messages: n}
	id := fmt.Sprintf("mqttload-backlog-%d", time.Now().UnixNano())
	topic := "mqttload/backlog/" + id
	sess, err := subscribedSession(subAddr, id, topic)
	if err != nil {
		return res, err
	}
	if err := sess.Disconnect(&paho.Disconnect{}); err != nil {
		return res, fmt.Errorf("disconnect the session: %w", err)
	}

	pub, err := connect(pubAddr, id+"-pub", false, nil)
	if err != nil {
		return res, err
	}
	payload := make([]byte, size)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, inflight)
	for range inflight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payload})
				cancel()
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	_ = pub.Disconnect(&paho.Disconnect{})
	select {
	case err := <-errs:
		return res, fmt.Errorf("publishing the backlog: %w", err)
	default:
	}

	var got atomic.Int64
	all := make(chan struct{})
	start := time.Now()
	conn, err := net.DialTimeout("tcp", subAddr, 5*time.Second)
	if err != nil {
		return res, err
	}
	c := paho.NewClient(paho.ClientConfig{ClientID: id, Conn: packets.NewThreadSafeConn(conn), OnClientError: func(error) {},
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(paho.PublishReceived) (bool, error) {
			if got.Add(1) == int64(n) {
				close(all)
			}
			return true, nil
		}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	expiry := uint32(0) // the session ends with this connection
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: id, KeepAlive: 30, CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	cancel()
	if err != nil {
		return res, fmt.Errorf("resume: %w", err)
	}
	res.ConnackMs = float64(time.Since(start).Microseconds()) / 1000
	if !ca.SessionPresent {
		_ = c.Disconnect(&paho.Disconnect{})
		return res, errors.New("resume: session not present")
	}
	select {
	case <-all:
	case <-time.After(backlogLimit):
	}
	res.DrainS = time.Since(start).Seconds()
	res.Received = got.Load()
	if res.DrainS > 0 {
		res.DrainMsgs = float64(res.Received) / res.DrainS
	}
	_ = c.Disconnect(&paho.Disconnect{})
	if res.Received < int64(n) {
		return res, fmt.Errorf("resume: %d of %d queued messages arrived within %v", res.Received, n, backlogLimit)
	}
	return res, nil
}
