package mosquitto

import (
	"errors"
	"fmt"
	"strconv"
)

// ConfigError reports one problem in a Mosquitto file (mosquitto.conf, an
// included file, the password_file or the acl_file). Msg always says how to fix
// the line, because the person reading it is migrating a working Mosquitto
// deployment and needs to know what to change, not just what is wrong.
//
// Value is the offending value when there is one. It is never set for the
// password_file, so a hash can never end up in a log.
type ConfigError struct {
	File      string
	Line      int // 0 when the problem is not tied to one line (e.g. I/O)
	Directive string
	Value     string
	Msg       string
}

func (e *ConfigError) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc += ":" + strconv.Itoa(e.Line)
	}
	switch {
	case e.Directive != "" && e.Value != "":
		return fmt.Sprintf("%s: %s %q: %s", loc, e.Directive, e.Value, e.Msg)
	case e.Directive != "":
		return fmt.Sprintf("%s: %s: %s", loc, e.Directive, e.Msg)
	default:
		return fmt.Sprintf("%s: %s", loc, e.Msg)
	}
}

// Warning is a directive that was accepted but has no effect in this broker
// (for example log_dest: the broker always logs structured lines to stderr).
// cmd/broker prints warnings at startup so operators can tidy their files.
type Warning struct {
	File      string
	Line      int
	Directive string
	Msg       string
}

func (w Warning) String() string {
	if w.Line == 0 { // about the file as a whole
		return fmt.Sprintf("%s: %s: %s", w.File, w.Directive, w.Msg)
	}
	return fmt.Sprintf("%s:%d: %s: %s", w.File, w.Line, w.Directive, w.Msg)
}

// Source is where a value came from, for messages such as "max_packet_size
// (mosquitto.conf:7) conflicts with --flag".
type Source struct {
	File string
	Line int
}

func (s Source) String() string {
	return fmt.Sprintf("%s:%d", s.File, s.Line)
}

// joinErrors returns nil for none, the error itself for one (so errors.As
// finds a *ConfigError directly), and errors.Join for several.
func joinErrors(errs []error) error {
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	return errors.Join(errs...)
}
