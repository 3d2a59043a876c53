package e2e

import (
	"net"
	"os"
	"os/exec"
	"os/user"
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

// notProvided are Mosquitto $SYS topics this broker does not publish
// (none today; anything listed here must be documented in the README).
var notProvided = []string{}

// startMosquitto runs Debian's mosquitto on a free loopback port with
// conf added to its configuration (the caller stops it early with the
// returned process, or leaves it to the cleanup).
func startMosquitto(t *testing.T, conf string) (host, port string, proc *exec.Cmd) {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		bin = "/usr/sbin/mosquitto" // Debian's, not on every PATH
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("mosquitto not found (%v): install Debian's mosquitto (make test does)", err)
	}
	addr := freeAddr(t)
	host, port, _ = net.SplitHostPort(addr)
	file := t.TempDir() + "/mosquitto.conf"
	// As root mosquitto drops to the user "mosquitto" unless told to stay
	// (it could not write its files into the test's directories).
	if u, err := user.Current(); err == nil {
		conf += "user " + u.Username + "\n"
	}
	writeFile(t, file, "listener "+port+" "+host+"\nallow_anonymous true\n"+conf)
	proc = exec.Command(bin, "-c", file)
	proc.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out lockedBuffer
	proc.Stdout, proc.Stderr = &out, &out
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = proc.Process.Kill()
		_ = proc.Wait()
		if t.Failed() {
			t.Logf("mosquitto's output:\n%s", out.String())
		}
	})
	eventually(t, 10*time.Second, func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	})
	return host, port, proc
}

// TestSysTopicsMatchMosquitto: Debian's mosquitto and this broker, both
// with sys_interval 1, are read with the same mosquitto_sub: every $SYS
// topic Mosquitto publishes is published here too (but the documented
// few), with the same payload format.
func TestSysTopicsMatchMosquitto(t *testing.T) {
	t.Parallel()
	host, port, _ := startMosquitto(t, "sys_interval 1\n")
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
