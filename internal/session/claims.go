package session

import (
	"sync"
	"time"
)

// Claims are the will claims (PublishWill, TakeoverWill) a node wrote
// whose live copies it still owes.
//
// Live copies follow the commit, not the write's reply. A claim whose
// write fails with an unknown outcome (a timeout, a leader lost) may
// commit after all: its retries then find the will gone, and the clean
// subscribers would never get it. So the node that writes a claim records
// what it owes first (Expect), and pays once, on whichever comes first:
// the reply saying the claim changed the state (Settle), or the commit
// seen in the log (Take, from the WillCleared change that carries the
// claim's At).
//
// The zero value is ready to use; it is safe for concurrent use.
type Claims struct {
	mu sync.Mutex
	m  map[string]map[int64]Claim // client id -> claim's At -> claim
}

// Claim is a claim's live publication, not paid yet.
type Claim struct {
	Publish func()
	Since   time.Time // when it was expected
}

// ClaimDebtTTL bounds how long a claim with an unknown outcome waits for
// its commit (a write is retried for at most a few seconds).
const ClaimDebtTTL = time.Minute

// Expect records, at now, that this node writes the claim of id's will
// at At at, and what to publish once it is committed.
func (c *Claims) Expect(id string, at int64, now time.Time, publish func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]map[int64]Claim{}
	}
	if c.m[id] == nil {
		c.m[id] = map[int64]Claim{}
	}
	c.m[id][at] = Claim{Publish: publish, Since: now}
}

// Take removes and returns id's claim at at, if it is still owed; every
// other claim of id is dropped with it (one will per session: older
// claims are moot).
func (c *Claims) Take(id string, at int64) (Claim, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl, ok := c.m[id][at]
	if ok {
		delete(c.m, id)
	}
	return cl, ok
}

// Settle applies the reply to the write of id's claim at at. With an
// error it changes nothing: the claim stays owed until its commit shows
// up (Take) or it expires. A reply that says the claim changed nothing
// forgets it (a definite answer: each attempt has its own At). One that
// says it changed the state takes it (Take): the caller publishes it.
func (c *Claims) Settle(id string, at int64, changed bool, err error) (Claim, bool) {
	if err != nil {
		return Claim{}, false
	}
	if !changed {
		c.mu.Lock()
		delete(c.m[id], at)
		if len(c.m[id]) == 0 {
			delete(c.m, id)
		}
		c.mu.Unlock()
		return Claim{}, false
	}
	return c.Take(id, at)
}

// Expire drops the claims expected more than ttl before now (they never
// committed).
func (c *Claims) Expire(now time.Time, ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, cs := range c.m {
		for at, cl := range cs {
			if now.Sub(cl.Since) > ttl {
				delete(cs, at)
			}
		}
		if len(cs) == 0 {
			delete(c.m, id)
		}
	}
}

// Owed is the number of claims of id still owed.
func (c *Claims) Owed(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m[id])
}
