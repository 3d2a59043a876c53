package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// The connection storm: open n MQTT 5 clean connections (CONNECT, then
// wait for CONNACK), one after another or from several connectors at once
// (a wave of devices reconnecting after a node loss), report connects per
// second, and the resident memory the brokers' processes gained per
// connection while all of them are held open and idle.

type stormResult struct {
	Label       string  `json:"label"`
	Connections int     `json:"connections"`
	Connectors  int     `json:"connectors"`
	ConnectsPS  float64 `json:"connects_per_s"`
	RSSBeforeKB int64   `json:"rss_before_kb"`
	RSSAfterKB  int64   `json:"rss_after_kb"`
	KBPerConn   float64 `json:"kb_per_connection"`
}

func storm(addrs []string, n, connectors int, pids []int, settle, hold time.Duration) (stormResult, error) {
	connectors = max(1, min(connectors, n))
	res := stormResult{Connections: n, Connectors: connectors}
	before, err := rss(pids)
	if err != nil {
		return res, err
	}
	res.RSSBeforeKB = before
	conns := make([]net.Conn, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	runID := time.Now().UnixNano()
	start := time.Now()
	// Each connector takes the next index; connection i goes to broker
	// i mod len(addrs) and lands in conns[i].
	var next atomic.Int64
	errs := make(chan error, connectors)
	var wg sync.WaitGroup
	for range connectors {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := connectRaw(addrs[i%len(addrs)], fmt.Sprintf("storm-%d-%d", runID, i))
				if err != nil {
					errs <- fmt.Errorf("connection %d: %w", i, err)
					next.Store(int64(n)) // stop the others
					return
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return res, err
	}
	res.ConnectsPS = float64(n) / time.Since(start).Seconds()
	time.Sleep(settle) // let the brokers finish their per-connection work (ownership claims)
	after, err := rss(pids)
	if err != nil {
		return res, err
	}
	res.RSSAfterKB = after
	res.KBPerConn = float64(after-before) / float64(n)
	time.Sleep(hold)
	return res, nil
}

// connectRaw sends a clean MQTT 5 CONNECT and waits for a successful CONNACK.
func connectRaw(addr, id string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	cp := packets.NewControlPacket(packets.CONNECT)
	cn := cp.Content.(*packets.Connect)
	cn.ClientID, cn.CleanStart, cn.KeepAlive = id, true, 300
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := cp.WriteTo(c); err != nil {
		_ = c.Close()
		return nil, err
	}
	ack, err := packets.ReadPacket(c)
	if err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("CONNACK: %w", err)
	}
	if ca, ok := ack.Content.(*packets.Connack); !ok || ca.ReasonCode != 0 {
		_ = c.Close()
		return nil, fmt.Errorf("refused: %v", ack)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// rss is the summed VmRSS of the processes, in KB.
func rss(pids []int) (int64, error) {
	var total int64
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			return 0, fmt.Errorf("rss of %d: %w", p, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, err := strconv.ParseInt(f[1], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("rss of %d: %w", p, err)
				}
				total += kb
			}
		}
	}
	return total, nil
}
