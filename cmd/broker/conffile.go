package main

import (
	"fmt"
	"strings"

	"github.com/mqtt-ha/broker/internal/mosquitto"
)

// configWarning is a directive accepted without effect, logged at start.
type configWarning struct{ where, msg string }

// loadConfigFile applies --config (a mosquitto.conf) to every setting that
// was not given as a flag or environment variable.
func (o *serveOptions) loadConfigFile() error {
	if o.configFile == "" {
		return nil
	}
	mc, warns, err := mosquitto.ParseConfigFile(o.configFile)
	if err != nil {
		return &usageError{source: o.source("config"), msg: err.Error()}
	}
	for _, w := range warns {
		o.warnings = append(o.warnings, configWarning{where: w.File, msg: w.String()})
	}
	// apply sets a flag's value from the file unless a flag or the
	// environment already did; directive names the line that set it.
	apply := func(flagName, directive string, set func()) {
		if _, explicit := o.set[flagName]; explicit {
			return
		}
		src, inFile := mc.Sources[directive]
		if !inFile && directive != "" {
			return
		}
		set()
		if inFile {
			o.fromFile[flagName] = src.String() + " (" + directive + ")"
		} else {
			o.fromFile[flagName] = o.configFile
		}
	}
	c := &o.cfg

	if err := o.applyListeners(mc.Listeners); err != nil {
		return err
	}
	// allow_anonymous: the parser already computed Mosquitto 2's effective
	// value (refused when a listener is configured and the directive is
	// absent), so apply it even when the directive itself is missing.
	apply("allow-anonymous", "", func() { c.AllowAnonymous = mc.AllowAnonymous })
	if s, ok := mc.Sources["allow_anonymous"]; ok {
		if _, explicit := o.set["allow-anonymous"]; !explicit {
			o.fromFile["allow-anonymous"] = s.String() + " (allow_anonymous)"
		}
	}
	apply("password-file", "password_file", func() { c.PasswordFile = mc.PasswordFile })
	apply("acl-file", "acl_file", func() { c.ACLFile = mc.ACLFile })
	// Both limits become the packet limit; the smaller one wins.
	limit := int64(0)
	for _, v := range []int64{mc.MessageSizeLimit, mc.MaxPacketSize} {
		if v > 0 && (limit == 0 || v < limit) {
			limit = v
		}
	}
	if limit > 0 {
		dir := "message_size_limit"
		if mc.MaxPacketSize == limit {
			dir = "max_packet_size"
		}
		apply("message-size-limit", dir, func() { c.MaxPacketSize = uint32(min(limit, 268435460)) })
	}
	apply("max-queued-messages", "max_queued_messages", func() {
		c.MaxQueuedMessages = mc.MaxQueuedMessages
		if c.MaxQueuedMessages <= 0 || c.MaxQueuedMessages > 65535 {
			c.MaxQueuedMessages = 65535 // Mosquitto's 0 is "no limit"; mochi's ceiling is 65535
		}
	})
	apply("max-inflight-messages", "max_inflight_messages", func() { c.MaxInflightMessages = mc.MaxInflightMessages })
	apply("max-keepalive", "max_keepalive", func() { c.MaxKeepalive = uint16(mc.MaxKeepalive) })
	apply("retain-available", "retain_available", func() { c.RetainAvailable = mc.RetainAvailable })
	apply("session-expiry", "persistent_client_expiration", func() { c.SessionExpiry = mc.PersistentClientExpiration })
	apply("persistence", "persistence", func() { c.Persistence = mc.Persistence })
	apply("sys-interval", "sys_interval", func() { c.SysInterval = mc.SysInterval })
	apply("data-dir", "persistence_location", func() { c.DataDir = mc.PersistenceLocation })
	if s, ok := mc.Sources["allow_zero_length_clientid"]; ok && !mc.AllowZeroLengthClientID {
		o.warnings = append(o.warnings, configWarning{where: s.String(),
			msg: "allow_zero_length_clientid false is not enforced: clients without an id get a generated one"})
	}
	return nil
}

// applyListeners maps Mosquitto listeners onto the broker's three: one plain
// MQTT, one WebSocket and one TLS listener.
func (o *serveOptions) applyListeners(ls []mosquitto.Listener) error {
	c := &o.cfg
	seen := map[string]mosquitto.Listener{}
	maxConns := -1
	for _, l := range ls {
		kind, flagName := "mqtt", "mqtt-addr"
		switch {
		case l.Protocol == mosquitto.ProtocolWebsockets && l.TLS():
			return &usageError{source: l.Source.String(), msg: "TLS WebSocket listeners are not supported; terminate TLS in front of the broker (an Ingress) or use a plain websockets listener"}
		case l.Protocol == mosquitto.ProtocolWebsockets:
			kind, flagName = "websockets", "ws-addr"
		case l.TLS():
			kind, flagName = "TLS", "tls-addr"
		}
		if prev, dup := seen[kind]; dup {
			return &usageError{source: l.Source.String(), msg: fmt.Sprintf(
				"a second %s listener (the first is at %s); this broker serves one listener of each kind: remove one, or run it on another port as the same kind", kind, prev.Source)}
		}
		seen[kind] = l
		if l.MaxConnections > 0 {
			maxConns = max(maxConns, l.MaxConnections)
		}
		if _, explicit := o.set[flagName]; explicit {
			continue
		}
		o.fromFile[flagName] = l.Source.String() + " (listener)"
		switch flagName {
		case "mqtt-addr":
			c.MQTTAddr = l.Addr()
		case "ws-addr":
			c.WSAddr = l.Addr()
		case "tls-addr":
			c.TLSAddr, c.TLSCert, c.TLSKey = l.Addr(), l.CertFile, l.KeyFile
			o.fromFile["tls-cert"], o.fromFile["tls-key"] = l.Source.String()+" (certfile)", l.Source.String()+" (keyfile)"
			if l.RequireCertificate {
				c.TLSClientCA = l.CAFile
				o.fromFile["tls-client-ca"] = l.Source.String() + " (cafile)"
			}
			if v := strings.ToLower(l.TLSVersion); v != "" && v != "tlsv1.2" {
				o.warnings = append(o.warnings, configWarning{where: l.Source.String(),
					msg: "tls_version " + l.TLSVersion + " ignored: the broker accepts TLS 1.2 and 1.3"})
			}
		}
	}
	if len(ls) > 0 {
		// A file with listeners but no plain MQTT one means: no plain MQTT.
		if _, ok := seen["mqtt"]; !ok {
			if _, explicit := o.set["mqtt-addr"]; !explicit {
				c.MQTTAddr = ""
			}
		}
	}
	if maxConns > 0 {
		if _, explicit := o.set["max-connections"]; !explicit {
			c.MaxConnections = int64(maxConns)
		}
	}
	return nil
}
