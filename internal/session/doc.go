// Package session is the persistent-session engine's decision logic, kept
// apart from mochi so that it can be tested as plain functions: given the
// replicated state (replication.Session, replication.Result) and a few
// facts about an event (a CONNECT, a connection's end, an acknowledgement),
// what the hooks write to the raft log and what they still owe.
//
// hooks translates mochi's callbacks into these inputs and does the I/O:
// it reads the replicated state, applies the commands, waits, logs, and
// talks to mochi. This package does none of that: it never imports mochi,
// cluster or hooks, never reads the clock (times come in as parameters)
// and never blocks. As in Consul's FSM and rqlite's store, the rules live
// in one place and the glue stays thin.
//
// So far: the commands a connection's end and a CONNECT write (close.go,
// open.go), the will claims a node owes live copies for (claims.go), the
// delivery window's packet-id bookkeeping (window.go), a SUBSCRIBE's
// reason codes, the SUBACK merge and the chunking of retained messages
// (subscribe.go), and the takeover, ending and due-will decisions
// (wills.go).
// Still in hooks: the sequencing around them (retries of an open whose
// outcome is unknown, the waits for a DISCONNECT in flight or a previous
// close, catch-up with WaitAppliedLocal), which reads and waits on both
// mochi and the raft node.
//
// make deps-check fails if this package imports mochi, hooks or cluster.
package session
