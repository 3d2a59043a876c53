package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// artifactDir is where tests leave files for CI to keep (bin/ at the
// repository root, beside bin/test-output.txt).
const artifactDir = "../../bin/e2e-artifacts"

// chromium runs Debian's headless Chromium with args, the flags that keep
// it off the network (only the page's own loopback address is reached)
// and a fresh profile.
func chromium(t *testing.T, args ...string) cliResult {
	t.Helper()
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium not found (%v): install Debian's chromium (make test does)", err)
	}
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
		"--user-data-dir=" + t.TempDir(), "--virtual-time-budget=6000"}
	return runCmd(t, 90*time.Second, nil, "", bin, append(base, args...)...)
}

// TestStatusPageInChromium: the status page of a three-node cluster,
// loaded by headless Chromium from one node, shows the three members
// alive and the raft leader the API reports. Screenshots (desktop and
// phone widths) are kept in bin/e2e-artifacts.
//
// Not parallel: Chromium takes both cores for seconds at each start, and
// beside other tests' clusters it starved them (a leader lost its quorum
// contact while the screenshots were taken).
func TestStatusPageInChromium(t *testing.T) {
	nodes := startVoters(t, 3)
	lead, _ := leaderAndOthers(t, nodes)
	url := "http://" + nodes[1].HTTPAddr + "/"

	var dom string
	eventually(t, 60*time.Second, func() error {
		r := chromium(t, "--dump-dom", url)
		if r.ExitCode != 0 {
			return stopPolling(fmt.Errorf("chromium failed:\n%s", r))
		}
		dom = r.Stdout
		alive := regexp.MustCompile(`<tr class="member" data-id="[^"]+" data-state="alive">`).FindAllString(dom, -1)
		leader := regexp.MustCompile(`<b id="leader">([^<]*)</b>`).FindStringSubmatch(dom)
		if len(alive) != 3 || leader == nil || leader[1] != lead.ID {
			return fmt.Errorf("%d members alive, leader %v (want 3 and %s)", len(alive), leader, lead.ID)
		}
		// The whole page rendered: no error banner (a node without
		// warnings once broke the rendering after the members table), the
		// sessions and the rates of two polls.
		if strings.Contains(dom, `style="display: block;"`) || !strings.Contains(dom, "<dt>queued messages</dt>") ||
			!regexp.MustCompile(`<b id="rate-in">[0-9.]+</b>`).MatchString(dom) {
			return stopPolling(fmt.Errorf("the page did not render whole:\n%s", dom))
		}
		return nil
	})
	for _, want := range []string{nodes[0].ID, nodes[1].ID + " (this node)", nodes[2].ID, "Recent warnings"} {
		if !strings.Contains(dom, want) {
			t.Fatalf("the page lacks %q:\n%s", want, dom)
		}
	}

	if err := os.MkdirAll(artifactDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, size := range map[string]string{"status-page.png": "1280,900", "status-page-phone.png": "390,1400"} {
		file, _ := filepath.Abs(filepath.Join(artifactDir, name))
		_ = os.Remove(file)
		mustSucceed(t, chromium(t, "--hide-scrollbars", "--window-size="+size, "--screenshot="+file, url))
		b, err := os.ReadFile(file)
		if err != nil || len(b) < 1000 || !bytes.HasPrefix(b, []byte("\x89PNG")) {
			t.Fatalf("screenshot %s: %d bytes, %v", file, len(b), err)
		}
		t.Logf("screenshot: %s", file)
	}
}
