package e2e

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestKeylessNodeOnRoutableAddressExits: by default gossip and the cluster
// port bind every interface, so a node without a cluster key refuses to
// start (exit 2) and says how to fix it.
func TestKeylessNodeOnRoutableAddressExits(t *testing.T) {
	t.Parallel()
	r := runCmd(t, cliTimeout, nil, "", brokerBin, "serve", "--node-id", "keyless", "--data-dir", t.TempDir(),
		"--mqtt-addr", freeAddr(t), "--http-addr", freeAddr(t))
	if r.ExitCode != 2 || !strings.Contains(r.Stderr, "--cluster-key-file") || !strings.Contains(r.Stderr, "--insecure-cluster") {
		t.Fatalf("want exit 2 naming --cluster-key-file and --insecure-cluster:\n%s", r)
	}
	// --insecure-cluster starts it, with a warning.
	b := startBrokerSpec(t, brokerSpec{ID: "insecure", Args: []string{"--gossip-addr", "0.0.0.0:0", "--insecure-cluster"}})
	if !strings.Contains(b.Output(), "unauthenticated (--insecure-cluster)") {
		t.Fatalf("no warning for --insecure-cluster:\n%s", b.Output())
	}
}

const e2eClusterKey = "e2e-cluster-key-0123456789abcdef"

// TestClusterKeyKeepsStrangersOut: a node with another key neither joins
// (gossip is encrypted) nor gets messages across; garbage on the gossip
// and cluster ports and a replayed cluster handshake change nothing.
func TestClusterKeyKeepsStrangersOut(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "cluster.key")
	writeFile(t, keyFile, e2eClusterKey+"\n")
	nodes := startClusterArgs(t, 2, "--cluster-key-file", keyFile)
	waitVoters(t, nodes, 2)
	nodes[0].mustPub(t, "-t", "sec/state", "-m", "genuine", "-r", "-q", "1")

	stranger := startBrokerSpec(t, brokerSpec{ID: "stranger", Args: []string{
		"--cluster-key", "another-key-0123456789abcdef", "--join", nodes[0].GossipAddr, "--bootstrap-expect", "3"}, LiveOnly: true})
	eventually(t, 20*time.Second, func() error {
		if !strings.Contains(nodes[0].Output(), "no installed keys could decrypt") {
			return fmt.Errorf("node1 has not seen the stranger's gossip yet")
		}
		return nil
	})

	// Garbage on the gossip port (UDP and TCP) and on the cluster port.
	junk := make([]byte, 1500)
	for i := range 50 {
		_, _ = rand.Read(junk)
		if u, err := net.Dial("udp", nodes[0].GossipAddr); err == nil {
			_, _ = u.Write(junk[:100+i*20])
			_ = u.Close()
		}
		for _, addr := range []string{nodes[0].GossipAddr, nodes[0].ClusterAddr} {
			if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				_, _ = c.Write(junk[:1+i*25])
				_ = c.Close()
			}
		}
	}

	// A genuine handshake (the test knows the key), then its replay.
	hello, auth, status := clusterHandshake(t, nodes[0].ClusterAddr, e2eClusterKey, nil, nil)
	if status != 0 {
		t.Fatalf("handshake with the right key: status %d", status)
	}
	if _, _, status := clusterHandshake(t, nodes[0].ClusterAddr, e2eClusterKey, hello, auth); status == 0 {
		t.Fatal("a replayed handshake was accepted")
	}
	if _, _, status := clusterHandshake(t, nodes[0].ClusterAddr, "wrong-key-0123456789abcdef", nil, nil); status == 0 {
		t.Fatal("a handshake with the wrong key was accepted")
	}
	nodes[0].eventuallyMetric(t, 2, "broker_cluster_handshake_failures_total", "direction", "in", "reason", "auth")

	for _, b := range nodes {
		v, err := b.raftView()
		if err != nil || len(v.Voters) != 2 {
			t.Fatalf("%s: voters %+v (%v); the stranger or the junk changed the configuration", b.ID, v.Voters, err)
		}
		if v, err := b.clusterView(); err != nil || v.AliveMembers != 2 {
			t.Fatalf("%s: %d alive members (%v)", b.ID, v.AliveMembers, err)
		}
	}
	s := nodes[1].sub(t, "-t", "sec/state", "-C", "1")
	assertMessages(t, s.wait(t), msg("sec/state", 0, true, "genuine"))
	// Nothing crosses between the cluster and the stranger.
	sub := nodes[1].sub(t, "-t", "sec/live", "-C", "1", "-W", "5")
	stranger.mustPub(t, "-t", "sec/live", "-m", "injected")
	nodes[0].mustPub(t, "-t", "sec/live", "-m", "genuine")
	assertMessages(t, sub.wait(t), msg("sec/live", 0, false, "genuine"))
}

// clusterHandshake runs the client side of the cluster-port handshake
// (cluster/mux.go) by hand. With replayHello and replayAuth it sends those
// recorded bytes instead of fresh ones. It returns what it sent and the
// server's final status (0: accepted), or 255 when the server closed first.
func clusterHandshake(t *testing.T, addr, key string, replayHello, replayAuth []byte) (hello, auth []byte, status byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	const proto = 1 // forwarding
	str := func(b []byte, s string) []byte { return append(binary.AppendUvarint(b, uint64(len(s))), s...) }
	nonceC := make([]byte, 16)
	_, _ = rand.Read(nonceC)
	hello = replayHello
	if hello == nil {
		body := append([]byte("MQHA"), 1, 1)
		body = append(body, nonceC...)
		body = str(body, "e2e-intruder")
		hello = append([]byte{proto}, binary.BigEndian.AppendUint16(nil, uint16(len(body)))...)
		hello = append(hello, body...)
	} else {
		copy(nonceC, hello[3+4+2:])
	}
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	read := func() []byte {
		var hdr [2]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return nil
		}
		b := make([]byte, binary.BigEndian.Uint16(hdr[:]))
		if _, err := io.ReadFull(c, b); err != nil {
			return nil
		}
		return b
	}
	ch := read()
	if len(ch) < 4+2+16+1 || !bytes.Equal(ch[:4], []byte("MQHA")) || ch[5] != 0 {
		return hello, nil, 255
	}
	nonceS := ch[6:22]
	r := bytes.NewReader(ch[22:])
	n, _ := binary.ReadUvarint(r)
	r.Seek(int64(n), io.SeekCurrent)
	sl, _ := binary.ReadUvarint(r)
	server := make([]byte, sl)
	_, _ = io.ReadFull(r, server)
	k := sha256.Sum256(append([]byte("mqtt-ha cluster-port\x00"), key...))
	m := hmac.New(sha256.New, k[:])
	in := append([]byte{'C', proto}, nonceC...)
	in = append(in, nonceS...)
	in = str(in, "e2e-intruder")
	in = str(in, string(server))
	m.Write(in)
	mac := m.Sum(nil)
	auth = replayAuth
	if auth == nil {
		body := binary.AppendUvarint(nil, uint64(len(mac)))
		body = append(body, mac...)
		auth = append(binary.BigEndian.AppendUint16(nil, uint16(len(body))), body...)
	}
	if _, err := c.Write(auth); err != nil {
		return hello, auth, 255
	}
	res := read()
	if len(res) != 1 {
		return hello, auth, 255
	}
	return hello, auth, res[0]
}

// TestAdminTokenOnRealNode: `broker cluster remove-node` against a node
// with --admin-token-file is refused (401) without the token and gets
// through with it, from the flag or from BROKER_ADMIN_TOKEN_FILE.
func TestAdminTokenOnRealNode(t *testing.T) {
	t.Parallel()
	tokFile := filepath.Join(t.TempDir(), "admin.token")
	writeFile(t, tokFile, "e2e-admin-token\n")
	b := startBrokerSpec(t, brokerSpec{ID: "admin", Args: []string{"--admin-token-file", tokFile}})
	r := runCmd(t, cliTimeout, nil, "", brokerBin, "cluster", "remove-node", "--http-addr", b.HTTPAddr, "ghost")
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, "Bearer") {
		t.Fatalf("remove-node without the token was not refused:\n%s", r)
	}
	b.eventuallyMetric(t, 1, "broker_admin_denied_total", "reason", "token")
	for _, tc := range []struct {
		env  []string
		args []string
	}{
		{nil, []string{"--admin-token-file", tokFile}},
		{[]string{"BROKER_ADMIN_TOKEN_FILE=" + tokFile}, nil},
	} {
		args := append([]string{"cluster", "remove-node", "--http-addr", b.HTTPAddr}, tc.args...)
		r := runCmd(t, cliTimeout, tc.env, "", brokerBin, append(args, "ghost")...)
		if strings.Contains(r.Stderr, "Bearer") || strings.Contains(r.Stderr, "loopback") {
			t.Fatalf("remove-node with the token was refused:\n%s", r)
		}
	}
	if n := b.mustMetric(t, "broker_admin_denied_total"); n != 1 {
		t.Fatalf("%v refusals counted, want 1", n)
	}
}
