// Package cluster owns membership (hashicorp/memberlist), the gossiped route
// table (topic filter -> nodes) and node-to-node forwarding over the cluster
// port. It imports neither mochi nor replication: the receiving side is the
// small Deliverer interface that package hooks implements.
package cluster
