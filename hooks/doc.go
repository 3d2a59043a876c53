// Package hooks is the glue between mochi-mqtt and the rest of the broker:
// authentication and ACLs, metrics, and (later) cluster forwarding and
// replication. It is the only package that imports mochi together with
// cluster and replication.
package hooks
