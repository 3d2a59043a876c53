package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"
)

// joinRetryMin is the first retry delay while the node has never joined
// anyone; it doubles up to RejoinInterval.
const joinRetryMin = 200 * time.Millisecond

// resolveSeeds turns the join list into gossip addresses. Entries are
// "host:port", "[v6]:port", or a bare host (defaultPort). A name with several
// addresses (a headless Service) yields all of them, so a node joins every
// pod the name knows, not one at random. Names that fail to resolve are
// reported but do not hide the others.
func resolveSeeds(ctx context.Context, lookup func(context.Context, string) ([]string, error), seeds []string, defaultPort int) ([]string, error) {
	var out []string
	var errs []error
	seen := make(map[string]bool)
	add := func(a string) {
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	for _, s := range seeds {
		host, port := s, defaultPort
		if h, p, err := net.SplitHostPort(s); err == nil {
			pn, err := strconv.Atoi(p)
			if err != nil || pn <= 0 || pn > 65535 {
				errs = append(errs, fmt.Errorf("seed %q: bad port", s))
				continue
			}
			host, port = h, pn
		}
		if ip := net.ParseIP(host); ip != nil {
			add(net.JoinHostPort(ip.String(), strconv.Itoa(port)))
			continue
		}
		addrs, err := lookup(ctx, host)
		if err != nil {
			errs = append(errs, fmt.Errorf("seed %q: %w", s, err))
			continue
		}
		for _, a := range addrs {
			if ip := net.ParseIP(a); ip != nil {
				add(net.JoinHostPort(ip.String(), strconv.Itoa(port)))
			}
		}
	}
	return out, errors.Join(errs...)
}

// joinLoop joins the seeds, retrying with backoff until someone answers, and
// then keeps reconciling: every RejoinInterval it re-resolves the seeds and
// joins those that are not live members. That is how a node cut off by a
// partition (or one that every other node declared dead) finds its way back
// after memberlist has stopped gossiping to the dead, and how a DNS name
// that gains pods is followed.
func (n *Node) joinLoop() {
	defer n.wg.Done()
	if len(n.cfg.Join) == 0 {
		return
	}
	backoff := min(joinRetryMin, n.cfg.RejoinInterval)
	joined := false
	failures := 0
	for {
		targets, rerr := n.joinTargets()
		switch {
		case len(targets) > 0:
			k, err := n.ml.Join(targets)
			if k > 0 {
				if !joined || failures > 0 {
					n.log.Info("joined cluster", "via", k, "members", n.numAlive.Load())
				}
				joined, failures = true, 0
			} else {
				failures++
				if failures == 1 {
					n.log.Warn("cannot join seeds yet; retrying", "seeds", targets, "err", errors.Join(err, rerr))
				} else {
					n.log.Debug("cannot join seeds", "seeds", targets, "err", errors.Join(err, rerr), "failures", failures)
				}
			}
		case n.numAlive.Load() > 1:
			joined = true
		case rerr != nil:
			failures++
			if failures == 1 {
				n.log.Warn("cannot resolve seeds yet; retrying", "err", rerr)
			}
		}
		wait := n.cfg.RejoinInterval
		if !joined {
			wait = backoff
			backoff = min(2*backoff, n.cfg.RejoinInterval)
		}
		select {
		case <-n.stop:
			return
		case <-time.After(jitter(wait)):
		}
	}
}

// joinTargets resolves the seeds and removes ourselves and the addresses of
// live members.
func (n *Node) joinTargets() ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.TCPTimeout)
	defer cancel()
	port := n.gossipPort
	if port == 0 {
		port = DefaultGossipPort
	}
	addrs, err := resolveSeeds(ctx, n.cfg.LookupHost, n.cfg.Join, port)
	// Our own member records, not ml.Members(): memberlist mutates the
	// *Node values it returns without a lock readers could take.
	known := make(map[string]bool)
	n.mu.RLock()
	for _, m := range n.members {
		if m.state == "alive" {
			known[m.gossipAddr] = true
		}
	}
	n.mu.RUnlock()
	out := addrs[:0]
	for _, a := range addrs {
		if !known[a] && a != n.selfGossip {
			out = append(out, a)
		}
	}
	return out, err
}
