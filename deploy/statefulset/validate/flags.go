package validate

import (
	"bytes"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
)

// Flags are the flags of `broker serve` with their defaults, as the binary
// itself lists them: the manifests are checked against what the build
// really accepts, not against a copy of it here.
type Flags map[string]string // name -> default ("" when none is shown)

var (
	flagLine    = regexp.MustCompile(`^  -([a-z0-9-]+)(?: (\w+))?`)
	defaultTail = regexp.MustCompile(`\(default (.*)\)$`)
)

// ReadFlags runs `bin serve -h` and parses Go's flag.PrintDefaults output.
func ReadFlags(bin string) (Flags, error) {
	var out bytes.Buffer
	cmd := exec.Command(bin, "serve", "-h")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s serve -h: %w\n%s", bin, err, out.String())
	}
	return ParseFlags(out.String())
}

// ParseFlags reads flag.PrintDefaults output: "  -name type" lines, each
// followed by its usage, whose last line may end in "(default X)". The
// flag package quotes a string flag's default; an unquoted "(default ...)"
// of a string flag is the usage's own prose ("default off") and does not
// count.
func ParseFlags(help string) (Flags, error) {
	f := Flags{}
	cur, typ := "", ""
	for _, line := range strings.Split(help, "\n") {
		if m := flagLine.FindStringSubmatch(line); m != nil {
			cur, typ = m[1], m[2]
			f[cur] = ""
			continue
		}
		if cur == "" {
			continue
		}
		if m := defaultTail.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
			d := m[1]
			u, err := strconv.Unquote(d)
			switch {
			case err == nil:
				d = u
			case typ == "string":
				continue
			}
			f[cur] = d
		}
	}
	if len(f) == 0 {
		return nil, fmt.Errorf("no flags found in:\n%s", help)
	}
	return f, nil
}

// EnvName is the environment variable that also sets a flag.
func EnvName(flag string) string {
	return "BROKER_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}
