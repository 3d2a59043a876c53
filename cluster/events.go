package cluster

import "sync"

// MemberEventType says what happened to a member.
type MemberEventType int

// Member event types.
const (
	MemberJoin   MemberEventType = iota + 1 // became alive (new, restarted or back from a partition)
	MemberLeave                             // left gracefully (Close)
	MemberFail                              // declared dead by failure detection
	MemberUpdate                            // metadata changed (e.g. a new cluster address)
)

func (t MemberEventType) String() string {
	switch t {
	case MemberJoin:
		return "join"
	case MemberLeave:
		return "leave"
	case MemberFail:
		return "fail"
	case MemberUpdate:
		return "update"
	}
	return "unknown"
}

// MemberEvent is handed to Config.OnMemberEvent. Events about this node
// itself are not reported.
type MemberEvent struct {
	Type        MemberEventType
	NodeID      string
	GossipAddr  string
	ClusterAddr string // empty for leave/fail
	MQTTPort    int    // 0 for leave/fail
}

// eventQueue delivers member events to the callback in order, on one
// goroutine, without ever blocking memberlist (whose callbacks produce them).
type eventQueue struct {
	mu     sync.Mutex
	q      []MemberEvent
	wake   chan struct{}
	notify func(MemberEvent)
}

func newEventQueue(notify func(MemberEvent)) *eventQueue {
	return &eventQueue{wake: make(chan struct{}, 1), notify: notify}
}

func (e *eventQueue) push(ev MemberEvent) {
	if e.notify == nil {
		return
	}
	e.mu.Lock()
	e.q = append(e.q, ev)
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// run delivers events until stop is closed; events still queued then are
// discarded (the node is gone).
func (e *eventQueue) run(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-e.wake:
		}
		e.mu.Lock()
		q := e.q
		e.q = nil
		e.mu.Unlock()
		for _, ev := range q {
			e.notify(ev)
		}
	}
}

func (n *Node) emit(ev MemberEvent) { n.events.push(ev) }
