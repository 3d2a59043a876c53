// Command mqttload is the project's load tool: one subscriber and one
// publisher, possibly on different brokers or nodes, a paced publish rate,
// and the publish-to-delivery latency of every message. Run it against a
// baseline (Debian's mosquitto, a single node) and the case under test in
// the same session and compare ratios; absolute numbers depend on the
// machine.
//
//	mqttload --pub 127.0.0.1:1883 --sub 127.0.0.1:1884 --rate 5000 --duration 10s --qos 1
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

type result struct {
	Label      string  `json:"label"`
	QoS        int     `json:"qos"`
	Rate       int     `json:"rate"`
	Sent       int     `json:"sent"`
	Received   int     `json:"received"`
	Lost       int     `json:"lost"`
	Throughput float64 `json:"throughput_msgs_per_s"`
	P50us      int64   `json:"p50_us"`
	P90us      int64   `json:"p90_us"`
	P99us      int64   `json:"p99_us"`
	Maxus      int64   `json:"max_us"`
}

func main() {
	pubAddr := flag.String("pub", "127.0.0.1:1883", "broker the publisher connects to")
	subAddr := flag.String("sub", "", "broker the subscriber connects to (default: --pub)")
	rate := flag.Int("rate", 5000, "messages per second (0: as fast as possible)")
	duration := flag.Duration("duration", 10*time.Second, "how long to publish")
	qos := flag.Int("qos", 1, "QoS of publish and subscription (0, 1 or 2)")
	size := flag.Int("size", 64, "payload bytes (at least 16)")
	label := flag.String("label", "", "name of this run in the output")
	asJSON := flag.Bool("json", false, "print the result as JSON")
	flag.Parse()
	if *subAddr == "" {
		*subAddr = *pubAddr
	}
	if *size < 16 || *qos < 0 || *qos > 2 || *rate < 0 {
		fmt.Fprintln(os.Stderr, "mqttload: --size must be at least 16, --qos 0-2, --rate >= 0")
		os.Exit(2)
	}
	r, err := run(*pubAddr, *subAddr, *rate, *duration, byte(*qos), *size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mqttload:", err)
		os.Exit(1)
	}
	r.Label = *label
	if *asJSON {
		_ = json.NewEncoder(os.Stdout).Encode(r)
		return
	}
	fmt.Printf("%-24s qos%d rate %6d: sent %7d recv %7d lost %5d  %8.0f msg/s  p50 %6dus p90 %6dus p99 %6dus max %7dus\n",
		r.Label, r.QoS, r.Rate, r.Sent, r.Received, r.Lost, r.Throughput, r.P50us, r.P90us, r.P99us, r.Maxus)
}

func connect(addr, id string, onMsg func(*paho.Publish)) (*paho.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	cfg := paho.ClientConfig{ClientID: id, Conn: packets.NewThreadSafeConn(conn), OnClientError: func(error) {}}
	if onMsg != nil {
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			onMsg(pr.Packet)
			return true, nil
		}}
	}
	c := paho.NewClient(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: id, KeepAlive: 30, CleanStart: true}); err != nil {
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	return c, nil
}

func run(pubAddr, subAddr string, rate int, duration time.Duration, qos byte, size int) (result, error) {
	res := result{QoS: int(qos), Rate: rate}
	run := time.Now().UnixNano()
	topic := fmt.Sprintf("mqttload/%d", run)
	var (
		mu       sync.Mutex
		lat      = make([]int64, 0, 1<<16)
		received atomic.Int64
	)
	sub, err := connect(subAddr, fmt.Sprintf("mqttload-sub-%d", run), func(p *paho.Publish) {
		if len(p.Payload) >= 8 {
			d := time.Now().UnixNano() - int64(binary.BigEndian.Uint64(p.Payload))
			mu.Lock()
			lat = append(lat, d)
			mu.Unlock()
			received.Add(1)
		}
	})
	if err != nil {
		return res, err
	}
	defer func() { _ = sub.Disconnect(&paho.Disconnect{}) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if _, err := sub.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: qos}}}); err != nil {
		cancel()
		return res, fmt.Errorf("subscribe: %w", err)
	}
	cancel()
	pub, err := connect(pubAddr, fmt.Sprintf("mqttload-pub-%d", run), nil)
	if err != nil {
		return res, err
	}
	defer func() { _ = pub.Disconnect(&paho.Disconnect{}) }()
	// Wait until a probe crosses (routes may still be propagating), then
	// discard it.
	probe := make([]byte, size)
	deadline := time.Now().Add(15 * time.Second)
	for received.Load() == 0 {
		if time.Now().After(deadline) {
			return res, fmt.Errorf("no probe message reached the subscriber within 15s")
		}
		binary.BigEndian.PutUint64(probe, uint64(time.Now().UnixNano()))
		pctx, pcancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _ = pub.Publish(pctx, &paho.Publish{Topic: topic, QoS: qos, Payload: probe})
		pcancel()
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // let stray probes land before resetting
	base := received.Load()

	start := time.Now()
	var interval time.Duration
	if rate > 0 {
		interval = time.Second / time.Duration(rate)
	}
	for i := 0; time.Since(start) < duration; i++ {
		if interval > 0 {
			if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
				time.Sleep(d)
			}
		}
		payload := make([]byte, size)
		binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
		pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := pub.Publish(pctx, &paho.Publish{Topic: topic, QoS: qos, Payload: payload})
		pcancel()
		if err != nil {
			return res, fmt.Errorf("publish %d: %w", i, err)
		}
		res.Sent++
	}
	elapsed := time.Since(start)
	// Wait for stragglers: until everything arrived or 2 s pass quietly.
	for last, quiet := received.Load(), time.Now(); received.Load()-base < int64(res.Sent) && time.Since(quiet) < 2*time.Second; {
		time.Sleep(20 * time.Millisecond)
		if n := received.Load(); n != last {
			last, quiet = n, time.Now()
		}
	}
	mu.Lock()
	lat = slices.Clone(lat[base:])
	mu.Unlock()
	res.Received = len(lat)
	res.Lost = res.Sent - res.Received
	res.Throughput = float64(res.Received) / elapsed.Seconds()
	if len(lat) == 0 {
		return res, fmt.Errorf("nothing received")
	}
	slices.Sort(lat)
	q := func(p float64) int64 { return lat[min(len(lat)-1, int(float64(len(lat))*p))] / 1000 }
	res.P50us, res.P90us, res.P99us, res.Maxus = q(0.50), q(0.90), q(0.99), lat[len(lat)-1]/1000
	return res, nil
}
