package mosquitto

import (
	"bufio"
	"crypto/pbkdf2"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Hash formats written by mosquitto_passwd (Mosquitto 2 defaults to $7$):
//
//	user:$6$<base64 salt>$<base64 sha512(password || salt)>
//	user:$7$<iterations>$<base64 salt>$<base64 pbkdf2-hmac-sha512(password, salt, iterations, 64)>
//
// Mosquitto only accepts a 12-byte salt and a 64-byte hash, so we do too.
const (
	pwSaltLen = 12
	pwHashLen = 64
	// pwMaxIterations stops a hand-edited file from turning every CONNECT
	// into seconds of CPU. mosquitto_passwd writes 101.
	pwMaxIterations = 10_000_000
)

type pwHash uint8

const (
	pwSHA512 pwHash = 6
	pwPBKDF2 pwHash = 7
)

type pwEntry struct {
	kind       pwHash
	iterations int
	salt       []byte
	hash       []byte
	line       int
}

func (e *pwEntry) digest(password string) ([]byte, error) {
	if e.kind == pwPBKDF2 {
		return pbkdf2.Key(sha512.New, password, e.salt, e.iterations, pwHashLen)
	}
	h := sha512.New()
	h.Write([]byte(password))
	h.Write(e.salt)
	return h.Sum(nil), nil
}

// decoyEntry is hashed when the username is unknown so that a failed login
// takes as long for a missing user as for a wrong password: response time
// must not tell an attacker which usernames exist.
var decoyEntry = pwEntry{kind: pwPBKDF2, iterations: 101, salt: make([]byte, pwSaltLen), hash: make([]byte, pwHashLen)}

// PasswordFile is a parsed Mosquitto password_file. It is immutable and safe
// for concurrent use.
type PasswordFile struct {
	users map[string]*pwEntry
}

// Len is the number of users.
func (p *PasswordFile) Len() int {
	if p == nil {
		return 0
	}
	return len(p.users)
}

// Has reports whether username has an entry. It exists so callers can count
// unknown users and wrong passwords separately; it is not needed for Verify.
func (p *PasswordFile) Has(username string) bool {
	if p == nil {
		return false
	}
	_, ok := p.users[username]
	return ok
}

// Verify reports whether password is username's password. The comparison is
// constant-time, and an unknown user costs the same as a wrong password.
func (p *PasswordFile) Verify(username, password string) bool {
	var e *pwEntry
	if p != nil {
		e = p.users[username]
	}
	known := e != nil
	if !known {
		e = &decoyEntry
	}
	sum, err := e.digest(password)
	if err != nil {
		return false
	}
	return subtle.ConstantTimeCompare(sum, e.hash) == 1 && known
}

// ParsePasswordFile parses a file written by mosquitto_passwd. Blank lines and
// lines starting with # are skipped. Unlike Mosquitto, which silently drops
// entries it cannot use, every malformed line, unknown hash type and duplicate
// user is an error naming file and line, so a user cannot be locked out
// without anyone noticing. Error text never contains a password or hash.
func ParsePasswordFile(name string, r io.Reader) (*PasswordFile, error) {
	pf := &PasswordFile{users: map[string]*pwEntry{}}
	var errs []error
	fail := func(line int, msg string, args ...any) {
		if len(errs) < maxErrors {
			errs = append(errs, &ConfigError{File: name, Line: line, Msg: fmt.Sprintf(msg, args...)})
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 256*1024)
	n := 0
	for sc.Scan() {
		n++
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == '#' {
			continue
		}
		user, field, ok := strings.Cut(text, ":")
		user = strings.TrimSpace(user)
		switch {
		case !ok:
			fail(n, "expected \"username:hash\" but the line has no ':'; re-create it with mosquitto_passwd -b FILE USER PASSWORD")
			continue
		case user == "":
			fail(n, "empty username; remove the line or re-create it with mosquitto_passwd -b FILE USER PASSWORD")
			continue
		}
		e, msg := parsePasswordHash(strings.TrimSpace(field))
		if msg != "" {
			fail(n, "user %q: %s", user, msg)
			continue
		}
		if prev, dup := pf.users[user]; dup {
			fail(n, "user %q is already defined on line %d; remove one of the entries", user, prev.line)
			continue
		}
		e.line = n
		pf.users[user] = e
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, &ConfigError{File: name, Line: n + 1, Msg: "cannot read the file: " + err.Error()})
	}
	if err := joinErrors(errs); err != nil {
		return nil, err
	}
	return pf, nil
}

// parsePasswordHash decodes the part after "user:". On failure it returns a
// message that describes the problem without quoting the field.
func parsePasswordHash(field string) (*pwEntry, string) {
	const recreate = "re-create the entry with mosquitto_passwd -b FILE USER PASSWORD"
	if field == "" {
		return nil, "no password hash; " + recreate
	}
	if field[0] != '$' {
		return nil, "password is not hashed (plain text?); hash the file with mosquitto_passwd -U FILE"
	}
	parts := strings.Split(field[1:], "$")
	e := &pwEntry{}
	switch parts[0] {
	case "6":
		if len(parts) != 3 {
			return nil, "malformed $6$ hash (want $6$salt$hash); " + recreate
		}
		e.kind = pwSHA512
		parts = parts[1:]
	case "7":
		if len(parts) != 4 {
			return nil, "malformed $7$ hash (want $7$iterations$salt$hash); " + recreate
		}
		it, err := strconv.Atoi(parts[1])
		if err != nil || it < 1 || it > pwMaxIterations {
			return nil, fmt.Sprintf("iteration count is not a number from 1 to %d; %s", pwMaxIterations, recreate)
		}
		e.kind, e.iterations = pwPBKDF2, it
		parts = parts[2:]
	default:
		return nil, "unknown hash type (want $6$ sha512 or $7$ sha512-pbkdf2, as written by mosquitto_passwd); " + recreate
	}
	var ok bool
	if e.salt, ok = decodeB64(parts[0], pwSaltLen); !ok {
		return nil, fmt.Sprintf("salt is not %d bytes of base64; %s", pwSaltLen, recreate)
	}
	if e.hash, ok = decodeB64(parts[1], pwHashLen); !ok {
		return nil, fmt.Sprintf("hash is not %d bytes of base64; %s", pwHashLen, recreate)
	}
	return e, ""
}

// decodeB64 accepts standard base64 with or without padding (mosquitto_passwd
// pads; hand-made files sometimes do not) and checks the decoded length.
func decodeB64(s string, want int) ([]byte, bool) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		b, err = base64.RawStdEncoding.DecodeString(s)
	}
	return b, err == nil && len(b) == want
}
