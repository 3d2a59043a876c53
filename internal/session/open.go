package session

import (
	"sync/atomic"

	"github.com/mqtt-ha/broker/replication"
)

// Open describes a CONNECT that opens a session in the log (a persistent
// session, or a clean session's will mirror), with what the hooks read
// for it, in the order they read it.
type Open struct {
	ClientID        string
	ProtocolVersion byte
	Expiry          uint32 // ExpiryOf; 0 for a mirror
	Owner           string // this node
	At              int64  // OpenClock.Next: unique per node
	CleanStart      bool
	// Fenced: every server applies fenced opens (replication's
	// OpenFence): the open is fenced to IfOpened and carries the will.
	Fenced bool
	// OweWill: every server keeps owed wills (replication's
	// OwedWillsSupported): a connection on another node that the open
	// replaces keeps its will, owed, instead of losing it (fenced only).
	OweWill bool
	// IfOpened is the OpenedIndex of the client's session as read now, 0
	// if there is none.
	IfOpened uint64
	// AsOf, with HasAsOf (every server applies replication's
	// OpenAsOfSupported; fenced only): the index of the state read, taken
	// before reading it. A CONNECT that read no session is then also
	// refused when the client id changed since (a late open must not
	// bring back a session a newer clean start deleted).
	AsOf    uint64
	HasAsOf bool
	// Takeover is what publishes, in this CONNECT's own entry, the will
	// of the session it ends, none if empty: the TakeoverWill of the
	// client's live connection here, and the PublishWill of EndingWill
	// in case that connection's close commits first (the log applies at
	// most one of them: each clears the will it publishes).
	Takeover []replication.Command
	// Expired is the delete of the expired session the CONNECT would
	// otherwise resume (ExpiredDelete), nil if none; a clean start
	// ignores it.
	Expired replication.Command
	// Will is the CONNECT's will, nil if it has none.
	Will *replication.SetWill
}

// OpenCommands is SessionOpen, plus SetWill when the CONNECT has a will,
// preceded by the takeover will and the delete of an expired session it
// would otherwise resume; pos is the index of SessionOpen's result in a
// Batch. When fenced, the open carries the will itself.
func OpenCommands(o Open) (cmd replication.Command, pos int) {
	open := &replication.SessionOpen{ClientID: o.ClientID, ProtocolVersion: o.ProtocolVersion,
		ExpiryInterval: o.Expiry, Owner: o.Owner, At: o.At, CleanStart: o.CleanStart, Fenced: o.Fenced,
		IfOpened: o.IfOpened, OweWill: o.OweWill && o.Fenced, AsOf: o.AsOf, HasAsOf: o.HasAsOf && o.Fenced}
	var cmds []replication.Command
	cmds = append(cmds, o.Takeover...)
	if !open.CleanStart && o.Expired != nil {
		cmds = append(cmds, o.Expired)
		open.IfOpened = 0 // the delete comes first in the same entry
	}
	pos = len(cmds)
	cmds = append(cmds, open)
	if o.Will != nil {
		if open.Fenced {
			open.Will = &o.Will.Will
		} else {
			cmds = append(cmds, o.Will)
		}
	}
	if len(cmds) == 1 {
		return open, 0
	}
	return &replication.Batch{Commands: cmds}, pos
}

// OpenErr is err, or the error of the SessionOpen's own result when cmd
// is a Batch (a Batch applies each command on its own: a fenced open can
// fail in an entry that succeeds).
func OpenErr(cmd replication.Command, res replication.Result, err error) error {
	b, ok := cmd.(*replication.Batch)
	if err != nil || !ok {
		return err
	}
	for i, c := range b.Commands {
		if _, ok := c.(*replication.SessionOpen); ok && i < len(res.Results) {
			return res.Results[i].Err
		}
	}
	return nil
}

// OpenAtOf is the At of the SessionOpen in cmd (a command or a batch), 0
// if it holds none.
func OpenAtOf(cmd replication.Command) int64 {
	if o := OpenOf(cmd); o != nil {
		return o.At
	}
	return 0
}

// OpenClock gives each SessionOpen of a node its At, so that the log
// tells a retry of the same open (equal owner and At) from a new
// connection. The zero value is ready to use.
type OpenClock struct {
	last atomic.Int64 // the At of the node's last SessionOpen
}

// Next is now, or one past the previous open's At when the clock did not
// move: unique per node while its clock does not step back by more than
// the time between a restart and the first CONNECT.
func (c *OpenClock) Next(now int64) int64 {
	for {
		last := c.last.Load()
		at := max(now, last+1)
		if c.last.CompareAndSwap(last, at) {
			return at
		}
	}
}

// Refused is what a node knows after a fenced open of a CONNECT was
// refused (replication.ErrReopened: the session was opened or deleted
// since the CONNECT read it) and it caught up with the refusing entry.
type Refused struct {
	// Read is the OpenedIndex the refused open was fenced to: 0 if the
	// CONNECT read no session.
	Read       uint64
	CleanStart bool
	// SessionNow: the client has a session in the log now.
	SessionNow bool
	// Owner is the client id's owner now, if OwnerFound.
	Owner      replication.Owner
	OwnerFound bool
	Self       string
	Arrival    int64 // when the CONNECT arrived, Unix ms
}

// Reopen decides whether such a CONNECT opens again on what the log holds
// now, or is refused (the reason says why):
//   - a connection on another node that claimed the client id after this
//     CONNECT arrived is newer: it wins, as the later CONNECT does on one
//     broker;
//   - a resume whose session was deleted since it read it is refused: the
//     delete may be a clean start that arrived after this CONNECT and must
//     win (on one broker the clean start came last and no session is
//     left), and the log cannot tell it from an older delete (a
//     DISCONNECT with expiry 0, an expiry). The owner rule misses it when
//     that clean connection ended before it claimed the id. Refusing costs
//     a client that is still waiting one retry; opening again recreated a
//     session after the clean start (TestAbandonedConnectDoesNotReopen-
//     AfterCleanStart, which failed under load);
//   - otherwise the change was older than this CONNECT (this node had not
//     applied it yet): open again.
func Reopen(r Refused) (bool, string) {
	if r.OwnerFound && r.Owner.Node != r.Self && r.Owner.Since >= r.Arrival {
		return false, "a newer connection on " + r.Owner.Node + " holds the client id"
	}
	if !r.CleanStart && r.Read != 0 && !r.SessionNow {
		return false, "the session this CONNECT resumes was deleted since it read it"
	}
	return true, ""
}

// OpenOf is the SessionOpen in cmd (a command or a batch), nil if none.
func OpenOf(cmd replication.Command) *replication.SessionOpen {
	cmds := []replication.Command{cmd}
	if b, ok := cmd.(*replication.Batch); ok {
		cmds = b.Commands
	}
	for _, c := range cmds {
		if o, ok := c.(*replication.SessionOpen); ok {
			return o
		}
	}
	return nil
}

// ImportOwner owns a session while `broker import-mosquitto` writes it
// (no node has this name: it is not a valid host name). The import opens
// the session under this owner, writes its subscriptions and queue, and
// closes it: a session still connected under ImportOwner is an import
// that did not finish (the importer crashed), which the next run deletes
// and writes again. The leader leaves such a session open (its owner is
// no node that could die), and a client that connects resumes it.
const ImportOwner = "(import)"
