package validate

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// manifestDir is deploy/statefulset, seen from this package.
const manifestDir = ".."

var (
	brokerBin   string // built once by TestMain
	brokerFlags Flags
)

// TestMain builds the broker from this checkout, so every check runs
// against the flags and endpoints of the binary the image would ship.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "k8s-validate-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		root, err := filepath.Abs(filepath.Join(manifestDir, "..", ".."))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		brokerBin = filepath.Join(dir, "broker")
		start := time.Now()
		build := exec.Command("go", "build", "-o", brokerBin, "./cmd/broker")
		build.Dir = root
		build.Env = append(os.Environ(), "CGO_ENABLED=0") // as the Dockerfile builds it
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "k8s-validate: go build ./cmd/broker in %s: %v\n%s", root, err, out)
			return 1
		}
		fmt.Fprintf(os.Stderr, "k8s-validate: built the broker in %v\n", time.Since(start).Round(time.Millisecond))
		if brokerFlags, err = ReadFlags(brokerBin); err != nil {
			fmt.Fprintf(os.Stderr, "k8s-validate: %v\n", err)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

func renderDir(t *testing.T, fsys filesys.FileSystem, dir string) *Manifests {
	t.Helper()
	out, err := Render(fsys, dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Decode(out)
	if err != nil {
		t.Fatalf("strict decoding of the rendered manifests: %v", err)
	}
	return m
}

// TestManifests renders deploy/statefulset and checks every rule.
func TestManifests(t *testing.T) {
	m := renderDir(t, filesys.MakeFsOnDisk(), manifestDir)
	if len(m.StatefulSets) != 1 || len(m.PDBs) != 1 || len(m.ConfigMaps) != 1 ||
		m.Services["mosquitto"] == nil || m.Services["broker-peers"] == nil {
		t.Fatalf("want a StatefulSet, Services mosquitto and broker-peers, a PDB and a ConfigMap; got %d, %v, %d, %d",
			len(m.StatefulSets), keys(m.Services), len(m.PDBs), len(m.ConfigMaps))
	}
	for _, p := range Check(m, brokerFlags) {
		t.Error(p)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestStrictDecodeRefusesUnknownFields(t *testing.T) {
	for _, doc := range []string{
		"apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: x}\nspec:\n  podManagmentPolicy: Parallel\n",
		"apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  publishNotReadyAdresses: true\n",
		"apiVersion: apps/v1beta9\nkind: StatefulSet\nmetadata: {name: x}\n",
		"apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", // a kind this deployment must not carry
	} {
		if _, err := Decode([]byte(doc)); err == nil {
			t.Errorf("decoded without error:\n%s", doc)
		} else {
			t.Logf("refused as expected: %v", err)
		}
	}
}

func TestExpand(t *testing.T) {
	env := map[string]string{"POD_NAME": "broker-1", "NS": "messaging"}
	for in, want := range map[string]string{
		"$(POD_NAME).peers.$(NS)": "broker-1.peers.messaging",
		"$(UNKNOWN)":              "$(UNKNOWN)",
		"$$(POD_NAME)":            "$(POD_NAME)",
		"cost $5":                 "cost $5",
		"$(POD_NAME":              "$(POD_NAME",
	} {
		if got := expand(in, env); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseConf(t *testing.T) {
	c := ParseConf("listener 1883\n# listener 9\nlistener 8083\nprotocol websockets\nlistener 1884\nmessage_size_limit 10\n")
	if c.MQTTPort != 1883 || c.WSPort != 8083 || c.Listeners != 3 || c.MessageSizeLimit != 10 {
		t.Fatalf("got %+v", c)
	}
}

// TestCheckCatchesBrokenInvariants proves the checks can fail: each case
// is a kustomize overlay on the real manifests that breaks one rule, and
// the checker must name it. The first case, with no patch, must pass.
func TestCheckCatchesBrokenInvariants(t *testing.T) {
	base := loadBase(t)
	sts := func(ops string) string {
		return "patches:\n- target: {kind: StatefulSet, name: broker}\n  patch: |-\n" + indent(ops, "    ")
	}
	svc := func(name, ops string) string {
		return "patches:\n- target: {kind: Service, name: " + name + "}\n  patch: |-\n" + indent(ops, "    ")
	}
	addArg := func(a string) string {
		return sts("- op: add\n  path: /spec/template/spec/containers/0/args/-\n  value: " + a)
	}
	conf := func(from, to string) string {
		return "configMapGenerator:\n- name: broker-config\n  behavior: replace\n  files: [mosquitto.conf]\n#conf " + from + "=>" + to
	}
	for _, tc := range []struct {
		name, overlay, want string
	}{
		{"unchanged", "", ""},
		{"fsGroup", sts("- op: replace\n  path: /spec/template/spec/securityContext/fsGroup\n  value: 1000"), "fsGroup: want 3003"},
		{"runAsUser", sts("- op: replace\n  path: /spec/template/spec/securityContext/runAsUser\n  value: 0"), "runAsUser: want 3003"},
		{"gossip port", addArg("--gossip-addr=:7000"), "container port gossip is 7946 but --gossip-addr listens on 7000"},
		{"mqtt listener in the conf", conf("listener 1883", "listener 1884"), "container port mqtt is 1883 but --mqtt-addr listens on 1884"},
		{"client port", svc("mosquitto", "- op: replace\n  path: /spec/ports/0/port\n  value: 1884"), "Service mosquitto has no TCP port 1883"},
		{"not-ready addresses", svc("broker-peers", "- op: remove\n  path: /spec/publishNotReadyAddresses"), "must set publishNotReadyAddresses"},
		{"liveness on readyz", sts("- op: replace\n  path: /spec/template/spec/containers/0/livenessProbe/httpGet/path\n  value: /readyz"), "liveness probe path \"/readyz\""},
		{"probe port", sts("- op: replace\n  path: /spec/template/spec/containers/0/readinessProbe/httpGet/port\n  value: mqtt"), "readiness probe port mqtt"},
		{"PDB selector", "patches:\n- target: {kind: PodDisruptionBudget}\n  patch: |-\n    - op: replace\n      path: /spec/selector/matchLabels\n      value: {app: other}", "PodDisruptionBudget broker selector"},
		{"data dir off the volume", addArg("--data-dir=/var/lib/broker"), "data-dir /var/lib/broker is on no volume mount"},
		{"data dir on a ConfigMap", addArg("--data-dir=/etc/broker/config"), "not a volumeClaimTemplate"},
		{"unknown flag", addArg("--no-such-flag=1"), "unknown flag --no-such-flag"},
		{"unknown variable", sts("- op: add\n  path: /spec/template/spec/containers/0/env/-\n  value: {name: BROKER_NO_SUCH, value: x}"), "unknown flag variable BROKER_NO_SUCH"},
		{"grace period", sts("- op: replace\n  path: /spec/template/spec/terminationGracePeriodSeconds\n  value: 30"), "terminationGracePeriodSeconds must cover"},
		{"node id", addArg("--node-id=broker"), "the node id \"broker\""},
		{"bootstrap", addArg("--bootstrap-expect=1"), "--bootstrap-expect \"1\""},
		{"advertised IP", addArg("--advertise-host=$(POD_IP)"), "want its stable DNS name"},
		{"join elsewhere", addArg("--join=mosquitto"), "is not the headless Service"},
		{"plain key", addArg("--cluster-key=0123456789abcdef0123"), "holds a secret in the manifest"},
		{"seed limit", conf("max_queued_messages 1000", "max_queued_messages 100"), "max_queued_messages \"100\""},
		{"memory", sts("- op: replace\n  path: /spec/template/spec/containers/0/resources/limits/memory\n  value: 512Mi"), "memory limit 512Mi"},
		{"replicas", sts("- op: replace\n  path: /spec/replicas\n  value: 1"), "replicas: want 3"},
		{"annotations", sts("- op: replace\n  path: /spec/template/metadata/annotations/prometheus.io~1port\n  value: \"9090\""), "prometheus.io/scrape"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fsys := base.copy(t)
			writeOverlay(t, fsys, tc.overlay)
			m := renderDir(t, fsys, "/overlay")
			probs := Check(m, brokerFlags)
			if tc.want == "" {
				if len(probs) > 0 {
					t.Fatalf("the unchanged overlay fails: %q", probs)
				}
				return
			}
			for _, p := range probs {
				if strings.Contains(p, tc.want) {
					t.Logf("caught: %s", p)
					return
				}
			}
			t.Fatalf("no problem mentions %q; got %q", tc.want, probs)
		})
	}
	// Strict decoding is part of the check: a misspelt field must fail.
	t.Run("misspelt field", func(t *testing.T) {
		fsys := base.copy(t)
		writeOverlay(t, fsys, sts("- op: add\n  path: /spec/podManagmentPolicy\n  value: Parallel"))
		out, err := Render(fsys, "/overlay")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Decode(out); err == nil || !strings.Contains(err.Error(), `unknown field "spec.podManagmentPolicy"`) {
			t.Fatalf("want an unknown-field error, got %v", err)
		}
	})
}

// baseFiles is deploy/statefulset's manifests, copied into an in-memory
// file system under /base for overlays.
type baseFiles map[string][]byte

func loadBase(t *testing.T) baseFiles {
	t.Helper()
	b := baseFiles{}
	for _, pat := range []string{"*.yaml", "*.conf"} {
		files, err := filepath.Glob(filepath.Join(manifestDir, pat))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			b[filepath.Base(f)] = data
		}
	}
	if b["kustomization.yaml"] == nil {
		t.Fatal("no kustomization.yaml in " + manifestDir)
	}
	return b
}

func (b baseFiles) copy(t *testing.T) filesys.FileSystem {
	t.Helper()
	fsys := filesys.MakeFsInMemory()
	for name, data := range b {
		if err := fsys.WriteFile("/base/"+name, data); err != nil {
			t.Fatal(err)
		}
	}
	return fsys
}

// writeOverlay writes /overlay/kustomization.yaml on top of /base. A
// "#conf FROM=>TO" line also writes /overlay/mosquitto.conf: the base's
// with one line replaced.
func writeOverlay(t *testing.T, fsys filesys.FileSystem, body string) {
	t.Helper()
	if _, spec, ok := strings.Cut(body, "#conf "); ok {
		from, to, _ := strings.Cut(spec, "=>")
		conf, err := fsys.ReadFile("/base/mosquitto.conf")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(conf), from+"\n") {
			t.Fatalf("base mosquitto.conf has no line %q", from)
		}
		if err := fsys.WriteFile("/overlay/mosquitto.conf", []byte(strings.Replace(string(conf), from+"\n", to+"\n", 1))); err != nil {
			t.Fatal(err)
		}
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- ../base\n" + body + "\n"
	if err := fsys.WriteFile("/overlay/kustomization.yaml", []byte(k)); err != nil {
		t.Fatal(err)
	}
}

func indent(s, pre string) string {
	return pre + strings.ReplaceAll(s, "\n", "\n"+pre)
}

func TestParseFlags(t *testing.T) {
	help := "Usage of broker serve:\n" +
		"  -mqtt-addr string\n    \tMQTT over TCP listen address (empty: off) (default \":1883\")\n" +
		"  -ws-addr string\n    \tMQTT over WebSocket listen address (default off)\n" +
		"  -message-size-limit value\n    \tlargest accepted MQTT packet (default 256MB)\n" +
		"  -pprof\n    \tserve /debug/pprof\n" +
		"  -shutdown-timeout duration\n    \ttime allowed for a graceful stop (default 10s)\n"
	f, err := ParseFlags(help)
	if err != nil {
		t.Fatal(err)
	}
	want := Flags{"mqtt-addr": ":1883", "ws-addr": "", "message-size-limit": "256MB", "pprof": "", "shutdown-timeout": "10s"}
	if len(f) != len(want) {
		t.Fatalf("got %v, want %v", f, want)
	}
	for k, v := range want {
		if got, ok := f[k]; !ok || got != v {
			t.Errorf("flag %s: got %q (listed %v), want %q", k, got, ok, v)
		}
	}
}
