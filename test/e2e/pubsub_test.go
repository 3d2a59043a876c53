package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/eclipse/paho.golang/packets"
)

var mqttVersions = []string{"mqttv311", "mqttv5"}

// TestPubSubRoundTrip: mosquitto_pub -> broker -> mosquitto_sub for every
// pairing of MQTT 3.1.1 and 5 publisher and subscriber at QoS 0, 1 and 2.
// The subscriber sees the exact topic, payload, QoS and a clear retain flag.
func TestPubSubRoundTrip(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	for _, subV := range mqttVersions {
		for _, pubV := range mqttVersions {
			for qos := range 3 {
				t.Run(fmt.Sprintf("sub_%s/pub_%s/qos%d", subV, pubV, qos), func(t *testing.T) {
					t.Parallel()
					topic := fmt.Sprintf("e2e/rt/%s/%s/%d", subV, pubV, qos)
					payload := fmt.Sprintf("hello from %s at qos %d: ünïcödé ✓", pubV, qos)
					q := strconv.Itoa(qos)
					s := b.sub(t, "-V", subV, "-q", q, "-t", topic, "-C", "1")
					b.mustPub(t, "-V", pubV, "-q", q, "-t", topic, "-m", payload)
					assertMessages(t, s.wait(t), msg(topic, qos, false, payload))
				})
			}
		}
	}
	// The granted QoS caps delivery: a QoS 0 subscriber gets a QoS 2
	// publish at QoS 0, a QoS 1 subscriber at QoS 1.
	t.Run("downgrade", func(t *testing.T) {
		t.Parallel()
		topic := "e2e/rt/downgrade"
		s0 := b.sub(t, "-q", "0", "-t", topic, "-C", "1")
		s1 := b.sub(t, "-V", "mqttv5", "-q", "1", "-t", topic, "-C", "1")
		b.mustPub(t, "-q", "2", "-t", topic, "-m", "qos2 publish")
		assertMessages(t, s0.wait(t), msg(topic, 0, false, "qos2 publish"))
		assertMessages(t, s1.wait(t), msg(topic, 1, false, "qos2 publish"))
	})
	// A 200 KB binary payload arrives byte for byte.
	t.Run("large_binary", func(t *testing.T) {
		t.Parallel()
		payload := make([]byte, 200<<10)
		for i := range payload {
			payload[i] = byte(i * 7)
		}
		file := t.TempDir() + "/payload.bin"
		writeFile(t, file, string(payload))
		topic := "e2e/rt/large"
		s := b.sub(t, "-q", "1", "-t", topic, "-C", "1")
		b.mustPub(t, "-q", "1", "-t", topic, "-f", file)
		got := s.wait(t)
		if len(got) != 1 || got[0].Payload != string(payload) {
			lens := make([]int, len(got))
			for i, m := range got {
				lens[i] = len(m.Payload)
			}
			t.Fatalf("want one %d-byte payload identical to the published one, got %d message(s) of lengths %v", len(payload), len(got), lens)
		}
	})
}

// TestWildcards: '+' matches exactly one level, '#' the parent and every
// level below, and neither a leading '#' nor a leading '+' matches $SYS
// topics, which the broker does publish.
func TestWildcards(t *testing.T) {
	t.Parallel()
	b := startBroker(t) // its own node: the '#' subscriber sees everything

	// Positive control: $SYS exists (else the checks below prove nothing).
	sys := b.sub(t, "-t", "$SYS/#", "-C", "1", "-W", "15")
	if got := sys.wait(t); !strings.HasPrefix(got[0].Topic, "$SYS/") {
		t.Fatalf("subscriber to $SYS/# got %v, want a $SYS/ topic", got)
	}

	plus := b.sub(t, "-t", "e2e/wc/+/temp", "-q", "1", "-C", "2")
	hash := b.sub(t, "-t", "e2e/wc/#", "-q", "1", "-C", "4")
	all := b.sub(t, "-V", "mqttv5", "-t", "#", "-q", "1", "-C", "5")
	// '+' at the first level must not match "$SYS" either; the marker
	// topic lets it exit: anything before the marker is a wrong match.
	plusSys := b.sub(t, "-t", "+/broker/#", "-t", "+/+/z/temp", "-q", "1", "-C", "1")

	for _, topic := range []string{"e2e/wc/a/temp", "e2e/wc/a/b/temp", "e2e/wc", "e2e/wcx/a/temp", "e2e/wc/z/temp"} {
		b.mustPub(t, "-q", "1", "-t", topic, "-m", "on "+topic)
	}

	m := func(topic string) message { return msg(topic, 1, false, "on "+topic) }
	assertMessages(t, plus.wait(t), m("e2e/wc/a/temp"), m("e2e/wc/z/temp"))
	assertMessages(t, hash.wait(t), m("e2e/wc/a/temp"), m("e2e/wc/a/b/temp"), m("e2e/wc"), m("e2e/wc/z/temp"))
	assertMessages(t, all.wait(t), m("e2e/wc/a/temp"), m("e2e/wc/a/b/temp"), m("e2e/wc"), m("e2e/wcx/a/temp"), m("e2e/wc/z/temp"))
	assertMessages(t, plusSys.wait(t), m("e2e/wc/z/temp"))
}

// TestRetained: a retained message reaches late subscribers (the latest
// value, retain flag set, over wildcards and both protocol versions),
// survives a graceful restart, and is gone for good after `-r -n`.
func TestRetained(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	topic := "e2e/retained/car/state"

	b.mustPub(t, "-r", "-q", "1", "-t", topic, "-m", "parked")
	b.mustPub(t, "-r", "-q", "1", "-t", topic, "-m", "charging")

	lateSub := func(t *testing.T, args ...string) []message {
		t.Helper()
		return b.sub(t, append(args, "-C", "1")...).wait(t)
	}
	t.Run("late_subscriber", func(t *testing.T) {
		assertMessages(t, lateSub(t, "-q", "1", "-t", topic), msg(topic, 1, true, "charging"))
		assertMessages(t, lateSub(t, "-V", "mqttv5", "-q", "0", "-t", "e2e/retained/#"), msg(topic, 0, true, "charging"))
		assertMessages(t, lateSub(t, "-q", "2", "-t", "e2e/+/car/state"), msg(topic, 1, true, "charging"))
	})
	t.Run("live_subscriber_sees_retain_clear", func(t *testing.T) {
		// A message delivered because it was published (not because of a
		// subscription) has the retain flag clear for MQTT 3.1.1.
		s := b.sub(t, "-q", "1", "-t", "e2e/retained/live", "-C", "1")
		b.mustPub(t, "-r", "-q", "1", "-t", "e2e/retained/live", "-m", "now")
		assertMessages(t, s.wait(t), msg("e2e/retained/live", 1, false, "now"))
		b.mustPub(t, "-r", "-n", "-t", "e2e/retained/live")
	})
	t.Run("survives_restart", func(t *testing.T) {
		b.Stop()
		b.Restart()
		assertMessages(t, lateSub(t, "-q", "1", "-t", topic), msg(topic, 1, true, "charging"))
	})
	t.Run("clear", func(t *testing.T) {
		b.mustPub(t, "-r", "-n", "-q", "1", "-t", topic)
		assertNoRetained(t, b, topic)
	})
	t.Run("clear_survives_restart", func(t *testing.T) {
		b.Stop()
		b.Restart()
		assertNoRetained(t, b, topic)
	})
}

// assertNoRetained subscribes to topic and a marker topic, publishes the
// marker, and fails if anything but the marker arrives first: a retained
// message would be delivered at subscription time, before the marker.
func assertNoRetained(t *testing.T, b *Broker, topic string) {
	t.Helper()
	marker := "e2e/marker/" + strings.ReplaceAll(t.Name(), "/", "_")
	s := b.sub(t, "-q", "1", "-t", topic, "-t", marker, "-C", "1")
	b.mustPub(t, "-q", "1", "-t", marker, "-m", "marker")
	assertMessages(t, s.wait(t), msg(marker, 1, false, "marker"))
}

// TestRetainedSurvivesKill: a retained message acknowledged at QoS 1 is
// still there after the node is killed with SIGKILL and restarted.
func TestRetainedSurvivesKill(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	topic := "teslamate/cars/1/state"
	b.mustPub(t, "-r", "-q", "1", "-t", topic, "-m", "online")
	b.Kill()
	b.Restart()
	s := b.sub(t, "-q", "1", "-t", topic, "-C", "1")
	assertMessages(t, s.wait(t), msg(topic, 1, true, "online"))
}

// TestWill: a client whose connection ends without DISCONNECT has its will
// published; one that sends DISCONNECT does not.
func TestWill(t *testing.T) {
	t.Parallel()
	b := startBroker(t)

	t.Run("raw_v5_socket_closed", func(t *testing.T) {
		t.Parallel()
		topic := "e2e/will/raw"
		watcher := b.sub(t, "-V", "mqttv5", "-q", "1", "-t", topic, "-C", "1")
		conn := rawConnectV5(t, b.MQTTAddr, willConnect("e2e-will-raw", topic, "raw client gone"))
		if err := conn.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		assertMessages(t, watcher.wait(t), msg(topic, 1, false, "raw client gone"))
	})

	t.Run("mosquitto_sub_killed", func(t *testing.T) {
		t.Parallel()
		topic := "e2e/will/cli"
		watcher := b.sub(t, "-q", "1", "-t", topic, "-C", "1")
		dying := b.sub(t, "-i", "e2e-will-cli", "-t", "e2e/will/unused",
			"--will-topic", topic, "--will-payload", "cli client gone", "--will-qos", "1")
		dying.Kill(t) // SIGKILL: the kernel closes the socket, no DISCONNECT
		assertMessages(t, watcher.wait(t), msg(topic, 1, false, "cli client gone"))
	})

	t.Run("clean_disconnect_no_will", func(t *testing.T) {
		t.Parallel()
		topic := "e2e/will/clean"
		marker := "e2e/will/clean-marker"
		watcher := b.sub(t, "-q", "1", "-t", topic, "-t", marker, "-C", "1")
		conn := rawConnectV5(t, b.MQTTAddr, willConnect("e2e-will-clean", topic, "must not be sent"))
		d := packets.NewControlPacket(packets.DISCONNECT)
		if _, err := d.WriteTo(conn); err != nil {
			t.Fatalf("write DISCONNECT: %v", err)
		}
		if _, err := readUntilClosed(conn, msgTimeout); err != nil {
			t.Fatalf("after DISCONNECT: %v", err)
		}
		b.mustPub(t, "-q", "1", "-t", marker, "-m", "marker")
		assertMessages(t, watcher.wait(t), msg(marker, 1, false, "marker"))
	})
}

func willConnect(clientID, topic, payload string) *packets.Connect {
	cp := packets.NewControlPacket(packets.CONNECT).Content.(*packets.Connect)
	cp.ClientID = clientID
	cp.CleanStart = true
	cp.KeepAlive = 30
	cp.WillFlag = true
	cp.WillTopic = topic
	cp.WillMessage = []byte(payload)
	cp.WillQOS = 1
	cp.WillProperties = &packets.Properties{}
	return cp
}

// TestPersistentSession: a subscriber with clean session off (MQTT 3.1.1
// -c, MQTT 5 -c -x) leaves; QoS 1 messages published meanwhile are all
// delivered, in order, when it reconnects with the same client id, through
// the subscription the session kept (the reconnect subscribes to an
// unrelated topic only).
func TestPersistentSession(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	for _, v := range mqttVersions {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			id := "e2e-persist-" + v
			topic := "e2e/persist/" + v
			session := []string{"-V", v, "-c", "-i", id, "-q", "1"}
			if v == "mqttv5" {
				session = append(session, "-x", "3600")
			}
			sessionQueues(t, b, session, topic, 50, nil)
		})
	}
}

// TestPersistentSessionSurvivesRestart: the offline session, its
// subscription and its queued QoS 1 messages survive a graceful restart.
func TestPersistentSessionSurvivesRestart(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	session := []string{"-c", "-i", "e2e-persist-restart", "-q", "1"}
	sessionQueues(t, b, session, "e2e/persist/restart", 10, func() {
		b.Stop()
		b.Restart()
	})
}

// sessionQueues subscribes with session flags and exits, publishes n QoS 1
// messages, runs between (if any), and reconnects to collect them.
func sessionQueues(t *testing.T, b *Broker, session []string, topic string, n int, between func()) {
	t.Helper()
	r := runCmd(t, cliTimeout, nil, "", lookPath(t, "mosquitto_sub"),
		append(append(append([]string{}, b.hostArgs()...), session...), "-t", topic, "-E")...)
	mustSucceed(t, r)

	var lines []string
	var want []message
	for i := range n {
		p := fmt.Sprintf("queued-%03d", i)
		lines = append(lines, p)
		want = append(want, msg(topic, 1, false, p))
	}
	// One connection publishes them all in order (-l: a message per line).
	mustSucceed(t, mosquittoPub(t, strings.Join(lines, "\n")+"\n",
		append(b.hostArgs(), "-q", "1", "-t", topic, "-l")...))
	if between != nil {
		between()
	}

	// Queued messages may all arrive before the SUBACK: do not wait for it.
	s := launchSub(t, b.hostArgs(), append(append([]string{}, session...), "-t", topic+"/unrelated", "-C", strconv.Itoa(n), "-W", "10")...)
	got := s.wait(t)
	if !sameSet(got, want) {
		t.Fatalf("queued messages after reconnect:\n  got  %v\n  want %v", got, want)
	}
	t.Run("order", func(t *testing.T) {
		// The set is right (checked above); a failure here is order only.
		for i := range got {
			if got[i] != want[i] {
				order := make([]string, len(got))
				for j, m := range got {
					order[j] = strings.TrimPrefix(m.Payload, "queued-")
				}
				t.Fatalf("all %d queued messages arrived, but out of publish order (first difference at #%d): %s",
					len(got), i, strings.Join(order, " "))
			}
		}
	})
}

func sameSet(a, b []message) bool {
	if len(a) != len(b) {
		return false
	}
	count := map[message]int{}
	for _, m := range a {
		count[m]++
	}
	for _, m := range b {
		count[m]--
	}
	for _, c := range count {
		if c != 0 {
			return false
		}
	}
	return true
}
