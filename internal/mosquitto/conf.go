package mosquitto

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Listener protocols accepted by the protocol directive.
const (
	ProtocolMQTT       = "mqtt"
	ProtocolWebsockets = "websockets"
)

// Config holds the mosquitto.conf values this broker honours. Defaults are
// Mosquitto 2.0's, so a directive that is absent means what it meant to
// Mosquitto; cmd/broker decides how each maps onto its own flags.
type Config struct {
	// Listeners in file order. The implicit default listener that Mosquitto
	// starts when the deprecated port or bind_address directives are used
	// comes first, with Default set.
	Listeners []Listener

	// AllowAnonymous is the effective value: when allow_anonymous is absent,
	// Mosquitto 2 refuses anonymous clients as soon as any listener is
	// configured (and allows them only in its localhost-only mode when no
	// listener is configured at all; a Warning says so).
	AllowAnonymous          bool
	PasswordFile            string // "" = no password file; path as written (relative to the working directory, as in Mosquitto)
	ACLFile                 string // "" = no ACL: every client may use every topic
	AllowZeroLengthClientID bool
	// PerListenerSettings is accepted only when it cannot change behaviour:
	// with one active listener, or when every listener has the same security
	// settings. The security fields above are then that listener's.
	PerListenerSettings bool

	MessageSizeLimit    int64 // maximum PUBLISH payload in bytes; 0 = no limit
	MaxPacketSize       int64 // maximum packet size in bytes; 0 = no limit
	MaxQueuedMessages   int   // per session, above those in flight; 0 = no limit
	MaxInflightMessages int   // outgoing QoS 1/2 in flight per client; 0 = no limit
	MaxKeepalive        int   // seconds, 10..65535

	Persistence         bool
	PersistenceLocation string // directory holding PersistenceFile; "" = working directory
	PersistenceFile     string

	RetainAvailable bool
	// PersistentClientExpiration removes persistent sessions that have not
	// reconnected for this long; 0 = never.
	PersistentClientExpiration time.Duration
	SysInterval                time.Duration // $SYS update period; 0 = $SYS disabled
	ConnectionMessages         bool          // log client connects and disconnects

	// Sources records where each directive that was set came from (the last
	// occurrence, as in Mosquitto). Keys are directive names.
	Sources map[string]Source
}

// Listener is one listener (or the default listener) from mosquitto.conf.
type Listener struct {
	Port               int
	Bind               string // "" = all interfaces
	Protocol           string // ProtocolMQTT or ProtocolWebsockets
	CertFile           string // TLS is on when CertFile and KeyFile are set
	KeyFile            string
	CAFile             string // CAs that sign client certificates
	RequireCertificate bool
	TLSVersion         string // minimum TLS version: "" (Mosquitto: 1.2), "tlsv1.1", "tlsv1.2", "tlsv1.3"
	MaxConnections     int    // -1 = unlimited
	Default            bool   // started by port/bind_address rather than a listener line
	Source                    // the listener (or first port/bind_address) line
}

// Addr is the listener's host:port, suitable for net.Listen.
func (l Listener) Addr() string {
	return net.JoinHostPort(l.Bind, strconv.Itoa(l.Port))
}

// TLS reports whether the listener serves TLS.
func (l Listener) TLS() bool { return l.CertFile != "" && l.KeyFile != "" }

// maxErrors bounds how many problems one parse reports: enough to fix a file
// in one go, not so many that the first one scrolls away.
const maxErrors = 20

// includeFS is what include_dir needs from a file system. It is an interface
// so the fuzzer can run the parser without touching the real disk.
type includeFS interface {
	// ConfFiles lists the *.conf files of dir (full paths) in any order.
	ConfFiles(dir string) ([]string, error)
	Open(path string) (io.ReadCloser, error)
}

type osFS struct{}

func (osFS) ConfFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		name := e.Name()
		if len(name) <= len(".conf") || !strings.HasSuffix(name, ".conf") {
			continue
		}
		p := filepath.Join(dir, name)
		// Stat follows symlinks: Kubernetes mounts ConfigMap keys as
		// symlinks into a ..data directory, and those must count as files.
		st, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		if st.Mode().IsRegular() {
			out = append(out, p)
		}
	}
	return out, nil
}

func (osFS) Open(path string) (io.ReadCloser, error) { return os.Open(path) }

// ParseConfigFile reads a mosquitto.conf from disk. See ParseConfig.
func ParseConfigFile(path string) (*Config, []Warning, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("open mosquitto config: %w", err)
	}
	defer f.Close()
	return ParseConfig(path, f)
}

// ParseConfig parses a mosquitto.conf. name is used in messages and should be
// the path the operator knows the file by. include_dir directories are read
// from the real file system (relative paths from the working directory, as
// Mosquitto does).
//
// Every directive is either honoured (a Config field), accepted with a
// Warning because it has no effect here (e.g. log_dest), or refused. Unknown
// directives and bad values are refused. The error is a *ConfigError, or
// several joined with errors.Join; use errors.As to inspect the first.
func ParseConfig(name string, r io.Reader) (*Config, []Warning, error) {
	return parseConfig(name, r, osFS{})
}

func parseConfig(name string, r io.Reader, fsys includeFS) (*Config, []Warning, error) {
	p := newConfParser(fsys)
	p.mainFile = name
	p.parseFile(name, r, 0)
	p.finish()
	if len(p.errs) > 0 {
		if len(p.errs) == 1 {
			return nil, p.warnings, p.errs[0]
		}
		return nil, p.warnings, errors.Join(p.errs...)
	}
	return p.cfg, p.warnings, nil
}

// confLine is one directive line, already split into words.
type confLine struct {
	src  Source
	name string
	args []string
}

// securityScope holds the settings Mosquitto makes per-listener when
// per_listener_settings is true.
type securityScope struct {
	set             map[string]Source
	allowAnonymous  bool
	passwordFile    string
	aclFile         string
	allowZeroLength bool
}

func newSecurityScope() *securityScope {
	return &securityScope{set: map[string]Source{}, allowZeroLength: true}
}

// sameAs compares the effective settings, ignoring where they came from.
func (s *securityScope) sameAs(o *securityScope) bool {
	_, a1 := s.set["allow_anonymous"]
	_, a2 := o.set["allow_anonymous"]
	return a1 == a2 && s.allowAnonymous == o.allowAnonymous &&
		s.passwordFile == o.passwordFile && s.aclFile == o.aclFile &&
		s.allowZeroLength == o.allowZeroLength
}

type listenerState struct {
	Listener
	sec *securityScope
	// settings are the listener-scoped lines given before any listener
	// line: they belong to the default listener, which only exists if
	// port or bind_address is used. Kept so finish can warn otherwise.
	settings []confLine
}

type confParser struct {
	fsys     includeFS
	mainFile string
	cfg      *Config
	warnings []Warning
	errs     []error
	dropped  int // errors beyond maxErrors

	def       *listenerState   // the default listener
	defActive bool             // port or bind_address was given
	listeners []*listenerState // explicit listener lines
	cur       *listenerState   // receives listener-scoped directives

	global       *securityScope
	perListener  bool
	securitySeen bool
	inBridge     bool // inside a (refused) bridge block: skip its options quietly
}

func newConfParser(fsys includeFS) *confParser {
	def := &listenerState{
		Listener: Listener{Port: 1883, Protocol: ProtocolMQTT, MaxConnections: -1, Default: true},
		sec:      newSecurityScope(),
	}
	return &confParser{
		fsys: fsys,
		cfg: &Config{
			AllowZeroLengthClientID: true,
			MaxQueuedMessages:       1000,
			MaxInflightMessages:     20,
			MaxKeepalive:            65535,
			PersistenceFile:         "mosquitto.db",
			RetainAvailable:         true,
			SysInterval:             10 * time.Second,
			ConnectionMessages:      true,
			Sources:                 map[string]Source{},
		},
		def:    def,
		cur:    def,
		global: newSecurityScope(),
	}
}

func (p *confParser) fail(l confLine, value, format string, args ...any) {
	if len(p.errs) >= maxErrors {
		p.dropped++
		return
	}
	p.errs = append(p.errs, &ConfigError{
		File: l.src.File, Line: l.src.Line, Directive: l.name, Value: value,
		Msg: fmt.Sprintf(format, args...),
	})
}

func (p *confParser) warn(l confLine, format string, args ...any) {
	p.warnings = append(p.warnings, Warning{
		File: l.src.File, Line: l.src.Line, Directive: l.name, Msg: fmt.Sprintf(format, args...),
	})
}

// maxLineBytes bounds one line; real files have lines of a few dozen bytes.
const maxLineBytes = 64 * 1024

// parseFile reads one file. depth is 0 for the main file and 1 for files
// read through include_dir (which Mosquitto only honours in the main file).
func (p *confParser) parseFile(name string, r io.Reader, depth int) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxLineBytes)
	n := 0
	for sc.Scan() {
		n++
		words := strings.Fields(sc.Text())
		// Mosquitto only knows whole-line comments; a later word starting
		// with '#' is ignored by it too (it reads only the words it needs),
		// so treat it as a trailing comment rather than an extra value.
		for i, w := range words {
			if strings.HasPrefix(w, "#") {
				words = words[:i]
				break
			}
		}
		if len(words) == 0 {
			continue
		}
		p.directive(confLine{src: Source{File: name, Line: n}, name: words[0], args: words[1:]}, depth)
	}
	if err := sc.Err(); err != nil {
		msg := "cannot read the file: " + err.Error()
		if errors.Is(err, bufio.ErrTooLong) {
			msg = fmt.Sprintf("line longer than %d bytes; is this really a mosquitto.conf?", maxLineBytes)
		}
		p.errs = append(p.errs, &ConfigError{File: name, Line: n + 1, Msg: msg})
	}
}

func (p *confParser) directive(l confLine, depth int) {
	if l.name == "include_dir" {
		p.includeDir(l, depth)
		return
	}
	if p.inBridge && bridgeOptions[l.name] {
		return // the connection line already reported the bridge
	}
	p.inBridge = false
	d, ok := directives[l.name]
	if !ok {
		p.unknown(l)
		return
	}
	if d.scope == scopeSecurity {
		p.securitySeen = true
	}
	if d.scope == scopeListener && p.cur == p.def && !p.defActive {
		p.def.settings = append(p.def.settings, l)
	}
	before := len(p.errs) + p.dropped
	d.handle(p, l)
	if len(p.errs)+p.dropped == before {
		p.cfg.Sources[l.name] = l.src
	}
}

func (p *confParser) unknown(l confLine) {
	switch {
	case bridgeOptions[l.name]:
		p.fail(l, "", "only valid inside a bridge (connection) block, and bridges are not supported; remove the line")
	case strings.HasPrefix(l.name, "auth_opt_") || strings.HasPrefix(l.name, "plugin_opt_"):
		p.fail(l, "", "plugins are not supported; remove the plugin and its options and use password_file and acl_file")
	default:
		hint := "check the spelling (directives are lower case) or remove the line"
		if lower := strings.ToLower(l.name); lower != l.name {
			if _, ok := directives[lower]; ok {
				hint = fmt.Sprintf("directives are case sensitive; write %q", lower)
			}
		}
		p.fail(l, "", "unknown directive; %s", hint)
	}
}

func (p *confParser) includeDir(l confLine, depth int) {
	dir, ok := p.oneArg(l, "include_dir /mosquitto/config/conf.d")
	if !ok {
		return
	}
	if depth > 0 {
		p.fail(l, dir, "Mosquitto only honours include_dir in the main configuration file; move it there")
		return
	}
	files, err := p.fsys.ConfFiles(dir)
	if err != nil {
		p.fail(l, dir, "cannot read the directory (%v); check the path (relative paths start from the working directory)", unwrapPathError(err))
		return
	}
	sortIncludes(files)
	for _, f := range files {
		rc, err := p.fsys.Open(f)
		if err != nil {
			p.fail(l, dir, "cannot open %s: %v", f, unwrapPathError(err))
			continue
		}
		p.parseFile(f, rc, depth+1)
		rc.Close()
	}
}

// unwrapPathError drops the path that *fs.PathError repeats, since the
// message already names the file.
func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// sortIncludes orders files like Mosquitto's include_dir: case-insensitively,
// and for letters that differ only in case, upper case first (A.conf,
// a.conf, B.conf, b.conf). Only the base names are compared.
func sortIncludes(paths []string) {
	sort.SliceStable(paths, func(i, j int) bool {
		return includeLess(filepath.Base(paths[i]), filepath.Base(paths[j]))
	})
}

func includeLess(a, b string) bool {
	for i := 0; i < len(a) && i < len(b); i++ {
		ua, ub := upperASCII(a[i]), upperASCII(b[i])
		if ua != ub {
			return ua < ub
		}
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return len(a) < len(b)
}

func upperASCII(c byte) byte {
	if c >= 'a' && c <= 'z' {
		return c - ('a' - 'A')
	}
	return c
}

// finish applies the rules that need the whole file: which listeners run,
// which security settings apply, and TLS consistency.
func (p *confParser) finish() {
	var active []*listenerState
	if p.defActive {
		active = append(active, p.def)
	} else {
		for _, l := range p.def.settings {
			p.warn(l, "applies to Mosquitto's default listener, which only exists when port or bind_address is set; ignored (Mosquitto ignores it too). Move it below the listener it is meant for")
		}
	}
	active = append(active, p.listeners...)

	seen := map[string]Source{}
	for _, ls := range active {
		l := confLine{src: ls.Source, name: "listener"}
		if ls.Default {
			l.name = "port"
		}
		if prev, dup := seen[ls.Addr()]; dup {
			p.fail(l, ls.Addr(), "address already used by the listener at %s; give each listener its own port", prev)
			continue
		}
		seen[ls.Addr()] = ls.Source
		p.checkTLS(l, ls)
		p.cfg.Listeners = append(p.cfg.Listeners, ls.Listener)
	}

	sec := p.global
	if p.perListener {
		sec = p.chooseListenerSecurity(active)
	}
	p.cfg.PerListenerSettings = p.perListener
	p.cfg.PasswordFile = sec.passwordFile
	p.cfg.ACLFile = sec.aclFile
	p.cfg.AllowZeroLengthClientID = sec.allowZeroLength
	if src, ok := sec.set["allow_anonymous"]; ok {
		p.cfg.AllowAnonymous = sec.allowAnonymous
		p.cfg.Sources["allow_anonymous"] = src
	} else if len(active) == 0 {
		p.cfg.AllowAnonymous = true
		p.warnings = append(p.warnings, Warning{
			File: p.mainFile, Directive: "listener",
			Msg: "no listener is configured: Mosquitto 2 would accept anonymous clients from localhost only, " +
				"while this broker listens on --mqtt-addr and accepts anonymous clients there; " +
				"add \"listener 1883\" and \"allow_anonymous false\" with a password_file to require passwords",
		})
	} else {
		// Mosquitto 2 changed the default: with a listener configured and no
		// allow_anonymous line, anonymous clients are refused.
		p.cfg.AllowAnonymous = false
	}

	if p.dropped > 0 {
		p.errs = append(p.errs, fmt.Errorf("%d more problems not shown; fix the ones above first", p.dropped))
	}
}

// chooseListenerSecurity resolves per_listener_settings true: this broker
// has one set of auth settings, so the listeners must agree.
func (p *confParser) chooseListenerSecurity(active []*listenerState) *securityScope {
	if !p.defActive && len(p.def.sec.set) > 0 && len(active) > 0 {
		names := make([]string, 0, len(p.def.sec.set))
		for d := range p.def.sec.set {
			names = append(names, d)
		}
		sort.Strings(names) // deterministic warning order
		for _, d := range names {
			p.warn(confLine{src: p.def.sec.set[d], name: d}, "with per_listener_settings true this applies to the default listener, which is not started; ignored (Mosquitto ignores it too). Move it below a listener line")
		}
	}
	if len(active) == 0 {
		return p.def.sec
	}
	first := active[0]
	for _, ls := range active[1:] {
		if !ls.sec.sameAs(first.sec) {
			p.fail(confLine{src: ls.Source, name: "listener"}, "",
				"per_listener_settings true gives this listener different allow_anonymous/password_file/acl_file/allow_zero_length_clientid settings than the listener at %s, "+
					"but this broker applies one set to every listener; make them identical, or set per_listener_settings false and keep one set", first.Source)
			break
		}
	}
	return first.sec
}

func (p *confParser) checkTLS(l confLine, ls *listenerState) {
	switch {
	case (ls.CertFile == "") != (ls.KeyFile == ""):
		p.fail(l, ls.Addr(), "TLS needs both certfile and keyfile on this listener; add the missing one (or remove both for plain MQTT)")
	case !ls.TLS() && (ls.CAFile != "" || ls.RequireCertificate || ls.TLSVersion != ""):
		p.fail(l, ls.Addr(), "cafile/require_certificate/tls_version only make sense on a TLS listener; add certfile and keyfile, or remove them")
	case ls.RequireCertificate && ls.CAFile == "":
		p.fail(l, ls.Addr(), "require_certificate true needs a cafile to verify client certificates against; add \"cafile /path/ca.crt\"")
	}
}
