// Package replication will own everything under consensus: the raft node, its
// bolt log and snapshot store, the state machine and its command codec.
//
// Not implemented yet: this is the "Replication I" and "Replication II" work.
// Nothing in the broker depends on it today.
package replication
