package e2e

import (
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sysTopics subscribes to $SYS/# on host:port with mosquitto_sub for a
// few seconds (sys_interval 1 s on both brokers) and returns every topic
// with its last payload.
func sysTopics(t *testing.T, host, port string) map[string]string {
	t.Helper()
	r := runCmd(t, cliTimeout, nil, "", lookPath(t, "mosquitto_sub"),
		"-h", host, "-p", port, "-t", "$SYS/#", "-F", "%t\t%p", "-W", "3")
	out := map[string]string{}
	for _, line := range strings.Split(r.Stdout, "\n") {
		if topic, payload, ok := strings.Cut(line, "\t"); ok {
			out[topic] = payload
		}
	}
	if len(out) == 0 {
		t.Fatalf("no $SYS topics from %s:%s:\n%s", host, port, r)
	}
	return out
}

// notProvided are Mosquitto $SYS topics this broker does not publish:
// counters it does not keep (expired sessions, shared subscriptions apart
// from others, the byte size of stored messages). Documented in the
// README; anything else Mosquitto publishes must be here too.
var notProvided = []string{
	"$SYS/broker/clients/expired",
	"$SYS/broker/shared_subscriptions/count",
	"$SYS/broker/store/messages/bytes",
}

// TestSysTopicsMatchMosquitto: Debian's mosquitto and this broker, both
// with sys_interval 1, are read with the same mosquitto_sub: every $SYS
// topic Mosquitto publishes is published here too (but the documented
// few), with the same payload format.
func TestSysTopicsMatchMosquitto(t *testing.T) {
	t.Parallel()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		bin = "/usr/sbin/mosquitto" // Debian's, not on every PATH
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("mosquitto not found (%v): install Debian's mosquitto (make test does)", err)
	}
	addr := freeAddr(t)
	host, port, _ := net.SplitHostPort(addr)
	conf := t.TempDir() + "/mosquitto.conf"
	writeFile(t, conf, "listener "+port+" "+host+"\nallow_anonymous true\nsys_interval 1\n")
	mq := exec.Command(bin, "-c", conf)
	mq.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := mq.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mq.Process.Kill(); _ = mq.Wait() })
	eventually(t, 10*time.Second, func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	})
	theirs := sysTopics(t, host, port)

	b := startBroker(t, "--sys-interval", "1s")
	h, p, _ := net.SplitHostPort(b.MQTTAddr)
	ours := sysTopics(t, h, p)

	var missing []string
	for topic := range theirs {
		if _, ok := ours[topic]; !ok && !slices.Contains(notProvided, topic) {
			missing = append(missing, topic)
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Fatalf("$SYS topics Mosquitto publishes and this broker does not:\n%s", strings.Join(missing, "\n"))
	}
	formats := map[string]*regexp.Regexp{
		"$SYS/broker/uptime":                      regexp.MustCompile(`^[0-9]+ seconds$`),
		"$SYS/broker/clients/connected":           regexp.MustCompile(`^[0-9]+$`),
		"$SYS/broker/messages/received":           regexp.MustCompile(`^[0-9]+$`),
		"$SYS/broker/load/messages/received/1min": regexp.MustCompile(`^[0-9]+\.[0-9]{2}$`),
		"$SYS/broker/retained messages/count":     regexp.MustCompile(`^[0-9]+$`),
		"$SYS/broker/version":                     regexp.MustCompile(`version [^ ]+$`),
	}
	for topic, re := range formats {
		for name, got := range map[string]map[string]string{"mosquitto": theirs, "this broker": ours} {
			if !re.MatchString(got[topic]) {
				t.Errorf("%s: %s = %q, want %s", name, topic, got[topic], re)
			}
		}
	}
	for _, topic := range []string{"$SYS/cluster/self", "$SYS/cluster/nodes", "$SYS/cluster/leader", "$SYS/cluster/sessions"} {
		if ours[topic] == "" {
			t.Errorf("%s missing", topic)
		}
	}
}
