// Package gopool runs short tasks on goroutines that are kept for a while
// after their task, instead of on a new goroutine each.
//
// A new goroutine starts with a small stack and grows it, by copying, as
// its calls go deeper. A task that runs a whole MQTT publish (the publish
// pipeline's hand-back into mochi) grows it several times: in a profile of
// one node under QoS 1 load, stack growth was 9 % of the CPU. A kept
// goroutine keeps its grown stack (until the garbage collector shrinks an
// idle one), so a task costs a channel hand-off instead.
package gopool

import "time"

// Pool runs tasks on reused goroutines. The zero value is not usable; see
// New.
type Pool struct {
	idle  time.Duration
	tasks chan func()
}

// New returns a pool whose goroutines exit after idle without a task.
func New(idle time.Duration) *Pool {
	return &Pool{idle: idle, tasks: make(chan func())}
}

// Go runs f on a goroutine of the pool: an idle one if there is one, else
// a new one. Like the go statement it never blocks, and nothing bounds how
// many tasks run at once.
func (p *Pool) Go(f func()) {
	select {
	case p.tasks <- f: // an idle goroutine took it
	default:
		go p.worker(f)
	}
}

func (p *Pool) worker(f func()) {
	t := time.NewTimer(p.idle)
	defer t.Stop()
	for {
		f()
		f = nil // keep nothing of the last task alive while idle
		t.Reset(p.idle)
		select {
		case f = <-p.tasks:
		case <-t.C:
			return
		}
	}
}
