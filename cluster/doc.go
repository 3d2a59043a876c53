// Package cluster owns membership (hashicorp/memberlist), the gossiped route
// table (topic filter -> nodes) and node-to-node forwarding over the cluster
// port. It imports neither mochi nor replication: the receiving side is the
// small Deliverer interface that package hooks implements.
//
// How hooks is meant to drive it:
//
//	n, err := cluster.New(cfg, deliverer) // deliverer injects into mochi
//	err = n.Start(ctx)
//	defer n.Close()                        // graceful leave
//
//	// OnSubscribed (successful codes only), and for every subscription of a
//	// restored or offline persistent session:
//	n.AddRoute(filter)                     // "$share/g/f" included, as is
//	// OnUnsubscribed, and when a clean session ends (never when a
//	// persistent session merely goes offline):
//	n.RemoveRoute(filter)
//
//	// OnPublished and OnWillSent, for packets NOT from the cluster client:
//	n.Forward(&cluster.Message{...})       // remaining expiry, no topic alias
//
// Shared subscriptions: Forward picks exactly one node per matching group.
// If this node has a member (HasLocalRoute(group)), the group stays local
// and mochi's own selection delivers it. A node that receives a message
// must deliver it to exactly the groups listed in Message.Shared (remove
// every other group from subs.Shared in OnSelectSubscribers, for packets
// injected by the cluster client), plus its plain subscribers.
//
// Deliver is called on one goroutine per peer, in order; implement it with
// Server.InjectPacket through a dedicated inline client (protocol version 5,
// a non-zero packet id for QoS > 0). Messages handed to Deliver are never
// forwarded again by Forward.
//
// The cluster port multiplexes protocols by their first byte; raft gets its
// own authenticated stream with Mux().Listen(ProtoRaft) and
// Mux().Dial(ctx, addr, ProtoRaft). Config.OnMemberEvent reports joins,
// graceful leaves and failures (for wills and raft membership).
//
// DESIGN.md explains the choices, the wire formats and the lock order.
package cluster
