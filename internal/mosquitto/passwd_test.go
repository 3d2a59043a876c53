package mosquitto

import (
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"os"
	"strings"
	"testing"
)

// The fixtures in testdata were written by the real mosquitto_passwd 2.0.11:
//
//	mosquitto_passwd -c -b passwd.pbkdf2 alice 'alice-secret'     ($7$, the default)
//	mosquitto_passwd -b passwd.pbkdf2 bob 'b0b:with:colons'
//	mosquitto_passwd -b passwd.pbkdf2 'carol smith' 'pässwörd ✓'
//	mosquitto_passwd -H sha512 -c -b passwd.sha512 alice 'alice-secret'  ($6$)
//	mosquitto_passwd -H sha512 -b passwd.sha512 dave 'dave pw with spaces'
//
// passwd.mixed is passwd.pbkdf2 plus dave ($6$) and a comment line.
var fixturePasswords = map[string]string{
	"alice":       "alice-secret",
	"bob":         "b0b:with:colons",
	"carol smith": "pässwörd ✓",
	"dave":        "dave pw with spaces",
}

func loadPasswd(t *testing.T, path string) *PasswordFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pf, err := ParsePasswordFile(path, f)
	if err != nil {
		t.Fatal(err)
	}
	return pf
}

func TestPasswordFileFixtures(t *testing.T) {
	tests := []struct {
		file  string
		users []string
	}{
		{"testdata/passwd.pbkdf2", []string{"alice", "bob", "carol smith"}},
		{"testdata/passwd.sha512", []string{"alice", "dave"}},
		{"testdata/passwd.mixed", []string{"alice", "bob", "carol smith", "dave"}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			pf := loadPasswd(t, tt.file)
			if pf.Len() != len(tt.users) {
				t.Errorf("Len = %d, want %d", pf.Len(), len(tt.users))
			}
			for _, u := range tt.users {
				pw := fixturePasswords[u]
				if !pf.Has(u) {
					t.Errorf("Has(%q) = false", u)
				}
				if !pf.Verify(u, pw) {
					t.Errorf("Verify(%q, right password) = false", u)
				}
				for _, wrong := range []string{"", pw + "x", strings.ToUpper(pw), pw[:len(pw)-1]} {
					if pf.Verify(u, wrong) {
						t.Errorf("Verify(%q, %q) = true", u, wrong)
					}
				}
			}
			// Another user's password must not work.
			if pf.Verify("alice", "dave pw with spaces") {
				t.Error("alice accepted dave's password")
			}
			if pf.Has("mallory") || pf.Verify("mallory", "") || pf.Verify("mallory", "alice-secret") {
				t.Error("unknown user accepted")
			}
		})
	}
}

// TestPasswordSHA512ByHand checks the $6$ algorithm independently of the
// fixtures: sha512(password || salt).
func TestPasswordSHA512ByHand(t *testing.T) {
	salt := []byte("0123456789ab")
	sum := sha512.Sum512(append([]byte("pw"), salt...))
	line := "u:$6$" + base64.StdEncoding.EncodeToString(salt) + "$" + base64.StdEncoding.EncodeToString(sum[:]) + "\n"
	pf, err := ParsePasswordFile("p", strings.NewReader(line))
	if err != nil {
		t.Fatal(err)
	}
	if !pf.Verify("u", "pw") || pf.Verify("u", "pW") {
		t.Error("sha512(password||salt) not verified correctly")
	}
	var nilFile *PasswordFile
	if nilFile.Verify("u", "pw") || nilFile.Has("u") || nilFile.Len() != 0 {
		t.Error("nil PasswordFile must refuse")
	}
}

func TestParsePasswordFileErrors(t *testing.T) {
	const (
		salt = "whPkjBwxPtvgquyp"
		hash = "cToyDXZVHJP/AS56uAmRhNofwbW0RVlB+WnvB0LH8RNZzYmPGVMv4epQE/2RmgxMt/TRlE5r8xwxINYGhORtvg=="
	)
	good := "alice:$7$101$" + salt + "$" + hash
	tests := []struct {
		name, text, want string
	}{
		{"no colon", "# c\n\nhunter2\n", "passwd:3: expected \"username:hash\" but the line has no ':'"},
		{"empty user", ":$7$101$" + salt + "$" + hash, "passwd:1: empty username"},
		{"no hash", "bob:\n", `passwd:1: user "bob": no password hash`},
		{"plain text", "bob:hunter2\n", `passwd:1: user "bob": password is not hashed (plain text?); hash the file with mosquitto_passwd -U FILE`},
		{"unknown type", "bob:$5$" + salt + "$" + hash, `passwd:1: user "bob": unknown hash type`},
		{"bad iterations", "bob:$7$0$" + salt + "$" + hash, `passwd:1: user "bob": iteration count is not a number from 1 to 10000000`},
		{"huge iterations", "bob:$7$99999999999$" + salt + "$" + hash, `passwd:1: user "bob": iteration count`},
		{"short salt", "bob:$7$101$c2FsdA==$" + hash, `passwd:1: user "bob": salt is not 12 bytes of base64`},
		{"bad hash", "bob:$6$" + salt + "$!!notbase64hunter2", `passwd:1: user "bob": hash is not 64 bytes of base64`},
		{"missing field", "bob:$7$101$" + salt, `passwd:1: user "bob": malformed $7$ hash`},
		{"extra field", "bob:$6$" + salt + "$" + hash + "$x", `passwd:1: user "bob": malformed $6$ hash`},
		{"duplicate", good + "\n" + good + "\n", `passwd:2: user "alice" is already defined on line 1; remove one of the entries`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParsePasswordFile("passwd", strings.NewReader(tt.text))
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("error:\n got %s\nwant prefix %s", err, tt.want)
			}
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.Value != "" {
				t.Errorf("want a *ConfigError without Value, got %#v", err)
			}
			for _, secret := range []string{"hunter2", salt, hash[:20], "c2FsdA"} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error leaks secret material %q: %s", secret, err)
				}
			}
		})
	}
}

func TestParsePasswordFileLenient(t *testing.T) {
	// Surrounding blanks, CRLF, indented comments and unpadded base64 are
	// accepted: they change nothing about who may log in.
	salt := []byte("0123456789ab")
	sum := sha512.Sum512(append([]byte("pw"), salt...))
	text := "  # comment\r\n  u  :  $6$" + base64.RawStdEncoding.EncodeToString(salt) + "$" + base64.RawStdEncoding.EncodeToString(sum[:]) + "  \r\n"
	pf, err := ParsePasswordFile("p", strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if !pf.Verify("u", "pw") {
		t.Error("lenient line not verified")
	}
}

func BenchmarkVerifyPBKDF2(b *testing.B) {
	f, err := os.Open("testdata/passwd.pbkdf2")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	pf, err := ParsePasswordFile("p", f)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		pf.Verify("alice", "alice-secret")
	}
}
