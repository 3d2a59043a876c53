// Package hooks is the glue between mochi-mqtt and the rest of the broker:
// authentication and ACLs, limits, metrics, cluster forwarding, and the
// replicated retained messages, ownership and persistent sessions. It is
// the only package that imports mochi together with cluster and
// replication.
//
// The persistent-session engine's decisions live in internal/session,
// which knows neither mochi nor the clock: which commands a CONNECT or a
// connection's end writes, the will claims this node owes live copies
// for, the delivery window's packet ids, the SUBACK codes. The Sessions
// hook turns mochi's callbacks into its inputs and does the I/O around
// it: reading the replicated state, writing, waiting, retrying, logging,
// and sending packets through mochi.
package hooks
