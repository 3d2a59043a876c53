package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// brokerBin is the broker binary TestMain builds once for the package,
// in binDir; raceBin says it is a race build.
var (
	brokerBin string
	binDir    string
	raceBin   bool
)

// plainBin returns a broker binary without the race detector, built on
// first use when brokerBin is a race build. Tests that move hundreds of
// megabytes use it: the race detector's shadow memory work grows with
// the bolt file it maps, and a race build moved 16 MB through a
// three-node log in minutes where a plain one takes a second.
func plainBin(t testing.TB) string {
	t.Helper()
	if !raceBin {
		return brokerBin
	}
	plainOnce.Do(func() {
		bin := filepath.Join(binDir, "broker-plain")
		out, err := exec.Command("go", "build", "-o", bin, "github.com/mqtt-ha/broker/cmd/broker").CombinedOutput()
		if err != nil {
			plainErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		plainPath = bin
	})
	if plainErr != nil {
		t.Fatal(plainErr)
	}
	return plainPath
}

var (
	plainOnce sync.Once
	plainPath string
	plainErr  error
)

const (
	readyTimeout = 30 * time.Second // process start to /readyz 200
	stopTimeout  = 20 * time.Second // SIGTERM to exit
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "broker-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: temp dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if bin := os.Getenv("E2E_BROKER_BIN"); bin != "" {
		// A prebuilt binary (a release build, or another implementation of
		// the command-line contract).
		brokerBin = bin
		return m.Run()
	}
	brokerBin, binDir = filepath.Join(dir, "broker"), dir
	args := []string{"build", "-o", brokerBin}
	if os.Getenv("E2E_RACE") == "1" {
		args = append(args, "-race", "-gcflags=all=-d=checkptr=0") // see replication/logstore.go
		raceBin = true
	}
	args = append(args, "github.com/mqtt-ha/broker/cmd/broker")
	build := exec.Command("go", args...)
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go %s: %v\n%s", strings.Join(args, " "), err, out)
		return 1
	}
	return m.Run()
}

// ---------------------------------------------------------------------------
// Waiting

// errStop, returned by a poll condition, ends the poll at once with its
// wrapped error (the condition can never become true, e.g. the process died).
type errStop struct{ err error }

func (e errStop) Error() string { return e.err.Error() }
func (e errStop) Unwrap() error { return e.err }

func stopPolling(err error) error { return errStop{err} }

// poll calls cond every 25ms until it returns nil, returns a stopPolling
// error, or timeout passes; it returns the last error.
func poll(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		var stop errStop
		if errors.As(err, &stop) {
			return stop.err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not true after %s: %w", timeout, err)
		}
		<-tick.C
	}
}

// eventually is the one helper every test waits with: it fails the test when
// cond has not returned nil within timeout, quoting cond's last error.
func eventually(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	if err := poll(timeout, cond); err != nil {
		t.Fatal(err)
	}
}

// ---------------------------------------------------------------------------
// Ports

// freeAddr returns a 127.0.0.1 address whose port was free a moment ago. A
// race with another process is possible; startBroker retries on "address
// already in use" for the ports it picked itself.
func freeAddr(t testing.TB) string {
	t.Helper()
	addr, err := testutil.FreeAddr()
	if err != nil {
		t.Fatalf("pick a free port: %v", err)
	}
	return addr
}

func portOf(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		panic(fmt.Sprintf("portOf(%q): %v", addr, err))
	}
	return p
}

// ---------------------------------------------------------------------------
// The broker process

// lockedBuffer collects a process's stdout and stderr.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// brokerSpec says how to start a node beyond the harness's defaults.
type brokerSpec struct {
	// Bin is the broker binary; default brokerBin.
	Bin string
	// ID is the --node-id; default "e2e-<test name>". Set it when a test
	// runs several nodes.
	ID string
	// Args are appended after the harness's flags.
	Args []string
	// Env entries (KEY=value) are added to the environment, which never
	// inherits BROKER_* variables from the test's own environment.
	Env []string
	// MQTTAddr, when set, is an MQTT listener the test configured itself
	// (for example in a --config file): the harness passes no --mqtt-addr.
	MQTTAddr string
	// LiveOnly: start waits for /healthz, not /readyz (a node that is
	// expected never to become ready, such as one that cannot join).
	LiveOnly bool
	// Pod, when set, places the node like a StatefulSet pod: on its own
	// loopback address, with the same ports as every other pod
	// (statefulset_test.go). The advertise host comes from Args.
	Pod *podAddrs
}

// podAddrs is a pod's IP and the ports every pod of the set listens on.
type podAddrs struct {
	IP                                  string
	MQTTPort, HTTPPort, Gossip, Cluster string
}

// Broker is one broker node running as a child process.
type Broker struct {
	t    testing.TB
	spec brokerSpec

	ID          string
	DataDir     string
	MQTTAddr    string
	HTTPAddr    string
	GossipAddr  string
	ClusterAddr string

	log *lockedBuffer // every start's output, in order

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{} // closed when the current process has exited
	exitCode int
	starts   int
}

// startBroker starts a node with extra flags appended to the harness's and
// waits until /readyz answers 200.
func startBroker(t testing.TB, extraArgs ...string) *Broker {
	t.Helper()
	return startBrokerSpec(t, brokerSpec{Args: extraArgs})
}

func startBrokerSpec(t testing.TB, spec brokerSpec) *Broker {
	t.Helper()
	id := spec.ID
	if id == "" {
		id = "e2e-" + strings.NewReplacer("/", "-", " ", "_", "#", "", "+", "").Replace(t.Name())
	}
	b := &Broker{
		t:       t,
		spec:    spec,
		ID:      id,
		DataDir: t.TempDir(),
		log:     &lockedBuffer{},
	}
	t.Cleanup(b.cleanup)
	const attempts = 3
	for i := 1; ; i++ {
		b.pickPorts()
		err := b.launch()
		if err == nil {
			err = b.waitReady()
		}
		if err == nil {
			return b
		}
		if i < attempts && b.exited() && strings.Contains(b.log.String(), "address already in use") {
			t.Logf("broker %s: port taken by another process, retrying with new ports (%v)", b.ID, err)
			continue
		}
		t.Fatalf("start broker %s: %v", b.ID, err)
	}
}

func (b *Broker) pickPorts() {
	if p := b.spec.Pod; p != nil {
		b.MQTTAddr, b.HTTPAddr = net.JoinHostPort(p.IP, p.MQTTPort), net.JoinHostPort(p.IP, p.HTTPPort)
		b.GossipAddr, b.ClusterAddr = net.JoinHostPort(p.IP, p.Gossip), net.JoinHostPort(p.IP, p.Cluster)
		return
	}
	b.MQTTAddr = b.spec.MQTTAddr
	if b.MQTTAddr == "" {
		b.MQTTAddr = freeAddr(b.t)
	}
	b.HTTPAddr = freeAddr(b.t)
	b.GossipAddr = freeAddr(b.t)
	b.ClusterAddr = freeAddr(b.t)
}

func (b *Broker) args() []string {
	level := os.Getenv("E2E_LOG_LEVEL")
	if level == "" {
		level = "info"
	}
	args := []string{"serve",
		"--node-id", b.ID,
		"--data-dir", b.DataDir,
		"--http-addr", b.HTTPAddr,
		"--gossip-addr", b.GossipAddr,
		"--cluster-addr", b.ClusterAddr,
		"--advertise-host", "127.0.0.1",
		"--log-format", "json",
		"--log-level", level,
	}
	if b.spec.MQTTAddr == "" {
		args = append(args, "--mqtt-addr", b.MQTTAddr)
	}
	return append(args, b.spec.Args...)
}

// brokerEnv is the test's environment without BROKER_* variables, plus extra.
func brokerEnv(extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BROKER_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

func (b *Broker) launch() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd != nil && !b.exitedLocked() {
		return fmt.Errorf("broker %s is already running", b.ID)
	}
	b.starts++
	bin := brokerBin
	if b.spec.Bin != "" {
		bin = b.spec.Bin
	}
	fmt.Fprintf(b.log, "=== start #%d: %s %s\n", b.starts, bin, strings.Join(b.args(), " "))
	cmd := exec.Command(bin, b.args()...)
	cmd.Env = brokerEnv(b.spec.Env)
	cmd.Stdout = b.log
	cmd.Stderr = b.log
	// Its own process group, so Kill reaches anything it started; and
	// never outlive the test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Wait returns soon after the process exits even if a child of it
	// still holds the output pipe.
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec %s: %w", bin, err)
	}
	done := make(chan struct{})
	b.cmd, b.done = cmd, done
	start := b.starts
	go func() {
		err := cmd.Wait()
		code := cmd.ProcessState.ExitCode()
		if code == -1 { // killed by a signal
			code = -int(cmd.ProcessState.Sys().(syscall.WaitStatus).Signal())
		}
		b.mu.Lock()
		b.exitCode = code
		b.mu.Unlock()
		fmt.Fprintf(b.log, "=== exit #%d: %v (code %d)\n", start, err, code)
		close(done)
	}()
	return nil
}

func (b *Broker) exitedLocked() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

func (b *Broker) exited() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cmd != nil && b.exitedLocked()
}

func (b *Broker) waitReady() error {
	return poll(readyTimeout, func() error {
		if b.exited() {
			return stopPolling(fmt.Errorf("process exited with code %d before /readyz answered 200", b.ExitCode()))
		}
		path := "/readyz"
		if b.spec.LiveOnly {
			path = "/healthz"
		}
		code, body, err := b.HTTPGet(path)
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("%s: %d %q", path, code, body)
		}
		return nil
	})
}

// ExitCode is the last process's exit status; a negative number is the
// signal that killed it.
func (b *Broker) ExitCode() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.exitCode
}

// Signal sends sig to the running process.
func (b *Broker) Signal(sig os.Signal) {
	b.t.Helper()
	b.mu.Lock()
	cmd := b.cmd
	b.mu.Unlock()
	if err := cmd.Process.Signal(sig); err != nil {
		b.t.Fatalf("broker %s: send %v: %v", b.ID, sig, err)
	}
}

// Wait waits for the process to exit and returns its exit status; it fails
// the test when the process is still running after timeout.
func (b *Broker) Wait(timeout time.Duration) int {
	b.t.Helper()
	b.mu.Lock()
	done := b.done
	b.mu.Unlock()
	select {
	case <-done:
		return b.ExitCode()
	case <-time.After(timeout):
		b.t.Fatalf("broker %s still running %s after it was asked to stop", b.ID, timeout)
		return 0
	}
}

// Stop sends SIGTERM, waits for the exit and fails the test unless the exit
// status is 0.
func (b *Broker) Stop() {
	b.t.Helper()
	b.Signal(syscall.SIGTERM)
	if code := b.Wait(stopTimeout); code != 0 {
		b.t.Fatalf("broker %s: SIGTERM: exit status %d, want 0", b.ID, code)
	}
}

// Kill ends the process (and its process group) with SIGKILL, as a crash
// would.
func (b *Broker) Kill() {
	b.t.Helper()
	b.killGroup()
	b.Wait(stopTimeout)
}

func (b *Broker) killGroup() {
	b.mu.Lock()
	cmd := b.cmd
	b.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
}

// Restart starts the stopped node again with the same flags, data
// directory and ports, and waits until it is ready.
func (b *Broker) Restart() {
	b.t.Helper()
	if !b.exited() {
		b.t.Fatalf("broker %s: Restart while running; Stop or Kill it first", b.ID)
	}
	// A port of the last run can be briefly unavailable; the process then
	// exits and is started again on the same ports.
	err := poll(readyTimeout, func() error {
		if err := b.launch(); err != nil {
			return stopPolling(err)
		}
		err := b.waitReady()
		if err != nil && b.exited() && strings.Contains(b.log.String(), "address already in use") {
			return err
		}
		if err != nil {
			return stopPolling(err)
		}
		return nil
	})
	if err != nil {
		b.t.Fatalf("restart broker %s: %v", b.ID, err)
	}
}

// cleanup kills a process the test left running and prints the node's
// output when the test failed; a data race or panic in it fails the test.
func (b *Broker) cleanup() {
	b.mu.Lock()
	running := b.cmd != nil && !b.exitedLocked()
	done := b.done
	b.mu.Unlock()
	if running {
		b.killGroup()
		select {
		case <-done:
		case <-time.After(stopTimeout):
			b.t.Errorf("broker %s: still running %s after SIGKILL", b.ID, stopTimeout)
		}
	}
	out := b.log.String()
	if m := crashRE.FindString(out); m != "" {
		b.t.Errorf("broker %s crashed or raced: its output contains %q", b.ID, m)
	}
	if b.t.Failed() {
		b.t.Logf("broker %s output:\n%s", b.ID, out)
	}
}

// crashRE finds what the Go runtime prints on a panic, a fatal error or a
// data race (JSON log lines start with "{", so they never match).
var crashRE = regexp.MustCompile(`(?m)^(panic: |fatal error: |WARNING: DATA RACE).*`)

// Output is everything the node has written to stdout and stderr so far.
func (b *Broker) Output() string { return b.log.String() }

// RSS is the running process's resident set size (VmRSS in
// /proc/PID/status), in bytes.
func (b *Broker) RSS() (int64, error) {
	b.mu.Lock()
	cmd := b.cmd
	b.mu.Unlock()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("VmRSS line %q: %w", line, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", cmd.Process.Pid)
}

// ---------------------------------------------------------------------------
// HTTP and metrics

var httpClient = &http.Client{Timeout: 2 * time.Second}

// HTTPGet fetches path from the node's --http-addr.
func (b *Broker) HTTPGet(path string) (int, string, error) {
	resp, err := httpClient.Get("http://" + b.HTTPAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, "", fmt.Errorf("read %s: %w", path, err)
	}
	return resp.StatusCode, string(body), nil
}

// metricSample is one line of the Prometheus text format.
type metricSample struct {
	name   string
	labels map[string]string
	value  float64
}

func parseMetrics(text string) ([]metricSample, error) {
	var out []metricSample
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		s := metricSample{labels: map[string]string{}}
		rest := line
		if i := strings.IndexAny(line, "{ "); i >= 0 && line[i] == '{' {
			s.name = line[:i]
			j := strings.LastIndexByte(line, '}')
			if j < i {
				return nil, fmt.Errorf("metrics line %q: unterminated labels", line)
			}
			for _, kv := range splitLabels(line[i+1 : j]) {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return nil, fmt.Errorf("metrics line %q: bad label %q", line, kv)
				}
				uq, err := strconv.Unquote(v)
				if err != nil {
					return nil, fmt.Errorf("metrics line %q: label %q: %w", line, kv, err)
				}
				s.labels[k] = uq
			}
			rest = strings.TrimSpace(line[j+1:])
		} else {
			s.name, rest, _ = strings.Cut(line, " ")
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return nil, fmt.Errorf("metrics line %q: no value", line)
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: value: %w", line, err)
		}
		s.value = v
		out = append(out, s)
	}
	return out, sc.Err()
}

// splitLabels splits `a="x",b="y,z"` at commas outside quotes.
func splitLabels(s string) []string {
	var parts []string
	inQuote, esc, start := false, false, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case esc:
			esc = false
		case c == '\\':
			esc = true
		case c == '"':
			inQuote = !inQuote
		case c == ',' && !inQuote:
			parts = append(parts, strings.TrimSpace(s[start:i]))
			start = i + 1
		}
	}
	if last := strings.TrimSpace(s[start:]); last != "" {
		parts = append(parts, last)
	}
	return parts
}

// Metrics scrapes /metrics.
func (b *Broker) Metrics() ([]metricSample, error) {
	code, body, err := b.HTTPGet("/metrics")
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("/metrics: status %d", code)
	}
	return parseMetrics(body)
}

// Metric sums every sample of name whose labels include the given
// "key", "value" pairs. A metric that is absent sums to 0.
func (b *Broker) Metric(name string, labelPairs ...string) (float64, error) {
	samples, err := b.Metrics()
	if err != nil {
		return 0, err
	}
	return sumMetric(samples, name, labelPairs...), nil
}

func sumMetric(samples []metricSample, name string, labelPairs ...string) float64 {
	var sum float64
next:
	for _, s := range samples {
		if s.name != name {
			continue
		}
		for i := 0; i+1 < len(labelPairs); i += 2 {
			if s.labels[labelPairs[i]] != labelPairs[i+1] {
				continue next
			}
		}
		sum += s.value
	}
	return sum
}

// mustMetric is Metric that fails the test on a scrape error.
func (b *Broker) mustMetric(t testing.TB, name string, labelPairs ...string) float64 {
	t.Helper()
	v, err := b.Metric(name, labelPairs...)
	if err != nil {
		t.Fatalf("broker %s: scrape %s: %v", b.ID, name, err)
	}
	return v
}

// eventuallyMetric waits until the metric (summed as in Metric) equals want.
func (b *Broker) eventuallyMetric(t testing.TB, want float64, name string, labelPairs ...string) {
	t.Helper()
	eventually(t, 5*time.Second, func() error {
		got, err := b.Metric(name, labelPairs...)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("metric %s%v = %v, want %v", name, labelPairs, got, want)
		}
		return nil
	})
}

// assertServing checks the node still answers /healthz and carries an MQTT
// message end to end with the real clients.
func (b *Broker) assertServing(t *testing.T) {
	t.Helper()
	code, body, err := b.HTTPGet("/healthz")
	if err != nil || code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Fatalf("broker %s /healthz: code %d body %q err %v; want 200 \"ok\"", b.ID, code, body, err)
	}
	topic := "e2e/alive/" + strconv.FormatInt(time.Now().UnixNano(), 36)
	s := b.sub(t, "-t", topic, "-q", "1", "-C", "1")
	b.mustPub(t, "-t", topic, "-q", "1", "-m", "still serving")
	assertMessages(t, s.wait(t), msg(topic, 1, false, "still serving"))
}

// ---------------------------------------------------------------------------
// Running the broker binary for a quick verdict (bad configuration)

type cliResult struct {
	Cmd      string
	ExitCode int
	Stdout   string
	Stderr   string
	TimedOut bool
}

func (r cliResult) String() string {
	return fmt.Sprintf("$ %s\nexit %d (timed out: %v)\nstdout: %s\nstderr: %s", r.Cmd, r.ExitCode, r.TimedOut, r.Stdout, r.Stderr)
}

// runCmd runs name with args, stdin and extra environment, killing it after
// timeout. A failure to start fails the test; the exit status is returned.
func runCmd(t testing.TB, timeout time.Duration, env []string, stdin string, name string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = brokerEnv(env)
	// On timeout kill its whole process group, and stop waiting for
	// output a leftover child might keep open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := cliResult{
		Cmd:      strings.TrimSpace(strings.Join(env, " ") + " " + shellQuote(name, args)),
		Stdout:   stdout.String(),
		Stderr:   stderr.String(),
		TimedOut: ctx.Err() != nil,
	}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		r.ExitCode = exitErr.ExitCode()
	default:
		t.Fatalf("run %s: %v", r.Cmd, err)
	}
	return r
}

func shellQuote(name string, args []string) string {
	parts := []string{filepath.Base(name)}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$#*?&|;<>()\\") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// writeFile writes content to path or fails the test.
func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}
