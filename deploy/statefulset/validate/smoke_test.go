package validate

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// testClusterKey stands in for the Secret's cluster key.
const testClusterKey = "k8s-validate-test-cluster-key-0123456789"

// TestPodArgsStartANode runs the binary as the kubelet would run broker-0:
// the same arguments and environment, the ConfigMap and Secret files where
// the pod mounts them. Only what needs a cluster is rewritten: listen
// addresses become free 127.0.0.1 ports (the advertised host and the seed
// too, so nothing leaves loopback), the volumes temporary directories, and
// the Secret holds test values. Then it asks the probes' endpoints what
// the kubelet would, and stops the node as the kubelet does.
func TestPodArgsStartANode(t *testing.T) {
	m := renderDir(t, filesys.MakeFsOnDisk(), manifestDir)
	p, run, err := bootPod(t, m)
	if err != nil {
		t.Fatalf("%v\nbroker output:\n%s", err, run.out.String())
	}
	sts := m.StatefulSets[0]
	t.Logf("started: %s %s", brokerBin, strings.Join(run.args, " "))

	c := p.Container
	for _, pr := range []struct {
		kind   string
		probe  *corev1.Probe
		status int
	}{
		{"startup", c.StartupProbe, http.StatusOK},
		{"liveness", c.LivenessProbe, http.StatusOK},
		// One node of --bootstrap-expect 3 never has a leader: not ready,
		// while liveness above says alive. That is the point of the split.
		{"readiness", c.ReadinessProbe, http.StatusServiceUnavailable},
	} {
		code, body := run.get(t, pr.probe.HTTPGet.Path)
		if code != pr.status {
			t.Errorf("%s probe GET %s: %d, want %d\n%s", pr.kind, pr.probe.HTTPGet.Path, code, pr.status, body)
		}
	}
	if code, body := run.get(t, sts.Spec.Template.Annotations["prometheus.io/path"]); code != http.StatusOK || !strings.Contains(body, "broker_") {
		t.Errorf("scrape path: %d, no broker_ metrics", code)
	}
	if err := mqttConnect(run.addrs["mqtt-addr"]); err != nil {
		t.Errorf("MQTT listener: %v", err)
	}
	dataDir, _, _ := p.Flag("data-dir")
	if _, err := os.Stat(filepath.Join(run.local(dataDir), "raft")); err != nil {
		t.Errorf("no raft state on the volume at --data-dir: %v", err)
	}

	// The kubelet: preStop, then SIGTERM, then SIGKILL at the grace period.
	grace := time.Duration(*p.Spec.TerminationGracePeriodSeconds) * time.Second
	if l := c.Lifecycle; l != nil && l.PreStop != nil && l.PreStop.Sleep != nil {
		grace -= time.Duration(l.PreStop.Sleep.Seconds) * time.Second
	}
	start := time.Now()
	if err := run.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-run.exited:
		if code := run.cmd.ProcessState.ExitCode(); code != 0 {
			t.Errorf("exit status %d after SIGTERM, want 0", code)
		}
		t.Logf("graceful stop took %v (grace after preStop: %v)", time.Since(start).Round(time.Millisecond), grace)
	case <-time.After(grace):
		t.Errorf("still running %v after SIGTERM: the kubelet would SIGKILL it", grace)
	}

	out := run.out.String()
	for _, want := range []string{`"msg":"broker node started"`, `"encrypted":true`} {
		if !strings.Contains(out, want) {
			t.Errorf("the log has no %s", want)
		}
	}
	if strings.Contains(out, "config directive ignored") {
		t.Errorf("mosquitto.conf has directives the broker ignores")
	}
	if t.Failed() {
		t.Logf("broker output:\n%s", out)
	}
}

// TestPodArgsThatCannotStartFail proves the start above can fail: the
// binary refuses a bad value or a misspelt mosquitto.conf directive, and
// bootPod must report that.
func TestPodArgsThatCannotStartFail(t *testing.T) {
	base := loadBase(t)
	for name, overlay := range map[string]string{
		"bad flag value":     "patches:\n- target: {kind: StatefulSet}\n  patch: |-\n    - op: add\n      path: /spec/template/spec/containers/0/args/-\n      value: --max-queued-messages=0",
		"misspelt directive": "configMapGenerator:\n- name: broker-config\n  behavior: replace\n  files: [mosquitto.conf]\n#conf persistence true=>persistance true",
	} {
		t.Run(name, func(t *testing.T) {
			fsys := base.copy(t)
			writeOverlay(t, fsys, overlay)
			_, run, err := bootPod(t, renderDir(t, fsys, "/overlay"))
			if err == nil {
				t.Fatal("the broker started")
			}
			if code := run.cmd.ProcessState.ExitCode(); code != 2 {
				t.Fatalf("exit status %d, want 2 (configuration error): %v\n%s", code, err, run.out.String())
			}
			t.Logf("refused as expected: %s", strings.TrimSpace(run.out.String()))
		})
	}
}

// bootPod starts broker-0 of m's StatefulSet and waits for /healthz.
func bootPod(t *testing.T, m *Manifests) (*Pod, *podRun, error) {
	t.Helper()
	if len(m.StatefulSets) != 1 {
		t.Fatalf("want one StatefulSet, got %d", len(m.StatefulSets))
	}
	sts := m.StatefulSets[0]
	p, err := NewPod(sts, 0, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	mounts := materialize(t, m, sts.Spec.VolumeClaimTemplates, p)
	for attempt := 1; ; attempt++ {
		run := startPod(t, p, mounts)
		err := run.waitHealthy(60 * time.Second)
		// A free port can be taken between probing and binding it.
		if err != nil && attempt < 3 && strings.Contains(run.out.String(), "address already in use") {
			t.Logf("attempt %d: a port was taken meanwhile; retrying", attempt)
			continue
		}
		return p, run, err
	}
}

// materialize creates a directory for each volume mount of the broker
// container, filled as the kubelet would, and returns mount path -> dir.
func materialize(t *testing.T, m *Manifests, claims []corev1.PersistentVolumeClaim, p *Pod) map[string]string {
	t.Helper()
	root := t.TempDir()
	out := map[string]string{}
	for i, vm := range p.Container.VolumeMounts {
		dir := filepath.Join(root, fmt.Sprintf("%d-%s", i, vm.Name))
		files := map[string]string{}
		var vol *corev1.Volume
		for j := range p.Spec.Volumes {
			if p.Spec.Volumes[j].Name == vm.Name {
				vol = &p.Spec.Volumes[j]
			}
		}
		switch {
		case vol == nil:
			if !slices.ContainsFunc(claims, func(c corev1.PersistentVolumeClaim) bool { return c.Name == vm.Name }) {
				t.Fatalf("volume mount %s: no volume or claim template of that name", vm.Name)
			}
		case vol.ConfigMap != nil:
			cm := m.ConfigMaps[vol.ConfigMap.Name]
			if cm == nil {
				t.Fatalf("volume %s: ConfigMap %s is not rendered", vm.Name, vol.ConfigMap.Name)
			}
			files = projected(cm.Data, vol.ConfigMap.Items)
		case vol.Secret != nil:
			data := map[string]string{}
			if s := m.Secrets[vol.Secret.SecretName]; s != nil {
				for k, v := range s.Data {
					data[k] = string(v)
				}
			} else if vol.Secret.Optional == nil || !*vol.Secret.Optional {
				// Created outside the kustomization (the documented
				// one-liner): stand-in values for the keys it must hold.
				if len(vol.Secret.Items) == 0 {
					t.Fatalf("volume %s: Secret %s is not rendered and lists no items, so its keys are unknown", vm.Name, vol.Secret.SecretName)
				}
				for _, it := range vol.Secret.Items {
					data[it.Key] = testClusterKey + "-" + it.Key + "\n"
				}
			}
			files = projected(data, vol.Secret.Items)
		case vol.EmptyDir != nil:
		default:
			t.Fatalf("volume %s: a kind this test does not simulate", vm.Name)
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for name, content := range files {
			f := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(f), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if vm.SubPath != "" {
			dir = filepath.Join(dir, vm.SubPath)
		}
		out[path.Clean(vm.MountPath)] = dir
	}
	return out
}

// projected lays keys out as files, as a ConfigMap or Secret volume does.
func projected(data map[string]string, items []corev1.KeyToPath) map[string]string {
	out := map[string]string{}
	if len(items) == 0 {
		for k, v := range data {
			out[k] = v
		}
		return out
	}
	for _, it := range items {
		if v, ok := data[it.Key]; ok {
			out[it.Path] = v
		}
	}
	return out
}

type podRun struct {
	cmd    *exec.Cmd
	args   []string
	out    *syncBuffer
	exited chan struct{}
	addrs  map[string]string // listen flag -> 127.0.0.1:port
	mounts map[string]string
}

// startPod starts the broker with p's command line, rewritten as
// TestPodArgsStartANode describes.
func startPod(t *testing.T, p *Pod, mounts map[string]string) *podRun {
	t.Helper()
	r := &podRun{out: &syncBuffer{}, exited: make(chan struct{}), addrs: map[string]string{}, mounts: mounts}
	conf := Conf{}
	if f, _, ok := p.Flag("config"); ok {
		if b, err := os.ReadFile(r.local(f)); err == nil {
			conf = ParseConf(string(b))
		}
	}
	isAddr := map[string]bool{}
	for _, s := range portSpecs {
		isAddr[s.flag] = true
		if p.Addr(s.flag, brokerFlags, conf) != "" {
			r.addrs[s.flag] = "127.0.0.1:" + strconv.Itoa(freePort(t))
		}
	}
	args := []string{p.Command}
	for _, a := range p.Args {
		switch {
		case isAddr[a.Name]:
			continue // replaced below
		case a.Name == "advertise-host":
			args = append(args, "--advertise-host=127.0.0.1")
		case a.Name == "join":
			args = append(args, "--join="+r.addrs["gossip-addr"]) // the Service with this one pod
		default:
			args = append(args, "--"+a.Name+"="+r.local(a.Value))
		}
	}
	for _, s := range portSpecs {
		if a, ok := r.addrs[s.flag]; ok {
			args = append(args, "--"+s.flag+"="+a)
		}
	}
	var env []string
	for _, name := range p.EnvNames {
		env = append(env, name+"="+r.local(p.Env[name]))
	}
	r.args = args
	r.cmd = exec.Command(brokerBin, args...)
	r.cmd.Env = env // a container gets its own environment, not ours
	r.cmd.Dir = t.TempDir()
	r.cmd.Stdout, r.cmd.Stderr = r.out, r.out
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = r.cmd.Wait()
		close(r.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-r.exited:
		default:
			_ = r.cmd.Process.Kill()
			<-r.exited
		}
	})
	return r
}

// local maps a path inside the pod to the directory standing in for its
// mount; other values are returned unchanged.
func (r *podRun) local(v string) string {
	best := ""
	for mp := range r.mounts {
		if (v == mp || strings.HasPrefix(v, mp+"/")) && len(mp) > len(best) {
			best = mp
		}
	}
	if best == "" {
		return v
	}
	return r.mounts[best] + strings.TrimPrefix(v, best)
}

func (r *podRun) waitHealthy(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	url := "http://" + r.addrs["http-addr"] + "/healthz"
	client := &http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		select {
		case <-r.exited:
			return fmt.Errorf("broker exited (%v) before /healthz answered", r.cmd.ProcessState)
		default:
		}
		if resp, err := client.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("/healthz did not answer 200 within %v", limit)
}

func (r *podRun) get(t *testing.T, p string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + r.addrs["http-addr"] + p)
	if err != nil {
		t.Errorf("GET %s: %v", p, err)
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b)
}

// freePort returns a port free for TCP and UDP on 127.0.0.1 (gossip needs
// both on one number).
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		pc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		ln.Close()
		if err == nil {
			pc.Close()
			return port
		}
	}
	t.Fatal("no free port for TCP and UDP")
	return 0
}

// mqttConnect sends an MQTT 3.1.1 CONNECT and waits for a CONNACK. Any
// return code will do: without a quorum the broker may refuse, but it
// speaks MQTT on that port.
func mqttConnect(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	id := "k8s-validate"
	body := append([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 30, 0, byte(len(id))}, id...)
	if _, err := c.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	hdr := make([]byte, 4)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return fmt.Errorf("no CONNACK: %w", err)
	}
	if hdr[0] != 0x20 || hdr[1] != 2 {
		return fmt.Errorf("not a CONNACK: % x", hdr)
	}
	return nil
}

// syncBuffer is a bytes.Buffer the process's two output streams can share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
