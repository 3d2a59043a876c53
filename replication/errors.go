package replication

import "errors"

// Sentinel errors. Errors returned by this package wrap one (or several) of
// them; test with errors.Is.
var (
	// ErrNoLeader: no leader is known (election in progress, or no quorum).
	// The command was not committed.
	ErrNoLeader = errors.New("replication: no leader")
	// ErrNotLeader: the node asked is not the leader. Apply retries
	// internally; it surfaces only when retries ran out.
	ErrNotLeader = errors.New("replication: not the leader")
	// ErrTimeout: the caller's deadline passed. Combined with
	// ErrUnknownOutcome when the command had already been proposed.
	ErrTimeout = errors.New("replication: timed out")
	// ErrUnknownOutcome: the command may or may not have been committed
	// (leadership lost while committing, the connection to the leader
	// broke after sending, or the deadline passed after proposing). Retry
	// only commands that are idempotent.
	ErrUnknownOutcome = errors.New("replication: outcome unknown")
	// ErrClosed: the node is closed or not started.
	ErrClosed = errors.New("replication: closed")
	// ErrTooLarge: the command exceeds Config.MaxCommandBytes.
	ErrTooLarge = errors.New("replication: command too large")
	// ErrInvalidCommand: a malformed command (a domain error: returned as a
	// value by the state machine, never a reason to stop).
	ErrInvalidCommand = errors.New("replication: invalid command")
	// ErrInvalidConfig is wrapped by every Config.Validate error.
	ErrInvalidConfig = errors.New("replication: invalid config")
	// ErrNotMember: this node is not in the raft configuration.
	ErrNotMember = errors.New("replication: not a member of the raft configuration")
	// ErrNotCaughtUp: this node's state machine lags the commit index.
	ErrNotCaughtUp = errors.New("replication: not caught up")
	// ErrNoSession: a session command named a client id without a
	// persistent session (a domain error, always with ErrInvalidCommand).
	ErrNoSession = errors.New("replication: no such session")
	// ErrNoReadIndex: a barrier got no read index from a leader in time
	// (none known, or the one known did not answer: this node is probably
	// cut off from the majority). Nothing was read; always with another
	// sentinel saying why (ErrTimeout, ErrNoLeader, ...).
	ErrNoReadIndex = errors.New("replication: no read index from a leader")
	// ErrReopened: a command fenced with IfOpened came from a connection
	// that no longer owns the session (it was opened again since, by a
	// newer connection); nothing was changed. Always with
	// ErrInvalidCommand.
	ErrReopened = errors.New("replication: session reopened by a newer connection")
	// ErrLastVoter: Leave refused to remove the only voter.
	ErrLastVoter = errors.New("replication: last voter")
)
