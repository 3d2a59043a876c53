package e2e

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session/state"
	"github.com/miekg/dns"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// The Kubernetes StatefulSet of deploy/statefulset, simulated with real
// processes: pod i is broker-<i> on its own loopback address 127.0.0.<20+i>,
// every pod listens on the same ports, and every pod gets the same
// arguments as the manifest gives (node id and advertise host from the
// pod's name, --join the headless Service's name). A DNS server run by the
// test plays the cluster DNS: the headless Service name resolves to every
// pod that exists (publishNotReadyAddresses), and each pod's own name to
// its address.

const (
	peersService = "broker-peers.test"
	podIPBase    = 20
)

// clusterDNS answers A queries from a table the test changes as pods come
// and go.
type clusterDNS struct {
	addr  string
	mu    sync.Mutex
	hosts map[string][]string // fully qualified, lower case -> IPv4s
}

func startClusterDNS(t *testing.T) *clusterDNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &clusterDNS{addr: pc.LocalAddr().String(), hosts: map[string][]string{}}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(d.serve)}
	go func() { _ = srv.ActivateAndServe() }()
	t.Cleanup(func() { _ = srv.Shutdown() })
	return d
}

func (d *clusterDNS) serve(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	for _, q := range r.Question {
		d.mu.Lock()
		ips, ok := d.hosts[strings.ToLower(q.Name)]
		d.mu.Unlock()
		if !ok {
			m.Rcode = dns.RcodeNameError
			continue
		}
		if q.Qtype != dns.TypeA {
			continue // no AAAA: an empty answer
		}
		for _, ip := range ips {
			m.Answer = append(m.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 1},
				A:   net.ParseIP(ip),
			})
		}
	}
	_ = w.WriteMsg(m)
}

func (d *clusterDNS) set(name string, ips ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.hosts[strings.ToLower(name)+"."] = slices.Clone(ips)
}

// statefulSet is the set of pods and the DNS that finds them.
type statefulSet struct {
	t     *testing.T
	dns   *clusterDNS
	ports podAddrs // the ports, shared by every pod
	args  []string // extra arguments for every pod
	pods  map[int]*Broker
}

func newStatefulSet(t *testing.T, args ...string) *statefulSet {
	ports := podAddrs{MQTTPort: portOf(freeAddr(t)), HTTPPort: portOf(freeAddr(t)),
		Gossip: portOf(freeAddr(t)), Cluster: portOf(freeAddr(t))}
	return &statefulSet{t: t, dns: startClusterDNS(t), ports: ports, args: args, pods: map[int]*Broker{}}
}

func podName(i int) string { return fmt.Sprintf("broker-%d", i) }
func podIP(i int) string   { return fmt.Sprintf("127.0.0.%d", podIPBase+i) }

// publish updates the headless Service: every existing pod, ready or not.
func (s *statefulSet) publish() {
	var ips []string
	for i := range 100 {
		if _, ok := s.pods[i]; ok {
			ips = append(ips, podIP(i))
		}
	}
	s.dns.set(peersService, ips...)
}

// create starts pods (in parallel, as podManagementPolicy Parallel does)
// and waits until every one is ready.
func (s *statefulSet) create(ordinals ...int) {
	s.t.Helper()
	for _, i := range ordinals {
		addrs := s.ports
		addrs.IP = podIP(i)
		name := podName(i)
		s.dns.set(name+"."+peersService, addrs.IP)
		b := &Broker{t: s.t, ID: name, DataDir: s.t.TempDir(), log: &lockedBuffer{}}
		b.spec = brokerSpec{Pod: &addrs, Args: append([]string{
			"--advertise-host", name + "." + peersService,
			"--join", peersService,
			"--dns-server", s.dns.addr,
			"--bootstrap-expect", "3",
		}, s.args...)}
		s.t.Cleanup(b.cleanup)
		b.pickPorts()
		s.pods[i] = b
	}
	s.publish()
	for _, i := range ordinals {
		if err := s.pods[i].launch(); err != nil {
			s.t.Fatal(err)
		}
	}
	for _, i := range ordinals {
		if err := s.pods[i].waitReady(); err != nil {
			s.t.Fatalf("%s: %v", podName(i), err)
		}
	}
}

// scaleDown stops the pods gracefully (SIGTERM, as the kubelet does) and
// deletes them from the Service.
func (s *statefulSet) scaleDown(ordinals ...int) {
	s.t.Helper()
	var wg sync.WaitGroup
	for _, i := range ordinals {
		wg.Go(func() { s.pods[i].Stop() })
	}
	wg.Wait()
	for _, i := range ordinals {
		delete(s.pods, i)
	}
	s.publish()
}

func (s *statefulSet) running() []*Broker {
	var out []*Broker
	for i := range 100 {
		if b, ok := s.pods[i]; ok && !b.exited() {
			out = append(out, b)
		}
	}
	return out
}

// voterIDs is the voters the node reports, sorted.
func voterIDs(b *Broker) ([]string, error) {
	v, err := b.raftView()
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, s := range v.Voters {
		ids = append(ids, s.ID)
	}
	slices.Sort(ids)
	return ids, nil
}

// TestStatefulSetScaleUpAndDown: 3 pods bootstrap through the headless
// Service's DNS name; scaled to 5 they become 5 voters on their own;
// scaled back to 3, the two departed voters leave the raft configuration
// with no operator command; the 3 survive a SIGKILL of one more pod
// (a retained QoS 1 write still commits) and keep what was written at
// every size.
func TestStatefulSetScaleUpAndDown(t *testing.T) {
	t.Parallel()
	ss := newStatefulSet(t, "--remove-left-after", "3s")
	ss.create(0, 1, 2)
	waitVoters(t, ss.running(), 3)
	ss.pods[0].mustPub(t, "-V", "mqttv5", "-q", "1", "-r", "-t", "sts/at3", "-m", "three")

	ss.create(3, 4)
	waitVoters(t, ss.running(), 5)
	ss.pods[4].mustPub(t, "-V", "mqttv5", "-q", "1", "-r", "-t", "sts/at5", "-m", "five")

	ss.scaleDown(3, 4)
	want := []string{"broker-0", "broker-1", "broker-2"}
	eventually(t, 30*time.Second, func() error {
		for _, b := range ss.running() {
			ids, err := voterIDs(b)
			if err != nil {
				return err
			}
			if !slices.Equal(ids, want) {
				return fmt.Errorf("%s: voters %v, want %v", b.ID, ids, want)
			}
		}
		return nil
	})

	// Three voters again: one more loss leaves a quorum of two.
	ss.pods[2].Kill()
	eventually(t, 30*time.Second, func() error {
		r := ss.pods[0].pub(t, "-V", "mqttv5", "-q", "1", "-r", "-t", "sts/after", "-m", "two")
		if r.ExitCode != 0 || strings.Contains(r.Stderr, "failed") {
			return fmt.Errorf("retained QoS 1 write with two of three voters: %s", r)
		}
		return nil
	})
	wantMsgs := []message{msg("sts/after", 0, true, "two"), msg("sts/at3", 0, true, "three"), msg("sts/at5", 0, true, "five")}
	for _, b := range ss.running() {
		eventually(t, 10*time.Second, func() error {
			_, got := b.sub(t, "-t", "sts/#", "-C", "3", "-W", "3").result(t)
			if len(got) != len(wantMsgs) {
				return fmt.Errorf("%s serves %v, want %v", b.ID, got, wantMsgs)
			}
			for _, m := range wantMsgs {
				if !slices.Contains(got, m) {
					return fmt.Errorf("%s serves %v, want %v", b.ID, got, wantMsgs)
				}
			}
			return nil
		})
	}
}

// serviceClient is a client of the Service `mosquitto`: it connects to any
// running pod and, when its connection ends, to another one, resuming its
// persistent session (a client's reconnect loop).
type serviceClient struct {
	t    *testing.T
	ss   *statefulSet
	opts testutil.ClientOptions
	mu   sync.Mutex
	c    *testutil.Client
	next int
}

// connect connects to the next running pod that accepts it.
func (s *serviceClient) connect() *testutil.Client {
	s.t.Helper()
	var c *testutil.Client
	eventually(s.t, 30*time.Second, func() error {
		pods := s.ss.running()
		if len(pods) == 0 {
			return fmt.Errorf("no pod running")
		}
		s.next++
		b := pods[s.next%len(pods)]
		var err error
		c, err = testutil.TryConnect(b.MQTTAddr, s.opts)
		return err
	})
	s.opts.CleanStart = false // later connections resume the session
	s.mu.Lock()
	s.c = c
	s.mu.Unlock()
	return c
}

func (s *serviceClient) current() *testutil.Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c
}

// TestStatefulSetRollingRestart: `kubectl rollout restart` of the
// StatefulSet: pods stop gracefully one at a time in reverse ordinal
// order, each waiting for the previous one to be ready again, while a
// persistent QoS 1 publisher and a persistent QoS 1 subscriber with a
// retained will, both clients of the Service, keep working and reconnect
// wherever a pod goes away. Every acknowledged message arrives, in order;
// no will fires (the clients come back: DESIGN.md guarantee 4).
func TestStatefulSetRollingRestart(t *testing.T) {
	t.Parallel()
	ss := newStatefulSet(t)
	ss.create(0, 1, 2)
	waitVoters(t, ss.running(), 3)
	const topic, willTopic = "roll/stream", "roll/will"
	will := func(id string) *paho.WillMessage {
		return &paho.WillMessage{Topic: willTopic, QoS: 1, Retain: true, Payload: []byte("offline " + id)}
	}
	st := state.NewInMemory()
	sub := &serviceClient{t: t, ss: ss, opts: testutil.ClientOptions{ID: "roll-sub", CleanStart: true,
		SessionExpiry: 3600, Session: st, Buffer: 100000, Will: will("roll-sub")}}
	sub.connect().Sub(t, 1, topic)
	var res streamResult
	subDone := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		defer close(subDone)
		for c := sub.current(); ; c = sub.connect() {
			collect(c, &res)
			select {
			case <-stop:
				return
			default:
			}
		}
	}()

	pub := &serviceClient{t: t, ss: ss, opts: testutil.ClientOptions{ID: "roll-pub", CleanStart: true,
		SessionExpiry: 3600, Will: will("roll-pub")}}
	pc := pub.connect()
	var acked []bool
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			err := pc.TryPub(topic, 1, false, []byte(strconv.Itoa(i)))
			acked = append(acked, err == nil)
			if err != nil {
				select {
				case <-pc.Done():
					pc = pub.connect()
				default:
				}
			}
		}
	}()

	// The rollout: broker-2, then 1, then 0, each ready before the next.
	for i := 2; i >= 0; i-- {
		eventually(t, 30*time.Second, func() error {
			if n := len(res.snapshot()); n < 200*(3-i) {
				return fmt.Errorf("the subscriber has %d messages", n)
			}
			return nil
		})
		ss.pods[i].Stop()
		ss.pods[i].Restart()
		waitVoters(t, ss.running(), 3)
	}
	close(stop)
	<-pubDone
	eventually(t, 2*time.Minute, func() error { return allReceived(acked, res.snapshot()) })
	got := res.snapshot()
	dups := checkStream(t, acked, got)
	refused := 0
	for _, ok := range acked {
		if !ok {
			refused++
		}
	}
	t.Logf("%d published, %d refused, %d receipts, %d duplicates", len(acked), refused, len(got), dups)
	// No will fired: nothing was retained on the will topic.
	_, wills := ss.pods[0].sub(t, "-t", willTopic, "-W", "2").result(t)
	if len(wills) > 0 {
		t.Fatalf("a will fired during the rolling restart: %v", wills)
	}
	sub.current().Close()
	<-subDone
}

// TestStatefulSetPodWithEmptyVolume: a pod rescheduled with an empty
// volume comes back under its old name and address: it stays the same
// voter (not a second one), grants no votes until it has caught up with
// the leader, then serves everything and counts for the quorum again.
func TestStatefulSetPodWithEmptyVolume(t *testing.T) {
	t.Parallel()
	ss := newStatefulSet(t)
	ss.create(0, 1, 2)
	waitVoters(t, ss.running(), 3)
	const n = 20
	for i := range n {
		ss.pods[0].mustPub(t, "-V", "mqttv5", "-q", "1", "-r", "-t", fmt.Sprintf("ev/%d", i), "-m", "v")
	}
	b := ss.pods[1]
	b.Kill()
	if err := os.RemoveAll(b.DataDir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(b.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	b.Restart()
	waitVoters(t, ss.running(), 3)
	eventually(t, 30*time.Second, func() error {
		if !strings.Contains(b.Output(), "granting votes from now on") {
			return fmt.Errorf("%s has not said it caught up and votes again", b.ID)
		}
		return nil
	})
	_, got := b.sub(t, "-t", "ev/#", "-C", strconv.Itoa(n), "-W", "5").result(t)
	if len(got) != n {
		t.Fatalf("%s serves %d retained values after catching up, want %d", b.ID, len(got), n)
	}
	// Its vote counts again: without broker-0, it and broker-2 elect a
	// leader and take writes.
	ss.pods[0].Kill()
	eventually(t, 30*time.Second, func() error {
		r := b.pub(t, "-V", "mqttv5", "-q", "1", "-r", "-t", "ev/after", "-m", "two")
		if r.ExitCode != 0 || strings.Contains(r.Stderr, "failed") {
			return fmt.Errorf("retained QoS 1 write on the two survivors: %s", r)
		}
		return nil
	})
}
