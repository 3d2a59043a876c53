package mosquitto

import (
	"math"
	"strconv"
	"time"
)

// scope says where a directive's value goes, following Mosquitto.
type scope int

const (
	scopeGlobal   scope = iota
	scopeSecurity       // per listener when per_listener_settings is true
	scopeListener       // the current listener (the default one before any listener line)
	scopeSpecial        // listener, port, bind_address: handled by their own code
)

type directive struct {
	scope  scope
	handle func(p *confParser, l confLine)
}

// mqttMaxPayload is the largest payload MQTT can carry; Mosquitto refuses a
// larger message_size_limit (so 268435456, "256 MB", is an error there too).
const mqttMaxPayload = 268435455

// directives is every directive this broker knows. Each entry decides:
// honoured (stored in Config), harmless (Warning), or refused (error with a
// fix). Anything not listed is an unknown-directive error.
var directives = map[string]directive{
	// Listeners.
	"listener":     {scopeSpecial, (*confParser).listener},
	"port":         {scopeSpecial, (*confParser).port},
	"bind_address": {scopeSpecial, (*confParser).bindAddress},
	"protocol": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.oneArg(l, "protocol websockets"); ok {
			if v != ProtocolMQTT && v != ProtocolWebsockets {
				p.fail(l, v, "unknown protocol; use \"protocol mqtt\" or \"protocol websockets\"")
				return
			}
			p.cur.Protocol = v
		}
	}},
	"certfile": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.oneArg(l, "certfile /mosquitto/certs/server.crt"); ok {
			p.cur.CertFile = v
		}
	}},
	"keyfile": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.oneArg(l, "keyfile /mosquitto/certs/server.key"); ok {
			p.cur.KeyFile = v
		}
	}},
	"cafile": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.oneArg(l, "cafile /mosquitto/certs/ca.crt"); ok {
			p.cur.CAFile = v
		}
	}},
	"require_certificate": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok {
			p.cur.RequireCertificate = v
		}
	}},
	"tls_version": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.oneArg(l, "tls_version tlsv1.2"); ok {
			switch v {
			case "tlsv1.1", "tlsv1.2", "tlsv1.3":
				p.cur.TLSVersion = v
			default:
				p.fail(l, v, "unknown TLS version; use tlsv1.1, tlsv1.2 or tlsv1.3")
			}
		}
	}},
	"max_connections": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, math.MinInt32, math.MaxInt32, "a number of connections", "max_connections -1"); ok {
			if v < 0 {
				v = -1 // Mosquitto treats every negative value as unlimited
			}
			p.cur.MaxConnections = int(v)
		}
	}},
	"use_identity_as_username": {scopeListener, refuseTrue("client-certificate identities as usernames are not supported; authenticate with password_file instead")},
	"use_subject_as_username":  {scopeListener, refuseTrue("client-certificate subjects as usernames are not supported; authenticate with password_file instead")},
	"use_username_as_clientid": {scopeListener, refuseTrue("not supported; remove the line (clients keep their own client ids)")},
	"max_qos": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, 0, 2, "a QoS (0, 1 or 2)", "max_qos 2"); ok && v != 2 {
			p.fail(l, l.args[0], "limiting QoS per listener is not supported; remove the line (QoS 2 is allowed)")
		}
	}},
	"max_topic_alias": {scopeListener, func(p *confParser, l confLine) {
		if _, ok := p.intArg(l, 0, 65535, "a number of aliases", "max_topic_alias 10"); ok {
			p.warn(l, "ignored: the broker's own topic alias maximum applies to every listener")
		}
	}},
	"socket_domain": {scopeListener, func(p *confParser, l confLine) {
		if v, ok := p.oneArg(l, "socket_domain ipv4"); ok {
			if v != "ipv4" && v != "ipv6" {
				p.fail(l, v, "use \"socket_domain ipv4\" or \"socket_domain ipv6\"")
				return
			}
			p.warn(l, "ignored: the listener address decides the IP version (use an IPv4 or IPv6 bind address)")
		}
	}},
	"ciphers":               {scopeListener, warnArgs("ignored: Go's TLS stack chooses its own secure cipher suites")},
	"ciphers_tls1.3":        {scopeListener, warnArgs("ignored: Go's TLS stack chooses its own secure cipher suites")},
	"dhparamfile":           {scopeListener, warnArgs("ignored: Go's TLS stack uses ECDHE key exchange and needs no DH parameters")},
	"capath":                {scopeListener, refuse("not supported; concatenate the CA certificates into one PEM file and use cafile")},
	"crlfile":               {scopeListener, refuse("certificate revocation lists are not supported; remove the line and rotate the CA instead")},
	"psk_hint":              {scopeListener, refuse("TLS-PSK is not supported by Go's TLS stack; use certificates (certfile/keyfile)")},
	"tls_engine":            {scopeListener, refuse("OpenSSL engines are not supported; use PEM files with certfile/keyfile")},
	"tls_keyform":           {scopeListener, refuse("OpenSSL engines are not supported; use PEM files with certfile/keyfile")},
	"tls_engine_kpass_sha1": {scopeListener, refuse("OpenSSL engines are not supported; use PEM files with certfile/keyfile")},
	"mount_point":           {scopeListener, refuse("mount points are not supported; remove the line and use full topic names in clients and the acl_file")},
	"http_dir":              {scopeListener, refuse("serving files over the websockets listener is not supported; serve them with a separate web server")},
	"bind_interface":        {scopeListener, refuse("not supported; use the interface's address as the listener's bind address instead")},

	// Security (per listener with per_listener_settings true).
	"allow_anonymous": {scopeSecurity, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok {
			s := p.security()
			s.allowAnonymous = v
			s.set[l.name] = l.src
		}
	}},
	"allow_zero_length_clientid": {scopeSecurity, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok {
			s := p.security()
			s.allowZeroLength = v
			s.set[l.name] = l.src
		}
	}},
	"password_file": {scopeSecurity, func(p *confParser, l confLine) {
		s := p.security()
		if v, ok := p.uniquePath(l, s.set, "password_file /mosquitto/config/passwd"); ok {
			s.passwordFile = v
		}
	}},
	"acl_file": {scopeSecurity, func(p *confParser, l confLine) {
		s := p.security()
		if v, ok := p.uniquePath(l, s.set, "acl_file /mosquitto/config/acl"); ok {
			s.aclFile = v
		}
	}},
	"auto_id_prefix": {scopeSecurity, func(p *confParser, l confLine) {
		if _, ok := p.oneArg(l, "auto_id_prefix auto-"); ok {
			p.warn(l, "ignored: client ids the broker assigns have no prefix")
		}
	}},
	"psk_file":    {scopeSecurity, refuse("TLS-PSK is not supported by Go's TLS stack; use certificates (certfile/keyfile)")},
	"auth_plugin": {scopeSecurity, refuse("plugins are not supported; use password_file and acl_file")},
	"plugin":      {scopeSecurity, refuse("plugins (including dynamic security) are not supported; use password_file and acl_file")},
	"auth_plugin_deny_special_chars": {scopeSecurity, func(p *confParser, l confLine) {
		if _, ok := p.boolArg(l); ok {
			p.warn(l, "ignored: there are no plugins; pattern ACLs always refuse client ids and usernames containing + or #")
		}
	}},
	"per_listener_settings": {scopeGlobal, func(p *confParser, l confLine) {
		v, ok := p.boolArg(l)
		if !ok {
			return
		}
		if p.securitySeen {
			p.fail(l, l.args[0], "must be set before any other security setting (as in Mosquitto); move it to the top of the file")
			return
		}
		p.perListener = v
	}},
	"clientid_prefixes": {scopeGlobal, refuse("not supported (deprecated in Mosquitto); remove the line and restrict clients with password_file and acl_file")},

	// Limits.
	"message_size_limit": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, 0, mqttMaxPayload, "a number of bytes", "message_size_limit 268435455"); ok {
			p.cfg.MessageSizeLimit = v
		}
	}},
	"max_packet_size": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, 20, math.MaxUint32, "a number of bytes (at least 20)", "max_packet_size 268435460"); ok {
			p.cfg.MaxPacketSize = v
		}
	}},
	"max_queued_messages": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, math.MinInt32, math.MaxInt32, "a number of messages", "max_queued_messages 1000"); ok {
			p.cfg.MaxQueuedMessages = p.noLimitIfNegative(l, v)
		}
	}},
	"max_inflight_messages": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, math.MinInt32, 65535, "a number of messages (at most 65535)", "max_inflight_messages 20"); ok {
			p.cfg.MaxInflightMessages = p.noLimitIfNegative(l, v)
		}
	}},
	"max_queued_bytes":   {scopeGlobal, warnIfPositive("not enforced: only max_queued_messages limits session queues; set it to 0 or remove the line")},
	"max_inflight_bytes": {scopeGlobal, warnIfPositive("not enforced: only max_inflight_messages limits messages in flight; set it to 0 or remove the line")},
	"max_keepalive": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, 10, 65535, "a number of seconds from 10 to 65535", "max_keepalive 65535"); ok {
			p.cfg.MaxKeepalive = int(v)
		}
	}},
	"memory_limit": {scopeGlobal, func(p *confParser, l confLine) {
		if _, ok := p.intArg(l, 0, math.MaxInt64, "a number of bytes", "memory_limit 0"); ok {
			p.warn(l, "ignored: limit the container's memory instead")
		}
	}},

	// Persistence and sessions.
	"persistence": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok {
			p.cfg.Persistence = v
		}
	}},
	"persistence_location": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.uniquePath(l, p.cfg.Sources, "persistence_location /mosquitto/data/"); ok {
			p.cfg.PersistenceLocation = v
		}
	}},
	"persistence_file": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.uniquePath(l, p.cfg.Sources, "persistence_file mosquitto.db"); ok {
			p.cfg.PersistenceFile = v
		}
	}},
	"autosave_interval": {scopeGlobal, func(p *confParser, l confLine) {
		if _, ok := p.intArg(l, math.MinInt32, math.MaxInt32, "a number of seconds", "autosave_interval 1800"); ok {
			p.warn(l, "ignored: every acknowledged write is already stored through the replicated log")
		}
	}},
	"autosave_on_changes": {scopeGlobal, func(p *confParser, l confLine) {
		if _, ok := p.boolArg(l); ok {
			p.warn(l, "ignored: every acknowledged write is already stored through the replicated log")
		}
	}},
	"persistent_client_expiration": {scopeGlobal, func(p *confParser, l confLine) {
		v, ok := p.oneArg(l, "persistent_client_expiration 14d")
		if !ok {
			return
		}
		d, ok := parseExpiration(v)
		if !ok {
			p.fail(l, v, "not a duration; use a positive whole number followed by h (hours), d (days), w (weeks), m (months of 30 days) or y (years), e.g. \"persistent_client_expiration 14d\"")
			return
		}
		p.cfg.PersistentClientExpiration = d
	}},
	"retain_available": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok {
			p.cfg.RetainAvailable = v
		}
	}},
	"queue_qos0_messages": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok && v {
			p.warn(l, "ignored: QoS 0 messages are not queued for offline clients (the MQTT default); use QoS 1 where messages must wait")
		}
	}},
	"upgrade_outgoing_qos": {scopeGlobal, refuseTrue("not supported (a non-standard option); remove the line: messages are delivered at min(publish QoS, subscription QoS)")},
	"check_retain_source": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok && v {
			p.warn(l, "ignored: retained messages are checked against the subscriber's read access, not against the publisher's current write access")
		}
	}},
	"allow_duplicate_messages": {scopeGlobal, func(p *confParser, l confLine) {
		if _, ok := p.boolArg(l); ok {
			p.warn(l, "ignored (deprecated in Mosquitto): a client with overlapping subscriptions gets each message once")
		}
	}},
	"retry_interval": {scopeGlobal, warnArgs("ignored: no longer available in Mosquitto 2 either")},

	// Logging, $SYS and process settings.
	"sys_interval": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, 0, math.MaxInt32, "a number of seconds", "sys_interval 10"); ok {
			p.cfg.SysInterval = time.Duration(v) * time.Second
		}
	}},
	"connection_messages": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok {
			p.cfg.ConnectionMessages = v
		}
	}},
	"log_dest":             {scopeGlobal, warnArgs("ignored: the broker logs structured lines to stderr")},
	"log_type":             {scopeGlobal, warnArgs("ignored: the broker sets its own log levels (connection_messages is honoured)")},
	"log_timestamp_format": {scopeGlobal, warnArgs("ignored: log lines always carry an RFC 3339 timestamp")},
	"log_facility":         {scopeGlobal, warnArgs("ignored: the broker does not log to syslog")},
	"log_timestamp":        {scopeGlobal, warnBool("ignored: log lines always carry a timestamp")},
	"set_tcp_nodelay": {scopeGlobal, func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok && !v {
			p.warn(l, "ignored: Go always sets TCP_NODELAY on client sockets")
		}
	}},
	"user":                    {scopeGlobal, warnArgs("ignored: the broker does not change user; set the pod's securityContext (runAsUser) instead")},
	"pid_file":                {scopeGlobal, warnArgs("ignored: the broker writes no pid file")},
	"websockets_log_level":    {scopeGlobal, warnArgs("ignored: websockets are served by Go's HTTP stack")},
	"websockets_headers_size": {scopeGlobal, warnArgs("ignored: websockets are served by Go's HTTP stack")},

	// Bridges: the connection line reports them once; their options are
	// skipped while inside the block (see bridgeOptions).
	"connection": {scopeGlobal, func(p *confParser, l confLine) {
		p.fail(l, "", "bridges are not supported; remove this connection block (the cluster replaces bridging between brokers)")
		p.inBridge = true
	}},
}

// bridgeOptions are only valid after a connection line.
var bridgeOptions = map[string]bool{
	"address": true, "addresses": true, "bridge_attempt_unsubscribe": true, "bridge_bind_address": true,
	"bridge_cafile": true, "bridge_capath": true, "bridge_certfile": true, "bridge_keyfile": true,
	"bridge_identity": true, "bridge_insecure": true, "bridge_max_packet_size": true,
	"bridge_outgoing_retain": true, "bridge_protocol_version": true, "bridge_psk": true,
	"bridge_require_ocsp": true, "bridge_tls_version": true, "bridge_alpn": true,
	"cleansession": true, "local_cleansession": true, "idle_timeout": true, "keepalive_interval": true,
	"local_clientid": true, "local_password": true, "local_username": true, "notifications": true,
	"notifications_local_only": true, "notification_topic": true, "remote_clientid": true,
	"remote_password": true, "remote_username": true, "restart_timeout": true, "round_robin": true,
	"start_type": true, "threshold": true, "topic": true, "try_private": true,
	"clientid": true, "username": true, "password": true,
}

func (p *confParser) security() *securityScope {
	if p.perListener {
		return p.cur.sec
	}
	return p.global
}

func (p *confParser) listener(l confLine) {
	const example = "listener 1883"
	if len(l.args) == 0 || len(l.args) > 2 {
		p.fail(l, "", "expects a port and an optional bind address; use e.g. %q or \"listener 1883 0.0.0.0\"", example)
		return
	}
	port, err := strconv.Atoi(l.args[0])
	switch {
	case err == nil && port == 0:
		p.fail(l, l.args[0], "unix socket listeners are not supported; use a TCP port, e.g. %q", example)
		return
	case err != nil || port < 1 || port > 65535:
		p.fail(l, l.args[0], "not a TCP port (1-65535); use e.g. %q", example)
		return
	}
	ls := &listenerState{
		Listener: Listener{Port: port, Protocol: ProtocolMQTT, MaxConnections: -1, Source: l.src},
		sec:      newSecurityScope(),
	}
	if len(l.args) == 2 {
		ls.Bind = l.args[1]
	}
	p.listeners = append(p.listeners, ls)
	p.cur = ls
}

func (p *confParser) port(l confLine) {
	v, ok := p.intArg(l, 1, 65535, "a TCP port (1-65535)", "listener 1883")
	if !ok {
		return
	}
	p.activateDefault(l)
	p.def.Port = int(v)
	p.warn(l, "deprecated in Mosquitto; prefer \"listener %d\"", v)
}

func (p *confParser) bindAddress(l confLine) {
	v, ok := p.oneArg(l, "listener 1883 127.0.0.1")
	if !ok {
		return
	}
	p.activateDefault(l)
	p.def.Bind = v
	p.warn(l, "deprecated in Mosquitto; prefer \"listener %d %s\"", p.def.Port, v)
}

func (p *confParser) activateDefault(l confLine) {
	if !p.defActive {
		p.defActive = true
		p.def.Source = l.src
	}
}

// oneArg returns the single value of a directive.
func (p *confParser) oneArg(l confLine, example string) (string, bool) {
	switch {
	case len(l.args) == 0:
		p.fail(l, "", "missing value; use e.g. %q", example)
		return "", false
	case len(l.args) > 1:
		p.fail(l, l.args[1], "unexpected extra value (values cannot contain spaces); use e.g. %q", example)
		return "", false
	}
	return l.args[0], true
}

func (p *confParser) boolArg(l confLine) (bool, bool) {
	v, ok := p.oneArg(l, l.name+" true")
	if !ok {
		return false, false
	}
	switch v {
	case "true":
		return true, true
	case "false":
		return false, true
	}
	p.fail(l, v, "not a boolean; use %q or %q", l.name+" true", l.name+" false")
	return false, false
}

func (p *confParser) intArg(l confLine, lo, hi int64, what, example string) (int64, bool) {
	s, ok := p.oneArg(l, example)
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		p.fail(l, s, "not %s; use e.g. %q", what, example)
		return 0, false
	}
	if v < lo || v > hi {
		p.fail(l, s, "out of range (%d to %d); use e.g. %q", lo, hi, example)
		return 0, false
	}
	return v, true
}

// uniquePath refuses a second occurrence, as Mosquitto does for files.
func (p *confParser) uniquePath(l confLine, set map[string]Source, example string) (string, bool) {
	v, ok := p.oneArg(l, example)
	if !ok {
		return "", false
	}
	if prev, dup := set[l.name]; dup {
		p.fail(l, v, "already set at %s; keep only one", prev)
		return "", false
	}
	set[l.name] = l.src
	return v, true
}

func (p *confParser) noLimitIfNegative(l confLine, v int64) int {
	if v < 0 {
		p.warn(l, "a negative value means no limit; write 0 instead")
		return 0
	}
	return int(v)
}

func refuse(msg string) func(*confParser, confLine) {
	return func(p *confParser, l confLine) { p.fail(l, "", "%s", msg) }
}

// refuseTrue accepts "false" (the default, so harmless) and refuses "true".
func refuseTrue(msg string) func(*confParser, confLine) {
	return func(p *confParser, l confLine) {
		if v, ok := p.boolArg(l); ok && v {
			p.fail(l, "true", "%s", msg)
		}
	}
}

func warnArgs(msg string) func(*confParser, confLine) {
	return func(p *confParser, l confLine) {
		if len(l.args) == 0 {
			p.fail(l, "", "missing value; remove the line (%s)", msg)
			return
		}
		p.warn(l, "%s", msg)
	}
}

func warnBool(msg string) func(*confParser, confLine) {
	return func(p *confParser, l confLine) {
		if _, ok := p.boolArg(l); ok {
			p.warn(l, "%s", msg)
		}
	}
}

func warnIfPositive(msg string) func(*confParser, confLine) {
	return func(p *confParser, l confLine) {
		if v, ok := p.intArg(l, math.MinInt64, math.MaxInt64, "a number of bytes", l.name+" 0"); ok && v > 0 {
			p.warn(l, "%s", msg)
		}
	}
}

// parseExpiration reads Mosquitto's duration syntax: a positive integer and
// one unit letter, where m is a 30-day month (not a minute) and y 365 days.
func parseExpiration(s string) (time.Duration, bool) {
	if len(s) < 2 {
		return 0, false
	}
	var unit time.Duration
	switch s[len(s)-1] {
	case 'h':
		unit = time.Hour
	case 'd':
		unit = 24 * time.Hour
	case 'w':
		unit = 7 * 24 * time.Hour
	case 'm':
		unit = 30 * 24 * time.Hour
	case 'y':
		unit = 365 * 24 * time.Hour
	default:
		return 0, false
	}
	n, err := strconv.ParseInt(s[:len(s)-1], 10, 64)
	if err != nil || n <= 0 || n > int64(math.MaxInt64/unit) {
		return 0, false
	}
	return time.Duration(n) * unit, true
}
