package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// TestImportMosquitto: the migration from a single Mosquitto. Debian's
// mosquitto, with persistence, gets retained messages (MQTT 3.1.1 and 5
// with properties) and two offline persistent sessions with queued QoS 1
// and 2 messages; it is stopped (it writes mosquitto.db), and `broker
// import-mosquitto` loads the file into a three-node cluster. Every node
// serves the retained messages; each session resumes on a node other than
// the one that imported it, with its queue in order, and its
// subscription takes new messages. A second run imports nothing; a
// truncated file imports nothing unless --partial.
func TestImportMosquitto(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	host, port, mq := startMosquitto(t, "persistence true\npersistence_location "+dir+"/\n")
	on := []string{"-h", host, "-p", port}
	pub := func(args ...string) { t.Helper(); mustSucceed(t, mosquittoPub(t, "", append(on, args...)...)) }
	pub("-q", "1", "-r", "-t", "mig/ret/a", "-m", "retained A")
	pub("-V", "5", "-q", "1", "-r", "-t", "mig/ret/b", "-m", "retained B", "-D", "publish", "content-type", "text/plain")
	// Mosquitto takes "$sys/..." (only "$SYS" is its own); mochi refuses
	// it: skipped with the reason, and the import goes on.
	pub("-q", "1", "-r", "-t", "$sys/lower", "-m", "not here")
	for _, s := range [][]string{
		{"-i", "mig-v3", "-q", "1", "-t", "mig/q3/#"},
		{"-V", "5", "-i", "mig-v5", "-x", "3600", "-q", "2", "-t", "mig/q5/#"},
	} {
		mustSucceed(t, runCmd(t, cliTimeout, nil, "", lookPath(t, "mosquitto_sub"), append(append(on, "-c", "-E"), s...)...))
	}
	for i := range 3 {
		pub("-q", "1", "-t", "mig/q3/x", "-m", fmt.Sprintf("v3-%d", i))
	}
	pub("-V", "5", "-q", "2", "-t", "mig/q5/y", "-m", "v5-0")
	if err := mq.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = mq.Wait()
	file := dir + "/mosquitto.db"
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("mosquitto wrote no persistence file: %v", err)
	}

	nodes := startVoters(t, 3)
	truncated := t.TempDir() + "/truncated.db"
	writeFile(t, truncated, string(raw[:len(raw)-5]))
	if r := brokerCLI(t, "import-mosquitto", "--http-addr", nodes[0].HTTPAddr, "--db", truncated); r.ExitCode != 1 ||
		!strings.Contains(r.Stderr, "corrupt or truncated") || !strings.Contains(r.Stderr, "nothing imported") {
		t.Fatalf("a truncated file:\n%s", r)
	}
	type importReport struct {
		Retained        int      `json:"retained"`
		RetainedPresent int      `json:"retained_present"`
		Sessions        int      `json:"sessions"`
		SessionsPresent int      `json:"sessions_present"`
		Subscriptions   int      `json:"subscriptions"`
		Queued          int      `json:"queued"`
		Skipped         []string `json:"skipped"`
	}
	var report importReport
	importJSON := func(stdin string, args ...string) {
		t.Helper()
		r := runCmd(t, cliTimeout, nil, stdin, brokerBin, append([]string{"import-mosquitto", "--http-addr", nodes[0].HTTPAddr, "--json"}, args...)...)
		mustSucceed(t, r)
		report = importReport{}
		if err := json.Unmarshal([]byte(r.Stdout), &report); err != nil {
			t.Fatalf("%v:\n%s", err, r)
		}
	}
	// Nothing of the truncated file reached the cluster.
	if r := brokerCLI(t, "retained", "--http-addr", nodes[1].HTTPAddr, "--json"); strings.Contains(r.Stdout, "mig/") {
		t.Fatalf("the refused import wrote something:\n%s", r)
	}

	importJSON("", "--db", file)
	if report.Retained != 2 || report.Sessions != 2 || report.Subscriptions != 2 || report.Queued != 4 ||
		len(report.Skipped) != 1 || !strings.Contains(report.Skipped[0], "$sys/lower") {
		t.Fatalf("first import: %+v", report)
	}
	importJSON(string(raw), "--db", "-") // as through kubectl exec -i (docs/kubernetes.md)
	if report.Retained != 0 || report.RetainedPresent != 2 || report.Sessions != 0 || report.SessionsPresent != 2 {
		t.Fatalf("second import: %+v", report)
	}
	importJSON("", "--db", truncated, "--partial")
	if report.Retained != 0 || len(report.Skipped) == 0 || !strings.Contains(strings.Join(report.Skipped, "\n"), "truncated") {
		t.Fatalf("--partial import of a truncated file: %+v", report)
	}

	for _, b := range nodes {
		got := b.sub(t, "-q", "1", "-t", "mig/ret/#", "-C", "2", "-W", "10").wait(t)
		// Retained messages of several topics come in no set order.
		slices.SortFunc(got, func(a, b message) int { return strings.Compare(a.Topic, b.Topic) })
		assertMessages(t, got, msg("mig/ret/a", 1, true, "retained A"), msg("mig/ret/b", 1, true, "retained B"))
	}
	v3 := nodes[1].sub(t, "-c", "-i", "mig-v3", "-q", "1", "-t", "mig/q3/#", "-C", "4", "-W", "15")
	nodes[2].mustPub(t, "-q", "1", "-t", "mig/q3/x", "-m", "after")
	assertMessages(t, v3.wait(t), msg("mig/q3/x", 1, false, "v3-0"), msg("mig/q3/x", 1, false, "v3-1"),
		msg("mig/q3/x", 1, false, "v3-2"), msg("mig/q3/x", 1, false, "after"))
	v5 := nodes[2].sub(t, "-V", "5", "-c", "-i", "mig-v5", "-x", "3600", "-q", "2", "-t", "mig/q5/#", "-C", "1", "-W", "15")
	assertMessages(t, v5.wait(t), msg("mig/q5/y", 2, false, "v5-0"))
}
