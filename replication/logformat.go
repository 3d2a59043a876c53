package replication

import (
	"context"
	"fmt"

	"github.com/hashicorp/raft"
)

// Log formats recorded in the log (log format 7).
//
// Knowing that every server applies a command type is enough for a new
// type: an older node never sees one. It is not enough for a change of
// how existing entries apply (an owed will yielding to newer retained
// values): every replica must switch at the same entry, or they diverge.
// So the leader, once every server of the configuration says it applies
// format v (features.go), commits LogFormat{v}, and apply rules newer than
// format 6 take effect from that entry on, on every replica alike. The
// state keeps the format (snapshot record 11) and a backup drops it, as
// it drops the old cluster's touches: the new cluster's leader records
// its own.

// CmdLogFormat (31) is LogFormat; log format version 7.
const CmdLogFormat CommandType = 31

// LogFormat records that every server applies log format Version (at
// least 7, at most logVersion); the state's format only grows.
//
//	uvarint version
type LogFormat struct {
	Version uint32
}

var _ Command = (*LogFormat)(nil)

// Type implements Command.
func (*LogFormat) Type() CommandType { return CmdLogFormat }

func (c *LogFormat) appendPayload(b []byte) []byte { return appendUvarint(b, uint64(c.Version)) }

func (c *LogFormat) validate() error {
	if c.Version < 7 || c.Version > logVersion {
		return invalid(c.Type(), "version %d not in [7, %d]", c.Version, logVersion)
	}
	return nil
}

func (s *state) applyLogFormat(c *LogFormat, res *Result) {
	if c.Version <= s.format {
		return
	}
	s.format = c.Version
	res.Changed = true
}

// LogFormat returns the log format the log has recorded (0 before format
// 7 was).
func (n *Node) LogFormat() uint32 { return n.fsm.logFormat() }

func (f *FSM) logFormat() uint32 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.st.format
}

// recordLogFormat commits LogFormat once every server applies a newer
// format than the log records (leader only; logVersionLoop calls it
// after each round). The round's answers may be stale (a server added or
// replaced since, a configuration that could not be read), so every
// server of the configuration is asked again first, and one that does not
// answer, or answers an older format, stops it until a later round. A
// failed write is tried again next round.
//
// Not covered, as for every newer command type: a server with older code
// added after this check and before the entry commits panics on it (a
// rolling upgrade finishes before the cluster grows).
func (n *Node) recordLogFormat() {
	v := n.logVers.min.Load()
	if v < 7 || v <= n.fsm.logFormat() || n.raft.State() != raft.Leader {
		return
	}
	ctx, cancel := context.WithTimeout(n.life, n.cfg.IOTimeout)
	defer cancel()
	cfg, err := n.configuration(ctx)
	if err != nil {
		return
	}
	for _, s := range cfg.Servers {
		if string(s.ID) == n.cfg.NodeID {
			continue
		}
		if got, err := n.askLogVersion(ctx, string(s.Address)); err != nil || got < v {
			n.log.Debug("not recording the log format yet", "version", v, "server", s.ID, "answer", got, "err", err)
			return
		}
	}
	if _, err := n.Apply(ctx, &LogFormat{Version: v}); err != nil {
		n.log.Info("recording the log format failed; trying again next round", "version", v, "err", err)
		return
	}
	n.log.Info("every server applies this log format; recorded it in the log", "version", v)
}

// Snapshot record of the recorded log format, written when there is one,
// before the owed will records (not skippable: a node that does not
// apply that format must not load a state that has it).
//
//	kind 11: uvarint format
const recLogFormat byte = 11

func readLogFormatRecord(rd *reader, st *state) error {
	v := rd.uvarint()
	if err := rd.end(); err != nil || v < 7 || v > logVersion || st.format != 0 {
		return fmt.Errorf("%w: log format record: version %d (already %d): %v", errCorrupt, v, st.format, err)
	}
	st.format = uint32(v)
	return nil
}
