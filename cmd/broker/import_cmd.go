package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/mqtt-ha/broker/internal/mosquitto"
	"github.com/mqtt-ha/broker/internal/node"
	"github.com/mqtt-ha/broker/replication"
)

// importCmd runs `broker import-mosquitto --db mosquitto.db`: the retained
// messages and persistent sessions (subscriptions, queued QoS 1/2
// messages) of a Mosquitto 2.x persistence file, written into a running
// cluster through its log. The file is read whole before anything is
// sent: a damaged one imports nothing unless --partial. The node skips
// what the cluster already holds, so a second run imports nothing again.
func importCmd(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	a := newAdminFlags("broker import-mosquitto", getenv, stderr)
	dbPath := a.fs.String("db", "", "Mosquitto persistence file (mosquitto.db; - for standard input)")
	partial := a.fs.Bool("partial", false, "import what a damaged file holds before the damage")
	dryRun := a.fs.Bool("dry-run", false, "read the file and print what would be imported; send nothing")
	if err := a.fs.Parse(args); err != nil || *dbPath == "" || a.fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: broker import-mosquitto [--http-addr host:port] [--admin-token-file FILE] [--partial] [--dry-run] [--json] --db mosquitto.db")
		return 2
	}
	in := os.Stdin // --db - (kubectl exec -i ... < mosquitto.db)
	if *dbPath != "-" {
		f, err := os.Open(*dbPath)
		if err != nil {
			fmt.Fprintf(stderr, "broker: %v\n", err)
			return 1
		}
		defer f.Close()
		in = f
	}
	db, err := mosquitto.ReadDB(in)
	var corrupt *mosquitto.CorruptError
	switch {
	case errors.As(err, &corrupt) && !*partial:
		fmt.Fprintf(stderr, "broker: %s: %v: nothing imported (--partial imports the %d retained messages and %d sessions read before it)\n",
			*dbPath, err, len(db.Retained), len(db.Sessions))
		return 1
	case err != nil && !errors.As(err, &corrupt):
		fmt.Fprintf(stderr, "broker: %s: %v\n", *dbPath, err)
		return 1
	}
	plan := planImport(db, time.Now())
	if corrupt != nil {
		plan.damaged(corrupt)
	}
	if !*dryRun {
		token, err := a.token()
		if err != nil {
			fmt.Fprintf(stderr, "broker: %v\n", err)
			return 2
		}
		if err := plan.send(a.host(), token, progressLine(stderr)); err != nil {
			fmt.Fprintf(stderr, "broker: %v\nbroker: stopped part way; run the same import again (what the cluster holds is kept, an unfinished session is written again) before clients move to the cluster\n", err)
			plan.report.Error = err.Error()
			printImport(stdout, plan.report, *a.asJSON, false)
			return 1
		}
	}
	if *dryRun {
		plan.planned()
	}
	printImport(stdout, plan.report, *a.asJSON, *dryRun)
	return 0
}

// importReport is what an import did (the --json output).
type importReport struct {
	Retained        int      `json:"retained"`         // imported
	RetainedPresent int      `json:"retained_present"` // the cluster had one on the topic: kept
	Sessions        int      `json:"sessions"`
	SessionsPresent int      `json:"sessions_present"`
	Subscriptions   int      `json:"subscriptions"`
	Queued          int      `json:"queued"`
	Dropped         int      `json:"dropped"`         // over the cluster's max_queued_messages
	Skipped         []string `json:"skipped"`         // what could not be imported, and why
	Error           string   `json:"error,omitempty"` // why the import stopped part way
}

type importPlan struct {
	retained []node.ImportMessage
	sessions []node.ImportSession
	report   importReport
}

// damaged drops the sessions of a file read up to damage (--partial):
// Mosquitto writes subscriptions after every client, so a session may have
// lost some of them, and a client that resumes a session keeps relying on
// its subscriptions instead of subscribing again. Retained messages read
// whole are kept.
func (p *importPlan) damaged(err error) {
	for _, s := range p.sessions {
		p.report.Skipped = append(p.report.Skipped, fmt.Sprintf("session %q: the file is damaged after it, where its subscriptions may be (--partial imports retained messages only)", s.ClientID))
	}
	p.sessions = nil
	p.report.Skipped = append(p.report.Skipped, fmt.Sprintf("the rest of the file: %v (--partial)", err))
}

// planImport converts what the file holds into import requests, and lists
// what cannot be imported.
func planImport(db *mosquitto.DB, now time.Time) *importPlan {
	p := &importPlan{report: importReport{Skipped: append([]string{}, db.Problems...)}}
	skip := func(format string, args ...any) {
		p.report.Skipped = append(p.report.Skipped, fmt.Sprintf(format, args...))
	}
	nowS := now.Unix()
	for _, m := range db.Retained {
		if m.Expiry != 0 && m.Expiry <= nowS {
			skip("retained message on %q: expired", m.Topic)
			continue
		}
		p.retained = append(p.retained, importMessage(m, m.QoS, false))
	}
	for _, s := range db.Sessions {
		is := node.ImportSession{ClientID: s.ClientID, Username: s.Username, ProtocolVersion: 4, ExpiryInterval: s.ExpiryInterval}
		if s.ExpiryInterval != replication.NeverExpires {
			is.ProtocolVersion = 5
		}
		if s.ExpiresAt != 0 {
			left := s.ExpiresAt - nowS
			if left <= 0 {
				skip("session %q: expired", s.ClientID)
				continue
			}
			is.ProtocolVersion, is.ExpiryInterval = 5, uint32(min(int64(s.ExpiryInterval), left))
		}
		if is.ExpiryInterval == 0 {
			skip("session %q: session expiry 0 (a bridge's session, or a client's that ends with its connection)", s.ClientID)
			continue
		}
		for _, sub := range s.Subscriptions {
			if strings.HasPrefix(sub.Filter, "$share/") {
				skip("session %q: shared subscription %q (here shared subscriptions end with their connection: the client subscribes again)", s.ClientID, sub.Filter)
				continue
			}
			is.Subscriptions = append(is.Subscriptions, replication.Subscription{Filter: sub.Filter, QoS: sub.QoS,
				NoLocal: sub.NoLocal, RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling,
				Identifier: sub.Identifier})
		}
		for _, q := range s.Queue {
			switch {
			case q.Incoming:
				skip("session %q: QoS 2 message on %q received from the client, awaiting its PUBREL: lost (Mosquitto had not delivered it, and the client will send only the PUBREL)", s.ClientID, q.Topic)
			case q.State == mosquitto.StateResendPubrel || q.State == mosquitto.StateWaitForPubcomp:
				skip("session %q: QoS 2 message on %q the client has received, PUBREL outstanding: a client that hands it to its application only at PUBREL (libmosquitto) loses it", s.ClientID, q.Topic)
			case q.QoS == 0:
				skip("session %q: QoS 0 message on %q (queue_qos0_messages; persistent sessions queue QoS 1 and 2 here)", s.ClientID, q.Topic)
			case q.Expiry != 0 && q.Expiry <= nowS:
				skip("session %q: message on %q expired", s.ClientID, q.Topic)
			default:
				is.Queue = append(is.Queue, importMessage(q.Message, q.QoS, q.Retain))
			}
		}
		p.sessions = append(p.sessions, is)
	}
	return p
}

func importMessage(m *mosquitto.Message, qos byte, retain bool) node.ImportMessage {
	pr := m.Properties
	im := node.ImportMessage{Topic: m.Topic, Payload: m.Payload, QoS: qos, Retain: retain,
		Properties: replication.Properties{PayloadFormat: pr.PayloadFormat, ContentType: pr.ContentType,
			ResponseTopic: pr.ResponseTopic, CorrelationData: pr.CorrelationData}}
	for _, u := range pr.User {
		im.Properties.UserProperties = append(im.Properties.UserProperties, replication.UserProperty{Key: u.Key, Value: u.Val})
	}
	if m.Expiry != 0 {
		im.Expires = m.Expiry * 1000
	}
	return im
}

// planned fills the report with what send would try (--dry-run).
func (p *importPlan) planned() {
	p.report.Retained, p.report.Sessions = len(p.retained), len(p.sessions)
	for _, s := range p.sessions {
		p.report.Subscriptions += len(s.Subscriptions)
		p.report.Queued += len(s.Queue)
	}
}

// send posts every request in turn, counting into the report.
func (p *importPlan) send(host, token string, progress func(done, total int)) error {
	total, done := len(p.retained)+len(p.sessions), 0
	for _, m := range p.retained {
		var res node.ImportResult
		if err := postImport(host, token, "/api/import/retained", m, &res); errors.Is(err, errRefused) {
			p.report.Skipped = append(p.report.Skipped, fmt.Sprintf("retained message on %q: %v", m.Topic, err))
		} else if err != nil {
			return fmt.Errorf("retained message on %q: %w", m.Topic, err)
		} else if res.Imported {
			p.report.Retained++
		} else {
			p.report.RetainedPresent++
		}
		done++
		progress(done, total)
	}
	for _, s := range p.sessions {
		var res node.ImportResult
		err := postImport(host, token, "/api/import/session", s, &res)
		p.report.Skipped = append(p.report.Skipped, res.Skipped...)
		if errors.Is(err, errRefused) {
			p.report.Skipped = append(p.report.Skipped, fmt.Sprintf("session %q: %v", s.ClientID, err))
		} else if err != nil {
			return fmt.Errorf("session %q: %w", s.ClientID, err)
		} else if res.Imported {
			p.report.Sessions++
			p.report.Subscriptions += len(s.Subscriptions)
			p.report.Queued += res.Queued
			p.report.Dropped += res.Dropped
		} else {
			p.report.SessionsPresent++
		}
		done++
		progress(done, total)
	}
	return nil
}

func postImport(host, token, path string, v, out any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+host+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the node at %s: %w (is it running? pass --http-addr)", host, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	switch resp.StatusCode {
	case http.StatusOK:
		return json.Unmarshal(b, out)
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		// This item cannot be stored here: skipped, the import goes on.
		return fmt.Errorf("%w: %s", errRefused, strings.TrimSpace(string(b)))
	}
	return fmt.Errorf("refused: %s", strings.TrimSpace(string(b)))
}

// errRefused: the node cannot store this item (invalid here, or too large).
var errRefused = errors.New("not importable")

// progressLine draws "import: 12/40" on a terminal, nothing elsewhere.
func progressLine(w io.Writer) func(done, total int) {
	if !isTerminal(w) {
		return func(int, int) {}
	}
	return func(done, total int) {
		fmt.Fprintf(w, "\rimport: %d/%d", done, total)
		if done == total {
			fmt.Fprintln(w)
		}
	}
}

func printImport(w io.Writer, r importReport, asJSON, dryRun bool) {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(r)
		return
	}
	if dryRun {
		fmt.Fprintf(w, "would import %d retained messages and %d sessions with %d subscriptions and %d queued messages (less what the cluster holds already)\n",
			r.Retained, r.Sessions, r.Subscriptions, r.Queued)
	} else {
		fmt.Fprintf(w, "imported %d retained messages (%d kept: the cluster had one on the topic)\n", r.Retained, r.RetainedPresent)
		fmt.Fprintf(w, "imported %d sessions with %d subscriptions and %d queued messages (%d kept: the cluster had the session; %d messages over max_queued_messages dropped)\n",
			r.Sessions, r.Subscriptions, r.Queued, r.SessionsPresent, r.Dropped)
	}
	if len(r.Skipped) > 0 {
		fmt.Fprintf(w, "not imported (%d):\n", len(r.Skipped))
		for _, s := range r.Skipped {
			fmt.Fprintf(w, "  %s\n", s)
		}
	}
}
