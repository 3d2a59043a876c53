package validate

import (
	"fmt"
	"net"
	"path"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// Arg is one --name=value argument of the broker's command line.
type Arg struct{ Name, Value string }

// Pod is what the kubelet would run for one ordinal of the StatefulSet:
// the broker container's environment and arguments with $(VAR) references
// expanded as Kubernetes does.
type Pod struct {
	Name      string
	Namespace string
	IP        string
	Spec      *corev1.PodSpec
	Container *corev1.Container
	Env       map[string]string // expanded values
	EnvNames  []string          // in manifest order
	Command   string            // the subcommand ("serve")
	Args      []Arg
	// BadArgs are arguments not of the --name=value form (ambiguous to read
	// here, and to a reader of the manifest).
	BadArgs []string
}

// ContainerName is the broker's container in the pod template.
const ContainerName = "broker"

// NewPod builds ordinal's pod of sts, with ip as its status.podIP.
func NewPod(sts *appsv1.StatefulSet, ordinal int, ip string) (*Pod, error) {
	spec := &sts.Spec.Template.Spec
	var c *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == ContainerName {
			c = &spec.Containers[i]
		}
	}
	if c == nil {
		return nil, fmt.Errorf("StatefulSet %s has no container named %q", sts.Name, ContainerName)
	}
	p := &Pod{Name: fmt.Sprintf("%s-%d", sts.Name, ordinal), Namespace: sts.Namespace, IP: ip,
		Spec: spec, Container: c, Env: map[string]string{}}
	for _, e := range c.Env {
		v := e.Value
		if e.ValueFrom != nil {
			switch {
			case e.ValueFrom.FieldRef != nil:
				switch e.ValueFrom.FieldRef.FieldPath {
				case "metadata.name":
					v = p.Name
				case "metadata.namespace":
					v = p.Namespace
				case "status.podIP":
					v = ip
				default:
					return nil, fmt.Errorf("env %s: fieldRef %s is not simulated here", e.Name, e.ValueFrom.FieldRef.FieldPath)
				}
			default:
				return nil, fmt.Errorf("env %s: only fieldRef is simulated here (keep secrets in mounted files)", e.Name)
			}
		} else {
			v = expand(v, p.Env)
		}
		if _, dup := p.Env[e.Name]; !dup {
			p.EnvNames = append(p.EnvNames, e.Name)
		}
		p.Env[e.Name] = v
	}
	args := append(append([]string{}, c.Command...), c.Args...)
	for i, a := range args {
		a = expand(a, p.Env)
		switch {
		case i == 0 && !strings.HasPrefix(a, "-"):
			p.Command = a
		case strings.HasPrefix(a, "--") && strings.Contains(a, "="):
			name, val, _ := strings.Cut(a[2:], "=")
			p.Args = append(p.Args, Arg{name, val})
		default:
			p.BadArgs = append(p.BadArgs, a)
		}
	}
	return p, nil
}

// expand replaces $(NAME) with env's value as the kubelet does: unknown
// names stay as written, $$ is a literal $.
func expand(s string, env map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i:], ')')
			if end < 0 {
				b.WriteByte(s[i])
				continue
			}
			name := s[i+2 : i+end]
			if v, ok := env[name]; ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+end+1])
			}
			i += end
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

// Flag returns a flag's value from the arguments or, failing that, from
// BROKER_<FLAG> (the binary's precedence), and where it came from.
func (p *Pod) Flag(name string) (value, source string, ok bool) {
	for i := len(p.Args) - 1; i >= 0; i-- { // the last one wins, as with Go's flag package
		if p.Args[i].Name == name {
			return p.Args[i].Value, "--" + name, true
		}
	}
	if v, ok := p.Env[EnvName(name)]; ok && v != "" {
		return v, EnvName(name), true
	}
	return "", "", false
}

// Mount finds the volume mount that holds file path: the longest mount
// path it is at or under.
func (p *Pod) Mount(file string) (*corev1.VolumeMount, *corev1.Volume) {
	file = path.Clean(file)
	var best *corev1.VolumeMount
	for i := range p.Container.VolumeMounts {
		m := &p.Container.VolumeMounts[i]
		mp := path.Clean(m.MountPath)
		if (file == mp || strings.HasPrefix(file, mp+"/")) && (best == nil || len(mp) > len(best.MountPath)) {
			best = m
		}
	}
	if best == nil {
		return nil, nil
	}
	for i := range p.Spec.Volumes {
		if p.Spec.Volumes[i].Name == best.Name {
			return best, &p.Spec.Volumes[i]
		}
	}
	return best, nil
}

// ContainerPort finds a container port by name (or number) and protocol.
func (p *Pod) ContainerPort(nameOrNumber string, proto corev1.Protocol) *corev1.ContainerPort {
	for i := range p.Container.Ports {
		cp := &p.Container.Ports[i]
		pr := cp.Protocol
		if pr == "" {
			pr = corev1.ProtocolTCP
		}
		if pr != proto {
			continue
		}
		if cp.Name == nameOrNumber || strconv.Itoa(int(cp.ContainerPort)) == nameOrNumber {
			return cp
		}
	}
	return nil
}

// portOf returns the port number of a listen address such as ":1883".
func portOf(addr string) (int, error) {
	_, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(ps)
}

// Conf is what the checks need from a mosquitto.conf; the binary's own
// parser has the last word (the tests start it with the file).
type Conf struct {
	Listeners           int    // listener lines
	MQTTPort, WSPort    int    // 0: no such listener
	PersistenceLocation string // "" when absent
	MessageSizeLimit    int64  // 0 when absent
	Directives          map[string]string
}

// ParseConf reads listener, protocol and a few value directives.
func ParseConf(text string) Conf {
	c := Conf{Directives: map[string]string{}}
	type listener struct {
		port int
		ws   bool
	}
	var ls []listener
	for _, line := range strings.Split(text, "\n") {
		w := strings.Fields(line)
		if len(w) == 0 || strings.HasPrefix(w[0], "#") {
			continue
		}
		val := ""
		if len(w) > 1 {
			val = w[1]
		}
		c.Directives[w[0]] = val
		switch w[0] {
		case "listener":
			port, _ := strconv.Atoi(val)
			ls = append(ls, listener{port: port})
		case "protocol":
			if len(ls) > 0 {
				ls[len(ls)-1].ws = val == "websockets"
			}
		case "persistence_location":
			c.PersistenceLocation = val
		case "message_size_limit":
			c.MessageSizeLimit, _ = strconv.ParseInt(val, 10, 64)
		}
	}
	c.Listeners = len(ls)
	for _, l := range ls {
		switch {
		case l.ws && c.WSPort == 0:
			c.WSPort = l.port
		case !l.ws && c.MQTTPort == 0:
			c.MQTTPort = l.port
		}
	}
	return c
}
