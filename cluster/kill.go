package cluster

// Kill stops the node as a crash would: no leave is announced, so peers
// must detect the failure. In-process tests use it to stand in for SIGKILL.
func (n *Node) Kill() error { return n.shutdown(false) }
