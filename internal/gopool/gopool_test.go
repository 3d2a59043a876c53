package gopool

import (
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// A task handed to an idle goroutine runs on it: some goroutine runs two
// tasks. Goroutine ids are never reused, so a repeated id is a reuse (a
// count of goroutines is not: the previous task's goroutine may exit in
// between).
func TestGoReusesIdleGoroutine(t *testing.T) {
	p := New(time.Minute)
	seen := map[string]bool{}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		ran := make(chan string)
		p.Go(func() { ran <- goroutineID() })
		id := <-ran
		if seen[id] {
			return
		}
		seen[id] = true
		// Give the worker time to park on the task channel again.
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("no goroutine ran two tasks (%d tasks)", len(seen))
}

// goroutineID is the calling goroutine's id, from its stack header
// ("goroutine 42 [running]:").
func goroutineID() string {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	f := strings.Fields(string(buf))
	if len(f) < 2 {
		return string(buf)
	}
	return f[1]
}

// Many tasks at once each run, concurrently (nothing bounds the pool, as
// nothing bounds the go statement): tasks that wait for each other do not
// deadlock.
func TestGoRunsTasksConcurrently(t *testing.T) {
	p := New(time.Minute)
	const n = 50
	var wg sync.WaitGroup
	wg.Add(n)
	release := make(chan struct{})
	for range n {
		p.Go(func() {
			wg.Done()
			<-release
		})
	}
	wg.Wait() // all n started while none has returned
	close(release)
}

// Idle goroutines exit after the idle time.
func TestIdleGoroutinesExit(t *testing.T) {
	base := runtime.NumGoroutine()
	p := New(20 * time.Millisecond)
	var wg sync.WaitGroup
	release := make(chan struct{})
	for range 10 {
		wg.Add(1)
		p.Go(func() { defer wg.Done(); <-release })
	}
	close(release)
	wg.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left, %d before", runtime.NumGoroutine(), base)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
