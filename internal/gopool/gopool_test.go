package gopool

import (
	"runtime"
	"sync"
	"testing"
	"time"
)

// A task handed to an idle goroutine runs on it: no new goroutine.
func TestGoReusesIdleGoroutine(t *testing.T) {
	p := New(time.Minute)
	done := make(chan struct{})
	p.Go(func() { close(done) })
	<-done
	// The worker parks on the task channel soon after f returns.
	deadline := time.Now().Add(10 * time.Second)
	reused := false
	for !reused && time.Now().Before(deadline) {
		before := runtime.NumGoroutine()
		ran := make(chan int)
		p.Go(func() { ran <- runtime.NumGoroutine() })
		if n := <-ran; n <= before {
			reused = true
		}
	}
	if !reused {
		t.Fatal("every task started a new goroutine")
	}
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
