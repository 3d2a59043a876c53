package replication

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/hashicorp/raft"
)

// Backups (issue 14). A backup is a snapshot of the replicated state in
// the snapshot format, framed so that a damaged file is refused before
// anything is restored:
//
//	"MQBK" | u8 version (1) | snapshot | 32-byte SHA-256 of everything before it
//
// The snapshot carries no synced record and no departure records: they
// belong to the cluster it was taken from and mean nothing to the one it
// seeds.

const (
	backupMagic   = "MQBK"
	backupVersion = 1
	// restoreMarkTopic is cleared right after a restore: a write the state
	// machine applies, so that every node's synced index moves past the
	// restore (the read barrier waits for it; raft's own no-op entry does
	// not reach the state machine).
	restoreMarkTopic = "$restore/mark"
)

// ErrHasState: a restore into a cluster that already holds retained
// messages or persistent sessions, without force.
var ErrHasState = errors.New("replication: the cluster has state")

// Backup writes a consistent copy of the replicated state to w: as of a
// read barrier, so it holds every write acknowledged before the call,
// whichever node it runs on. It returns the bytes written.
func (n *Node) Backup(ctx context.Context, w io.Writer) (int64, error) {
	if err := n.ReadBarrier(ctx); err != nil {
		return 0, fmt.Errorf("replication: backup: %w", err)
	}
	n.fsm.mu.RLock()
	st := n.fsm.st.clone()
	if st.store != nil {
		st.store.pin() // blob files stay while they are read
	}
	n.fsm.mu.RUnlock()
	if st.store != nil {
		defer st.store.unpin()
	}
	st.synced = 0
	// Who left the old cluster on purpose means nothing to the new one
	// (with reused pod names it would have a member removed).
	st.departed = map[string]int64{}
	// Wills owed by connections of the old cluster: its nodes are gone
	// (a restore with reused pod names would publish them).
	st.owed, st.owedRetained = map[owedKey]OwedWill{}, map[string][]owedKey{}
	// The log format recorded is the old cluster's (logformat.go).
	st.format = 0
	// Touches are indexes of the old cluster's log.
	st.touched, st.touchFrom, st.touchPruned = map[string]touch{}, 0, 0
	backupSessions(st, time.Now().UnixMilli())
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(w, h)}
	if _, err := cw.Write(append([]byte(backupMagic), backupVersion)); err != nil {
		return cw.n, fmt.Errorf("replication: backup: %w", err)
	}
	if _, err := writeSnapshot(cw, st); err != nil {
		return cw.n, fmt.Errorf("replication: backup: %w", err)
	}
	m, err := w.Write(h.Sum(nil))
	return cw.n + int64(m), err
}

// RestoreBackup seeds the cluster from a backup read from r. Only the
// leader can (raft installs it there and sends it to every follower); a
// cluster that holds retained messages or persistent sessions is refused
// unless force. The backup is spooled to the data dir and checked whole
// (checksum, then a full decode) before raft sees it: raft stops the node
// if its state machine cannot restore a snapshot it accepted.
func (n *Node) RestoreBackup(ctx context.Context, r io.Reader, force bool) error {
	if !n.running() {
		return ErrClosed
	}
	if n.raft.State() != raft.Leader {
		_, id := n.raft.LeaderWithID()
		return fmt.Errorf("%w: %s is not the leader; ask %s", ErrNotLeader, n.cfg.NodeID, string(id))
	}
	if !force && n.fsm.hasData() {
		return fmt.Errorf("%w: retained messages or persistent sessions exist (restore with force to replace them)", ErrHasState)
	}
	spool, err := os.CreateTemp(n.cfg.DataDir, "restore-*.mqbk")
	if err != nil {
		return fmt.Errorf("replication: restore: %w", err)
	}
	defer os.Remove(spool.Name())
	defer spool.Close()
	size, err := io.Copy(spool, r)
	if err != nil {
		return fmt.Errorf("replication: restore: reading the backup: %w", err)
	}
	snapLen, err := checkBackup(spool, size)
	if err != nil {
		return err
	}
	// A full decode, blob files into a scratch directory.
	scratch, err := os.MkdirTemp(n.cfg.DataDir, "restore-check-")
	if err != nil {
		return fmt.Errorf("replication: restore: %w", err)
	}
	defer os.RemoveAll(scratch)
	if _, err := readSnapshotInto(io.NewSectionReader(spool, int64(len(backupMagic)+1), snapLen), newBlobStore(scratch)); err != nil {
		return fmt.Errorf("replication: restore: the backup does not decode: %w", err)
	}
	os.RemoveAll(scratch) // before raft copies the snapshot: disk
	// Checked again: writes acknowledged while the file was checked.
	if !force && n.fsm.hasData() {
		return fmt.Errorf("%w: retained messages or persistent sessions were written during the check (restore with force to replace them)", ErrHasState)
	}
	timeout := time.Minute
	if d, ok := ctx.Deadline(); ok {
		if timeout = time.Until(d); timeout <= 0 {
			return fmt.Errorf("%w: restore: %w", ErrTimeout, context.DeadlineExceeded)
		}
	}
	// A leader elected moments ago (a new cluster, just bootstrapped)
	// refuses a restore until it has applied its configuration entry
	// ("cannot restore snapshot now"); a barrier waits for that.
	if err := waitFuture(ctx, n.raft.Barrier(timeout)); err != nil {
		return fmt.Errorf("replication: restore: waiting for the log to be applied: %w", err)
	}
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Size: snapLen}
	if err := n.raft.Restore(meta, io.NewSectionReader(spool, int64(len(backupMagic)+1), snapLen), timeout); err != nil {
		return fmt.Errorf("replication: restore: %w", err)
	}
	n.log.Warn("state restored from a backup", "bytes", snapLen)
	if _, err := n.Apply(ctx, &RetainClear{Topic: restoreMarkTopic}); err != nil {
		// The state is replaced: not an error for the caller to retry.
		n.log.Warn("restored; the write after the restore failed (QoS 1/2 publishes wait for the next write)", "error", err)
	}
	return nil
}

// checkBackup verifies the framing and checksum of a backup of size
// bytes and returns the length of its snapshot.
func checkBackup(f io.ReaderAt, size int64) (int64, error) {
	head := int64(len(backupMagic) + 1)
	if size < head+sha256.Size {
		return 0, fmt.Errorf("%w: backup of %d bytes is too short", errCorrupt, size)
	}
	hdr := make([]byte, head)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return 0, fmt.Errorf("replication: restore: %w", err)
	}
	if !bytes.Equal(hdr[:len(backupMagic)], []byte(backupMagic)) || hdr[len(backupMagic)] != backupVersion {
		return 0, fmt.Errorf("%w: not a backup of this broker (or of an unknown version)", errCorrupt)
	}
	h := sha256.New()
	if _, err := io.Copy(h, bufio.NewReader(io.NewSectionReader(f, 0, size-sha256.Size))); err != nil {
		return 0, fmt.Errorf("replication: restore: %w", err)
	}
	sum := make([]byte, sha256.Size)
	if _, err := f.ReadAt(sum, size-sha256.Size); err != nil {
		return 0, fmt.Errorf("replication: restore: %w", err)
	}
	if !bytes.Equal(sum, h.Sum(nil)) {
		return 0, fmt.Errorf("%w: checksum mismatch (the file is damaged or truncated)", errCorrupt)
	}
	return size - sha256.Size - head, nil
}

// hasData reports whether the state holds retained messages or
// persistent sessions.
func (f *FSM) hasData() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.st.retained) > 0 || len(f.st.sessions) > 0
}

// backupSessions makes every session connected at the time of the backup
// a disconnected one, at, without its will: the cluster a backup seeds
// has none of those connections, and as "connected" sessions of nodes it
// lacks they would be closed as dead and their wills published, for
// clients that may well be alive (connected to the old cluster) and will
// reconnect. A disconnected session keeps its will (a delayed will still
// due). Entries are copied: the clone shares them with the live state.
func backupSessions(st *state, at int64) {
	for id, e := range st.sessions {
		if !e.Connected {
			continue
		}
		c := &sessionEntry{Session: e.Session}
		c.Connected, c.DisconnectedAt, c.Will = false, at, nil
		st.sessions[id] = c
	}
}
