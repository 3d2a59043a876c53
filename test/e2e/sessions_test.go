package e2e

import (
	"fmt"
	"strings"
	"testing"
)

// TestSessionsCommand: `broker sessions` lists an offline persistent
// session with its subscription and queue depth, and a connected client.
func TestSessionsCommand(t *testing.T) {
	t.Parallel()
	b := startBroker(t)
	b.sub(t, "-c", "-i", "kitchen-sensor", "-q", "1", "-t", "home/kitchen/#", "-E").wait(t)
	for _, m := range []string{"1", "2", "3"} {
		b.mustPub(t, "-t", "home/kitchen/temp", "-m", m, "-q", "1")
	}
	b.sub(t, "-i", "dashboard", "-t", "home/#") // stays connected until cleanup
	eventually(t, cliTimeout, func() error {
		r := runCmd(t, cliTimeout, nil, "", brokerBin, "sessions", "--http-addr", b.HTTPAddr)
		mustSucceed(t, r)
		var offline, connected bool
		for _, line := range strings.Split(r.Stdout, "\n") {
			f := strings.Fields(line)
			if len(f) == 7 && f[0] == "kitchen-sensor" && f[2] == "offline" && f[4] == "true" && f[5] == "1" && f[6] == "3" {
				offline = true
			}
			if len(f) == 7 && f[0] == "dashboard" && f[2] == "connected" && f[4] == "false" {
				connected = true
			}
		}
		if !offline || !connected {
			return fmt.Errorf("sessions table lacks the expected rows:\n%s", r.Stdout)
		}
		return nil
	})
}
