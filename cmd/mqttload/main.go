// Command mqttload is the project's load tool: publishers and subscribers
// (one topic per subscriber, or one topic for all with --fanout; clean or
// persistent sessions; retained publishes with --retain), possibly spread
// over several brokers or nodes, a paced total publish rate, and the
// publish-to-delivery latency of every message. Run it against a
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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

type result struct {
	Label       string `json:"label"`
	QoS         int    `json:"qos"`
	Rate        int    `json:"rate"`
	Publishers  int    `json:"publishers"`
	Subscribers int    `json:"subscribers"`
	Persistent  bool   `json:"persistent"`
	Inflight    int    `json:"inflight"`
	Fanout      bool   `json:"fanout,omitempty"`
	Retain      bool   `json:"retain,omitempty"`
	Sent        int    `json:"sent"`
	// Expected deliveries: Sent, or Sent x Subscribers with --fanout.
	Expected   int     `json:"expected"`
	Received   int     `json:"received"`
	Lost       int     `json:"lost"`
	Throughput float64 `json:"throughput_msgs_per_s"`
	P50us      int64   `json:"p50_us"`
	P90us      int64   `json:"p90_us"`
	P99us      int64   `json:"p99_us"`
	P999us     int64   `json:"p999_us"`
	Maxus      int64   `json:"max_us"`
	// Percentiles: latency (µs) at each of percentilePoints, for plots
	// (cmd/benchplot).
	Percentiles [][2]float64 `json:"percentiles,omitempty"`
}

// percentilePoints are spaced evenly in "nines" (log of 1/(1-p)), as
// HdrHistogram plots them.
var percentilePoints = []float64{0, 25, 50, 75, 90, 95, 97.5, 99, 99.5, 99.75, 99.9, 99.95, 99.975, 99.99, 100}

type options struct {
	pubAddrs, subAddrs []string
	rate               int
	duration           time.Duration
	qos                byte
	size               int
	publishers         int
	subscribers        int
	persistent         bool
	inflight           int
	fanout             bool // every subscriber on one topic, every publisher to it
	retain             bool // publishes are retained (cleared after the run)
}

func main() {
	pubAddr := flag.String("pub", "127.0.0.1:1883", "broker(s) the publishers connect to, comma-separated (round robin)")
	subAddr := flag.String("sub", "", "broker(s) the subscribers connect to, comma-separated (default: --pub)")
	rate := flag.Int("rate", 5000, "messages per second, all publishers together (0: as fast as possible)")
	duration := flag.Duration("duration", 10*time.Second, "how long to publish")
	qos := flag.Int("qos", 1, "QoS of publish and subscription (0, 1 or 2)")
	size := flag.Int("size", 64, "payload bytes (at least 16)")
	publishers := flag.Int("publishers", 1, "publisher connections; publisher i sends to subscriber i mod --subscribers")
	subscribers := flag.Int("subscribers", 1, "subscriber connections, one topic each (see --fanout)")
	fanout := flag.Bool("fanout", false, "every subscriber subscribes to one topic and every publisher publishes to it: each message is delivered --subscribers times")
	retain := flag.Bool("retain", false, "publish retained messages (each publisher overwrites its topic's retained value; cleared after the run)")
	persistent := flag.Bool("persistent", false, "subscribers use persistent sessions (clean start off, session expiry 300 s)")
	inflight := flag.Int("inflight", 1, "QoS 1/2 publishes each publisher keeps unacknowledged (1: wait for each acknowledgement)")
	connections := flag.Int("connections", 0, "connection storm instead of messages: open this many idle clean connections over --pub (see --connectors), report connects per second and, with --rss-pids, memory per connection")
	connectors := flag.Int("connectors", 1, "with --connections: connect from this many clients at once (1: one after another)")
	rssPids := flag.String("rss-pids", "", "with --connections: broker process ids, comma-separated, whose resident memory is measured before and after")
	settle := flag.Duration("settle", 3*time.Second, "with --connections: wait this long after the last CONNACK before measuring memory")
	hold := flag.Duration("hold", 0, "with --connections: keep the connections open this long after measuring (to profile the brokers)")
	failoverPid := flag.Int("failover-kill", 0, "failover time instead of messages: connect a persistent session to --pub, SIGKILL this process id (the node behind --pub), and measure until a retained QoS 1 publish is acknowledged and the session resumes on one of --sub (the survivors)")
	backlogN := flag.Int("backlog", 0, "resume time instead of messages: a persistent session subscribes on --sub and goes away, this many QoS 1 messages (--size bytes, --inflight at a time) are published to it on --pub, then it resumes on --sub: time to CONNACK and until the whole backlog arrived")
	label := flag.String("label", "", "name of this run in the output")
	asJSON := flag.Bool("json", false, "print the result as JSON")
	flag.Parse()
	if *subAddr == "" {
		*subAddr = *pubAddr
	}
	if *size < 16 || *qos < 0 || *qos > 2 || *rate < 0 || *publishers < 1 || *subscribers < 1 || *inflight < 1 {
		fmt.Fprintln(os.Stderr, "mqttload: --size must be at least 16, --qos 0-2, --rate >= 0, --publishers, --subscribers and --inflight >= 1")
		os.Exit(2)
	}
	if *failoverPid > 0 {
		r, err := failover(*pubAddr, strings.Split(*subAddr, ","), *failoverPid)
		r.Label = *label
		report(r, err, *asJSON, func() string {
			return fmt.Sprintf("%-24s retained QoS 1 write acknowledged after %.0f ms (%s), session resumed after %.0f ms (%s)",
				r.Label, r.RetainedMs, r.RetainedOn, r.SessionMs, r.SessionOn)
		})
		return
	}
	if *backlogN > 0 {
		r, err := backlog(*pubAddr, *subAddr, *backlogN, *size, *inflight)
		r.Label = *label
		report(r, err, *asJSON, func() string {
			return fmt.Sprintf("%-24s backlog of %d: CONNACK after %.1f ms, all %d after %.2f s (%.0f msg/s)",
				r.Label, r.Messages, r.ConnackMs, r.Received, r.DrainS, r.DrainMsgs)
		})
		return
	}
	if *connections > 0 {
		var pids []int
		for _, f := range strings.Split(*rssPids, ",") {
			if f == "" {
				continue
			}
			p, err := strconv.Atoi(f)
			if err != nil {
				fmt.Fprintln(os.Stderr, "mqttload: --rss-pids:", err)
				os.Exit(2)
			}
			pids = append(pids, p)
		}
		r, err := storm(strings.Split(*pubAddr, ","), *connections, *connectors, pids, *settle, *hold)
		r.Label = *label
		report(r, err, *asJSON, func() string {
			return fmt.Sprintf("%-24s %d connections (%d at once): %.0f connects/s, %.1f KB per idle connection (RSS %d -> %d KB)",
				r.Label, r.Connections, r.Connectors, r.ConnectsPS, r.KBPerConn, r.RSSBeforeKB, r.RSSAfterKB)
		})
		return
	}
	o := options{pubAddrs: strings.Split(*pubAddr, ","), subAddrs: strings.Split(*subAddr, ","), rate: *rate,
		duration: *duration, qos: byte(*qos), size: *size, publishers: *publishers, subscribers: *subscribers,
		persistent: *persistent, inflight: *inflight, fanout: *fanout, retain: *retain}
	r, err := run(o)
	r.Label = *label
	report(r, err, *asJSON, func() string {
		return fmt.Sprintf("%-24s qos%d rate %6d pubs %3d subs %3d: sent %7d recv %7d lost %5d  %8.0f deliveries/s  p50 %6dus p90 %6dus p99 %6dus p99.9 %6dus max %7dus",
			r.Label, r.QoS, r.Rate, r.Publishers, r.Subscribers, r.Sent, r.Received, r.Lost, r.Throughput, r.P50us, r.P90us, r.P99us, r.P999us, r.Maxus)
	})
}

// report ends a mode: its error (exit status 1), or its result as JSON or
// as the line text returns.
func report(r any, err error, asJSON bool, text func() string) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "mqttload:", err)
		os.Exit(1)
	}
	if asJSON {
		_ = json.NewEncoder(os.Stdout).Encode(r)
		return
	}
	fmt.Println(text())
}

func connect(addr, id string, persistent bool, onMsg func(*paho.Publish)) (*paho.Client, error) {
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
	cp := &paho.Connect{ClientID: id, KeepAlive: 30, CleanStart: true}
	if persistent {
		expiry := uint32(300)
		cp.Properties = &paho.ConnectProperties{SessionExpiryInterval: &expiry}
	}
	if _, err := c.Connect(ctx, cp); err != nil {
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	return c, nil
}

func run(o options) (result, error) {
	res := result{QoS: int(o.qos), Rate: o.rate, Publishers: o.publishers, Subscribers: o.subscribers, Persistent: o.persistent,
		Inflight: o.inflight, Fanout: o.fanout, Retain: o.retain}
	runID := time.Now().UnixNano()
	topic := func(i int) string {
		if o.fanout {
			i = 0
		}
		return fmt.Sprintf("mqttload/%d/%d", runID, i%o.subscribers)
	}
	// targets are the subscribers a publisher's messages reach.
	targets := func(p int) []int {
		if !o.fanout {
			return []int{p % o.subscribers}
		}
		all := make([]int, o.subscribers)
		for i := range all {
			all[i] = i
		}
		return all
	}
	probes := make([]atomic.Int64, o.subscribers) // probes each subscriber received
	var (
		mu       sync.Mutex
		lat      = make([]int64, 0, 1<<16)
		received atomic.Int64
		measure  atomic.Bool
	)
	onMsg := func(sub int, p *paho.Publish) {
		if len(p.Payload) < 9 {
			return
		}
		if p.Payload[8] == 1 { // probes are not measured
			probes[sub].Add(1)
			return
		}
		received.Add(1)
		if !measure.Load() {
			return
		}
		d := time.Now().UnixNano() - int64(binary.BigEndian.Uint64(p.Payload))
		mu.Lock()
		lat = append(lat, d)
		mu.Unlock()
	}
	for i := range o.subscribers {
		addr := o.subAddrs[i%len(o.subAddrs)]
		sub, err := connect(addr, fmt.Sprintf("mqttload-sub-%d-%d", runID, i), o.persistent,
			func(p *paho.Publish) { onMsg(i, p) })
		if err != nil {
			return res, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = sub.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic(i), QoS: o.qos}}})
		cancel()
		if err != nil {
			return res, fmt.Errorf("subscribe: %w", err)
		}
		defer func() {
			// A persistent session ends with session expiry 0 on DISCONNECT.
			d := &paho.Disconnect{}
			if o.persistent {
				zero := uint32(0)
				d.Properties = &paho.DisconnectProperties{SessionExpiryInterval: &zero}
			}
			_ = sub.Disconnect(d)
		}()
	}
	pubs := make([]*paho.Client, o.publishers)
	for i := range pubs {
		addr := o.pubAddrs[i%len(o.pubAddrs)]
		pub, err := connect(addr, fmt.Sprintf("mqttload-pub-%d-%d", runID, i), false, nil)
		if err != nil {
			return res, err
		}
		pubs[i] = pub
		defer func() { _ = pub.Disconnect(&paho.Disconnect{}) }()
	}
	// Wait until a probe from every publisher reached each of its
	// subscribers (routes may still be propagating); probes carry a
	// marker byte, are never retained and are not measured.
	probe := make([]byte, o.size)
	probe[8] = 1
	deadline := time.Now().Add(15 * time.Second)
	for i, pub := range pubs {
		ts := targets(i)
		before := make([]int64, len(ts))
		for k, t := range ts {
			before[k] = probes[t].Load()
		}
		arrived := func() bool {
			for k, t := range ts {
				if probes[t].Load() <= before[k] {
					return false
				}
			}
			return true
		}
		for !arrived() {
			if time.Now().After(deadline) {
				return res, fmt.Errorf("a probe message from publisher %d did not reach its %d subscriber(s) within 15s", i, len(ts))
			}
			pctx, pcancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, _ = pub.Publish(pctx, &paho.Publish{Topic: topic(i), QoS: o.qos, Payload: probe})
			pcancel()
			time.Sleep(20 * time.Millisecond)
		}
	}
	time.Sleep(200 * time.Millisecond) // let stray probes land before measuring
	base := received.Load()
	measure.Store(true)

	start := time.Now()
	var interval time.Duration
	if o.rate > 0 {
		interval = time.Second * time.Duration(o.publishers) / time.Duration(o.rate)
	}
	var sent atomic.Int64
	var failed atomic.Bool
	errs := make(chan error, o.publishers)
	var wg sync.WaitGroup
	for p, pub := range pubs {
		wg.Add(1)
		go func() {
			// At most o.inflight publishes of this connection wait for
			// their acknowledgement (QoS 0 ones return when written).
			window := make(chan struct{}, o.inflight)
			var pwg sync.WaitGroup
			defer func() { pwg.Wait(); wg.Done() }()
			offset := time.Duration(p) * interval / time.Duration(o.publishers)
			for i := 0; time.Since(start) < o.duration; i++ {
				if interval > 0 {
					if d := time.Until(start.Add(offset + time.Duration(i)*interval)); d > 0 {
						time.Sleep(d)
					}
				}
				payload := make([]byte, o.size)
				binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
				window <- struct{}{}
				if failed.Load() {
					return
				}
				pwg.Add(1)
				go func() {
					defer func() { <-window; pwg.Done() }()
					pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
					_, err := pub.Publish(pctx, &paho.Publish{Topic: topic(p), QoS: o.qos, Retain: o.retain, Payload: payload})
					pcancel()
					if err != nil {
						if failed.CompareAndSwap(false, true) {
							errs <- fmt.Errorf("publisher %d, publish %d: %w", p, i, err)
						}
						return
					}
					sent.Add(1)
				}()
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return res, err
	}
	res.Sent = int(sent.Load())
	res.Expected = res.Sent
	if o.fanout {
		res.Expected *= o.subscribers
	}
	elapsed := time.Since(start)
	if o.retain {
		defer clearRetained(pubs, topic)
	}
	// Wait for stragglers: until everything arrived or 2 s pass quietly.
	for last, quiet := received.Load(), time.Now(); received.Load()-base < int64(res.Expected) && time.Since(quiet) < 2*time.Second; {
		time.Sleep(20 * time.Millisecond)
		if n := received.Load(); n != last {
			last, quiet = n, time.Now()
		}
	}
	mu.Lock()
	lat = slices.Clone(lat)
	mu.Unlock()
	res.Received = len(lat)
	res.Lost = res.Expected - res.Received
	res.Throughput = float64(res.Received) / elapsed.Seconds()
	if len(lat) == 0 {
		return res, fmt.Errorf("nothing received")
	}
	slices.Sort(lat)
	q := func(p float64) int64 { return lat[min(len(lat)-1, int(float64(len(lat))*p))] / 1000 }
	res.P50us, res.P90us, res.P99us, res.P999us, res.Maxus = q(0.50), q(0.90), q(0.99), q(0.999), lat[len(lat)-1]/1000
	for _, p := range percentilePoints {
		us := lat[len(lat)-1] / 1000
		if p < 100 {
			us = q(p / 100)
		}
		res.Percentiles = append(res.Percentiles, [2]float64{p, float64(us)})
	}
	return res, nil
}

// clearRetained removes the retained values the run left (an empty
// retained publish on each publisher's topic), so that brokers shared by
// later runs do not keep them.
func clearRetained(pubs []*paho.Client, topic func(int) string) {
	for i, pub := range pubs {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _ = pub.Publish(ctx, &paho.Publish{Topic: topic(i), QoS: 1, Retain: true})
		cancel()
	}
}
