package validate

import (
	"fmt"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// What the deployment must be (issue 12 and DESIGN.md).
const (
	Namespace     = "messaging"
	StatefulSet   = "broker"
	ClientService = "mosquitto"
	ClientPort    = 1883
	Replicas      = 3
	UID           = 3003
	// ShutdownTail is what internal/node's Shutdown may take after
	// --shutdown-timeout has run out: the raft leadership transfer (3 s),
	// raft's stop, the gossip leave (2.25 s) and the HTTP server (1 s),
	// rounded up generously.
	ShutdownTail = 15 * time.Second
	// MessageCopies is how many maximum-size messages the memory limit
	// must hold: mochi reads a PUBLISH whole, and fan-out buffers copy it.
	MessageCopies = 4
)

// seedConf is the seed Mosquitto deployment's configuration (DESIGN.md).
var seedConf = map[string]string{
	"allow_anonymous":       "true",
	"persistence":           "true",
	"message_size_limit":    "268435455",
	"max_queued_messages":   "1000",
	"max_inflight_messages": "20",
}

type checker struct {
	m     *Manifests
	flags Flags
	probs []string
}

func (c *checker) errorf(format string, args ...any) {
	c.probs = append(c.probs, fmt.Sprintf(format, args...))
}

// Check returns every rule the rendered manifests break, given the flags
// of the binary they run. An empty result means they pass.
func Check(m *Manifests, flags Flags) []string {
	c := &checker{m: m, flags: flags}
	if len(m.StatefulSets) != 1 {
		c.errorf("want exactly one StatefulSet, got %d", len(m.StatefulSets))
		return c.probs
	}
	sts := m.StatefulSets[0]
	c.statefulSet(sts)
	p, err := NewPod(sts, 0, "127.0.0.1")
	if err != nil {
		c.errorf("%v", err)
		return c.probs
	}
	c.commandLine(p)
	conf := c.conf(p)
	ports := c.ports(p, conf)
	c.services(sts, p, ports)
	c.probes(p, ports)
	c.security(p)
	c.dataDir(sts, p, conf)
	c.pdb(sts)
	c.identity(sts, p, ports)
	c.secrets(p)
	c.shutdown(p)
	c.resources(p, conf)
	c.annotations(sts, ports)
	return c.probs
}

func (c *checker) statefulSet(sts *appsv1.StatefulSet) {
	if sts.Name != StatefulSet || sts.Namespace != Namespace {
		c.errorf("StatefulSet is %s/%s, want %s/%s", sts.Namespace, sts.Name, Namespace, StatefulSet)
	}
	if sts.Spec.Replicas == nil || *sts.Spec.Replicas != Replicas {
		c.errorf("StatefulSet replicas: want %d", Replicas)
	}
	if sts.Spec.PodManagementPolicy != appsv1.ParallelPodManagement {
		c.errorf("StatefulSet podManagementPolicy %q: want Parallel (bootstrap needs every pod up; readiness needs a leader)", sts.Spec.PodManagementPolicy)
	}
	if len(sts.Spec.VolumeClaimTemplates) == 0 {
		c.errorf("StatefulSet has no volumeClaimTemplates: each node needs its own volume for --data-dir")
	}
	if sts.Spec.Selector == nil || len(sts.Spec.Selector.MatchLabels) == 0 || len(sts.Spec.Selector.MatchExpressions) > 0 {
		c.errorf("StatefulSet selector: want matchLabels only")
	} else if !subset(sts.Spec.Selector.MatchLabels, sts.Spec.Template.Labels) {
		c.errorf("StatefulSet selector %v does not match the pod template labels %v", sts.Spec.Selector.MatchLabels, sts.Spec.Template.Labels)
	}
	if sp := sts.Spec.Template.Spec.EnableServiceLinks; sp == nil || *sp {
		c.errorf("pod enableServiceLinks: want false (discovery is DNS)")
	}
}

// commandLine checks that every flag and BROKER_ variable is one the
// binary has.
func (c *checker) commandLine(p *Pod) {
	if p.Command != "" && p.Command != "serve" {
		c.errorf("container args start with %q: want serve", p.Command)
	}
	for _, a := range p.BadArgs {
		c.errorf("argument %q: write every flag as --name=value", a)
	}
	for _, a := range p.Args {
		if _, ok := c.flags[a.Name]; !ok {
			c.errorf("unknown flag --%s: `broker serve -h` does not list it", a.Name)
		}
	}
	known := map[string]bool{}
	for f := range c.flags {
		known[EnvName(f)] = true
	}
	for _, e := range p.EnvNames {
		if strings.HasPrefix(e, "BROKER_") && !known[e] {
			c.errorf("unknown flag variable %s: no `broker serve` flag reads it", e)
		}
	}
}

// conf finds the mosquitto.conf the pod reads through --config.
func (c *checker) conf(p *Pod) Conf {
	file, _, ok := p.Flag("config")
	if !ok {
		c.errorf("no --config: the seed settings come from a mosquitto.conf in a ConfigMap")
		return Conf{}
	}
	text, err := c.fileFromConfigMap(p, file)
	if err != nil {
		c.errorf("--config %s: %v", file, err)
		return Conf{}
	}
	conf := ParseConf(text)
	for _, k := range slices.Sorted(maps.Keys(seedConf)) {
		if got := conf.Directives[k]; got != seedConf[k] {
			c.errorf("mosquitto.conf %s %q: the seed deployment has %s", k, got, seedConf[k])
		}
	}
	return conf
}

func (c *checker) fileFromConfigMap(p *Pod, file string) (string, error) {
	mount, vol := p.Mount(file)
	if mount == nil || vol == nil || vol.ConfigMap == nil {
		return "", fmt.Errorf("not in a mounted ConfigMap")
	}
	cm := c.m.ConfigMaps[vol.ConfigMap.Name]
	if cm == nil {
		return "", fmt.Errorf("ConfigMap %s is not in the kustomization", vol.ConfigMap.Name)
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(path.Clean(file), path.Clean(mount.MountPath)), "/")
	if mount.SubPath != "" {
		rel = path.Join(mount.SubPath, rel)
	}
	key := rel
	if len(vol.ConfigMap.Items) > 0 {
		key = ""
		for _, it := range vol.ConfigMap.Items {
			if it.Path == rel {
				key = it.Key
			}
		}
	}
	text, ok := cm.Data[key]
	if !ok {
		return "", fmt.Errorf("ConfigMap %s has no key for %s", cm.Name, rel)
	}
	return text, nil
}

// portSpec ties a listen-address flag to its container port(s).
type portSpec struct {
	flag  string
	names []string          // container port names
	proto []corev1.Protocol // per name
}

var portSpecs = []portSpec{
	{"mqtt-addr", []string{"mqtt"}, []corev1.Protocol{corev1.ProtocolTCP}},
	{"ws-addr", []string{"ws"}, []corev1.Protocol{corev1.ProtocolTCP}},
	{"http-addr", []string{"http"}, []corev1.Protocol{corev1.ProtocolTCP}},
	{"gossip-addr", []string{"gossip", "gossip-udp"}, []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP}},
	{"cluster-addr", []string{"cluster"}, []corev1.Protocol{corev1.ProtocolTCP}},
}

// Addr is a listen address the binary will use, with the binary's own
// precedence: flag, environment, --config file (listeners), default.
func (p *Pod) Addr(flag string, flags Flags, conf Conf) string {
	if v, _, ok := p.Flag(flag); ok {
		return v
	}
	switch {
	case flag == "mqtt-addr" && conf.Listeners > 0:
		if conf.MQTTPort == 0 {
			return "" // a file with listeners but no plain one: no plain MQTT
		}
		return ":" + strconv.Itoa(conf.MQTTPort)
	case flag == "ws-addr" && conf.WSPort != 0:
		return ":" + strconv.Itoa(conf.WSPort)
	}
	return flags[flag]
}

// ports checks every listener against its named container port and
// returns the port numbers by flag (0 = off).
func (c *checker) ports(p *Pod, conf Conf) map[string]int {
	out := map[string]int{}
	for _, s := range portSpecs {
		addr := p.Addr(s.flag, c.flags, conf)
		if addr == "" {
			continue
		}
		port, err := portOf(addr)
		if err != nil || port == 0 {
			c.errorf("--%s %q: want a fixed port", s.flag, addr)
			continue
		}
		out[s.flag] = port
		for i, name := range s.names {
			cp := p.ContainerPort(name, s.proto[i])
			switch {
			case cp == nil:
				c.errorf("--%s listens on %d but the container has no %s port named %s", s.flag, port, s.proto[i], name)
			case int(cp.ContainerPort) != port:
				c.errorf("container port %s is %d but --%s listens on %d", name, cp.ContainerPort, s.flag, port)
			}
		}
	}
	if out["mqtt-addr"] != ClientPort {
		c.errorf("the broker's MQTT listener is on %d: want %d, where clients connect", out["mqtt-addr"], ClientPort)
	}
	return out
}

// target resolves a Service's targetPort to the container port number.
func target(p *Pod, sp corev1.ServicePort) int {
	proto := sp.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	t := sp.TargetPort
	if t.Type == intstr.Int && t.IntVal == 0 {
		t = intstr.FromInt32(sp.Port)
	}
	cp := p.ContainerPort(t.String(), proto)
	if cp == nil {
		return 0
	}
	return int(cp.ContainerPort)
}

func (c *checker) services(sts *appsv1.StatefulSet, p *Pod, ports map[string]int) {
	labels := sts.Spec.Template.Labels
	hs := c.m.Services[sts.Spec.ServiceName]
	if hs == nil {
		c.errorf("StatefulSet serviceName %q: no such Service", sts.Spec.ServiceName)
	} else {
		if hs.Spec.ClusterIP != corev1.ClusterIPNone {
			c.errorf("Service %s must be headless (clusterIP: None): it names each pod for --advertise-host", hs.Name)
		}
		if !hs.Spec.PublishNotReadyAddresses {
			c.errorf("Service %s must set publishNotReadyAddresses: peers find each other there before any is ready", hs.Name)
		}
		if len(hs.Spec.Selector) == 0 || !subset(hs.Spec.Selector, labels) {
			c.errorf("Service %s selector %v does not select the pods", hs.Name, hs.Spec.Selector)
		}
		for _, want := range []struct {
			name  string
			proto corev1.Protocol
			flag  string
		}{{"gossip", corev1.ProtocolTCP, "gossip-addr"}, {"gossip-udp", corev1.ProtocolUDP, "gossip-addr"}, {"cluster", corev1.ProtocolTCP, "cluster-addr"}} {
			sp := servicePort(hs, want.name)
			switch {
			case sp == nil:
				c.errorf("Service %s has no port named %s", hs.Name, want.name)
			case sp.Protocol != want.proto:
				c.errorf("Service %s port %s is %s, want %s", hs.Name, want.name, sp.Protocol, want.proto)
			case target(p, *sp) != ports[want.flag] || int(sp.Port) != ports[want.flag]:
				c.errorf("Service %s port %s (%d -> %s) does not reach --%s port %d", hs.Name, want.name, sp.Port, sp.TargetPort.String(), want.flag, ports[want.flag])
			}
		}
	}
	cs := c.m.Services[ClientService]
	if cs == nil {
		c.errorf("no Service %s: clients connect to %s.%s.svc.cluster.local:%d", ClientService, ClientService, Namespace, ClientPort)
		return
	}
	if cs.Spec.ClusterIP == corev1.ClusterIPNone || cs.Spec.PublishNotReadyAddresses {
		c.errorf("Service %s must be a normal ClusterIP Service of ready pods only", cs.Name)
	}
	if len(cs.Spec.Selector) == 0 || !subset(cs.Spec.Selector, labels) {
		c.errorf("Service %s selector %v does not select the pods", cs.Name, cs.Spec.Selector)
	}
	found := false
	for _, sp := range cs.Spec.Ports {
		if sp.Port == ClientPort && (sp.Protocol == "" || sp.Protocol == corev1.ProtocolTCP) {
			found = true
			if target(p, sp) != ports["mqtt-addr"] {
				c.errorf("Service %s port %d targets %s, not the MQTT listener (%d)", cs.Name, ClientPort, sp.TargetPort.String(), ports["mqtt-addr"])
			}
		}
	}
	if !found {
		c.errorf("Service %s has no TCP port %d", cs.Name, ClientPort)
	}
	if ws := ports["ws-addr"]; ws != 0 {
		reached := false
		for _, sp := range cs.Spec.Ports {
			reached = reached || target(p, sp) == ws
		}
		if !reached {
			c.errorf("Service %s has no port for the WebSocket listener (%d)", cs.Name, ws)
		}
	}
}

func servicePort(s *corev1.Service, name string) *corev1.ServicePort {
	for i := range s.Spec.Ports {
		if s.Spec.Ports[i].Name == name {
			return &s.Spec.Ports[i]
		}
	}
	return nil
}

// probes checks the probes' paths and ports; the tests then ask the
// running binary for the same paths.
func (c *checker) probes(p *Pod, ports map[string]int) {
	for _, pr := range []struct {
		kind  string
		probe *corev1.Probe
		path  string
	}{
		// /healthz: the process answers; never the cluster (a lost quorum
		// must not restart every pod).
		{"liveness", p.Container.LivenessProbe, "/healthz"},
		{"startup", p.Container.StartupProbe, "/healthz"},
		{"readiness", p.Container.ReadinessProbe, "/readyz"},
	} {
		if pr.probe == nil || pr.probe.HTTPGet == nil {
			c.errorf("%s probe: want an httpGet of %s", pr.kind, pr.path)
			continue
		}
		g := pr.probe.HTTPGet
		if g.Path != pr.path {
			c.errorf("%s probe path %q: want %s", pr.kind, g.Path, pr.path)
		}
		if cp := p.ContainerPort(g.Port.String(), corev1.ProtocolTCP); cp == nil || int(cp.ContainerPort) != ports["http-addr"] {
			c.errorf("%s probe port %s is not --http-addr (%d)", pr.kind, g.Port.String(), ports["http-addr"])
		}
	}
}

func (c *checker) security(p *Pod) {
	ps := p.Spec.SecurityContext
	if ps == nil {
		c.errorf("pod securityContext missing: want runAsUser, runAsGroup and fsGroup %d", UID)
		return
	}
	for _, f := range []struct {
		name string
		v    *int64
	}{{"runAsUser", ps.RunAsUser}, {"runAsGroup", ps.RunAsGroup}, {"fsGroup", ps.FSGroup}} {
		if f.v == nil || *f.v != UID {
			c.errorf("pod securityContext %s: want %d (the volume and the old Mosquitto's files belong to it)", f.name, UID)
		}
	}
	if ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot {
		c.errorf("pod securityContext runAsNonRoot: want true")
	}
	if ps.SeccompProfile == nil || ps.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		c.errorf("pod securityContext seccompProfile: want RuntimeDefault")
	}
	cs := p.Container.SecurityContext
	if cs == nil {
		c.errorf("container securityContext missing")
		return
	}
	if cs.RunAsUser != nil && *cs.RunAsUser != UID {
		c.errorf("container securityContext runAsUser %d overrides the pod's %d", *cs.RunAsUser, UID)
	}
	if cs.AllowPrivilegeEscalation == nil || *cs.AllowPrivilegeEscalation {
		c.errorf("container allowPrivilegeEscalation: want false")
	}
	if cs.ReadOnlyRootFilesystem == nil || !*cs.ReadOnlyRootFilesystem {
		c.errorf("container readOnlyRootFilesystem: want true")
	}
	if cs.Capabilities == nil || !slices.Contains(cs.Capabilities.Drop, "ALL") || len(cs.Capabilities.Add) > 0 {
		c.errorf("container capabilities: want drop ALL and add none")
	}
}

// dataDir checks that --data-dir is on the pod's own persistent volume.
func (c *checker) dataDir(sts *appsv1.StatefulSet, p *Pod, conf Conf) {
	dir, _, ok := p.Flag("data-dir")
	if !ok {
		dir = conf.PersistenceLocation
	}
	if dir == "" || !path.IsAbs(dir) {
		c.errorf("data-dir %q: set --data-dir to an absolute path on the volume (the default is relative to the working directory)", dir)
		return
	}
	mount, vol := p.Mount(dir)
	if mount == nil {
		c.errorf("data-dir %s is on no volume mount: its raft log would not survive a restart", dir)
		return
	}
	pvc := false
	for _, t := range sts.Spec.VolumeClaimTemplates {
		pvc = pvc || t.Name == mount.Name
	}
	if !pvc || vol != nil {
		c.errorf("data-dir %s is on volume %s, which is not a volumeClaimTemplate", dir, mount.Name)
	}
	if mount.ReadOnly {
		c.errorf("data-dir %s is mounted read-only", dir)
	}
}

func (c *checker) pdb(sts *appsv1.StatefulSet) {
	if len(c.m.PDBs) != 1 {
		c.errorf("want one PodDisruptionBudget, got %d", len(c.m.PDBs))
		return
	}
	b := c.m.PDBs[0]
	if b.Namespace != sts.Namespace {
		c.errorf("PodDisruptionBudget %s is in namespace %q, the pods in %q", b.Name, b.Namespace, sts.Namespace)
	}
	if b.Spec.MaxUnavailable == nil || b.Spec.MaxUnavailable.String() != "1" || b.Spec.MinAvailable != nil {
		c.errorf("PodDisruptionBudget %s: want maxUnavailable 1 only (a quorum of three survives one away)", b.Name)
	}
	if b.Spec.Selector == nil || len(b.Spec.Selector.MatchLabels) == 0 || len(b.Spec.Selector.MatchExpressions) > 0 ||
		!subset(b.Spec.Selector.MatchLabels, sts.Spec.Template.Labels) {
		c.errorf("PodDisruptionBudget %s selector does not select the broker pods %v", b.Name, sts.Spec.Template.Labels)
	}
}

// identity checks the node id, advertised name, seeds and bootstrap size.
func (c *checker) identity(sts *appsv1.StatefulSet, p *Pod, ports map[string]int) {
	if id, src, ok := p.Flag("node-id"); ok && id != p.Name {
		c.errorf("%s gives pod %s the node id %q: want the pod name (its hostname)", src, p.Name, id)
	}
	// Any cluster domain: docs/kubernetes.md tells how to change it.
	wantHost := fmt.Sprintf("%s.%s.%s.svc.", p.Name, sts.Spec.ServiceName, p.Namespace)
	if h, _, _ := p.Flag("advertise-host"); !strings.HasPrefix(h, wantHost) || len(h) == len(wantHost) {
		c.errorf("--advertise-host for pod %s is %q: want its stable DNS name %scluster.local", p.Name, h, wantHost)
	}
	join, _, _ := p.Flag("join")
	if join == "" {
		c.errorf("no --join: nodes would never find each other")
	}
	svc := sts.Spec.ServiceName
	for _, seed := range strings.Split(join, ",") {
		host, port := strings.TrimSpace(seed), ""
		if h, pt, found := strings.Cut(host, ":"); found {
			host, port = h, pt
		}
		names := []string{svc, svc + "." + p.Namespace, svc + "." + p.Namespace + ".svc", svc + "." + p.Namespace + ".svc.cluster.local"}
		if !slices.Contains(names, host) {
			c.errorf("--join seed %q is not the headless Service %s", seed, svc)
		}
		if port != "" && port != strconv.Itoa(ports["gossip-addr"]) {
			c.errorf("--join seed %q: port is not the gossip port %d", seed, ports["gossip-addr"])
		}
	}
	if be, _, _ := p.Flag("bootstrap-expect"); sts.Spec.Replicas == nil || be != strconv.Itoa(int(*sts.Spec.Replicas)) {
		c.errorf("--bootstrap-expect %q: want the initial replicas (%d)", be, Replicas)
	}
}

// secrets checks that the cluster key and admin token come from files of
// a Secret, never from the manifest.
func (c *checker) secrets(p *Pod) {
	for _, s := range []struct{ file, plain string }{{"cluster-key-file", "cluster-key"}, {"admin-token-file", "admin-token"}} {
		if _, src, ok := p.Flag(s.plain); ok {
			c.errorf("%s holds a secret in the manifest: use --%s from a Secret", src, s.file)
		}
		f, _, ok := p.Flag(s.file)
		if !ok {
			c.errorf("no --%s: want it from a Secret", s.file)
			continue
		}
		if _, vol := p.Mount(f); vol == nil || vol.Secret == nil || (vol.Secret.Optional != nil && *vol.Secret.Optional) {
			c.errorf("--%s %s is not in a mounted, required Secret", s.file, f)
		}
	}
}

// shutdown checks that the grace period covers the whole graceful stop.
func (c *checker) shutdown(p *Pod) {
	v, _, ok := p.Flag("shutdown-timeout")
	if !ok {
		v = c.flags["shutdown-timeout"]
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		c.errorf("--shutdown-timeout %q: %v", v, err)
		return
	}
	var pre time.Duration
	if l := p.Container.Lifecycle; l != nil && l.PreStop != nil && l.PreStop.Sleep != nil {
		pre = time.Duration(l.PreStop.Sleep.Seconds) * time.Second
	}
	need := pre + d + ShutdownTail
	g := p.Spec.TerminationGracePeriodSeconds
	if g == nil || time.Duration(*g)*time.Second < need {
		c.errorf("terminationGracePeriodSeconds must cover preStop %v + --shutdown-timeout %v + %v after it: want at least %v", pre, d, ShutdownTail, need)
	}
}

// resources checks that the memory limit holds a few maximum-size messages.
func (c *checker) resources(p *Pod, conf Conf) {
	size := conf.MessageSizeLimit
	if v, _, ok := p.Flag("message-size-limit"); ok {
		size = parseBytes(v)
	} else if size == 0 {
		size = parseBytes(c.flags["message-size-limit"])
	}
	lim, ok := p.Container.Resources.Limits[corev1.ResourceMemory]
	if !ok {
		c.errorf("no memory limit")
		return
	}
	if lim.Value() < MessageCopies*size {
		c.errorf("memory limit %s holds fewer than %d messages of the %d-byte message size limit", lim.String(), MessageCopies, size)
	}
	if _, ok := p.Container.Resources.Requests[corev1.ResourceMemory]; !ok {
		c.errorf("no memory request")
	}
	if v, ok := p.Env["GOMEMLIMIT"]; ok {
		q, err := resource.ParseQuantity(strings.TrimSuffix(v, "B"))
		if err != nil || q.Cmp(lim) >= 0 {
			c.errorf("GOMEMLIMIT %s: want a size below the memory limit %s", v, lim.String())
		}
	}
}

// parseBytes reads a size the way the broker's --message-size-limit does.
func parseBytes(s string) int64 {
	t := strings.ToUpper(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		m      int64
	}{{"KB", 1 << 10}, {"MB", 1 << 20}, {"GB", 1 << 30}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.m
			break
		}
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	return n * mult
}

func (c *checker) annotations(sts *appsv1.StatefulSet, ports map[string]int) {
	a := sts.Spec.Template.Annotations
	if a["prometheus.io/scrape"] != "true" || a["prometheus.io/path"] != "/metrics" || a["prometheus.io/port"] != strconv.Itoa(ports["http-addr"]) {
		c.errorf("pod annotations: want prometheus.io/scrape \"true\", path /metrics and port %d (--http-addr)", ports["http-addr"])
	}
}

func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}
