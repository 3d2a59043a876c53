// Package replication owns everything under consensus: a hashicorp/raft
// node with a raft-boltdb log and stable store and file snapshots under the data
// dir, the state machine (retained messages, client-id ownership and
// persistent sessions with their queues), its
// append-only command codec, group commit, leader forwarding, bootstrap
// (bootstrap_expect) and membership, and plain read APIs.
//
// It imports neither mochi nor the cluster or hooks packages. The caller
// supplies the transport seam (a demultiplexed Listener and a Dial function
// for the shared cluster port), what membership sees (Peers), and observer
// callbacks through which the hooks keep mochi's local retained index in
// step on every node. See DESIGN.md for the why, the command format, the
// bootstrap algorithm and the lock order.
//
// Typical wiring:
//
//	ln, _ := mux.Listen(cluster.ProtoRaft)
//	n, _ := replication.New(replication.Config{
//		NodeID:          id,
//		Advertise:       net.JoinHostPort(advertiseHost, clusterPort),
//		DataDir:         dataDir,
//		BootstrapExpect: expect,
//		Peers:           peersFromMemberlist,
//		Listener:        ln,
//		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
//			c, err := mux.Dial(ctx, addr, cluster.ProtoRaft)
//			if err != nil {
//				return nil, err // not a typed nil inside net.Conn
//			}
//			return c, nil
//		},
//		OnRetained: hooks.applyRetainedLocally,
//		OnRestore:  hooks.resyncRetained,
//	})
//	err := n.Start(ctx)
//	res, err := n.Apply(ctx, &replication.RetainSet{Msg: m})
package replication
