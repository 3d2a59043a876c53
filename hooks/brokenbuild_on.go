//go:build chaos_broken

package hooks

// ackBeforeCommit: this build acknowledges retained QoS 1/2 writes without
// replicating them, so acknowledged writes are lost when nodes die. Only
// the chaos suite builds it, to show that its checker catches a broker
// that breaks the durability rule.
const ackBeforeCommit = true
