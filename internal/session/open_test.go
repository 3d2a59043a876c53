package session

import (
	"errors"
	"reflect"
	"sync"
	"testing"

	"github.com/mqtt-ha/broker/replication"
)

func TestOpenCommands(t *testing.T) {
	base := Open{ClientID: "c", ProtocolVersion: 5, Expiry: 60, Owner: "n1", At: 100, IfOpened: 7}
	with := func(f func(*Open)) Open { o := base; f(&o); return o }
	open := func(f func(*replication.SessionOpen)) *replication.SessionOpen {
		o := &replication.SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n1", At: 100, IfOpened: 7}
		if f != nil {
			f(o)
		}
		return o
	}
	tw := &replication.TakeoverWill{ClientID: "c", IfOpened: 7, At: 99, EndsSession: true}
	del := &replication.SessionDelete{ClientID: "c", IfOpened: 7}
	sw := &replication.SetWill{ClientID: "c", Will: replication.Will{Topic: "w", Payload: []byte("bye")}}
	batch := func(cmds ...replication.Command) replication.Command { return &replication.Batch{Commands: cmds} }
	for _, c := range []struct {
		name    string
		in      Open
		want    replication.Command
		wantPos int
	}{
		{"resume", base, open(nil), 0},
		{"new session", with(func(o *Open) { o.IfOpened = 0 }), open(func(o *replication.SessionOpen) { o.IfOpened = 0 }), 0},
		{"clean start", with(func(o *Open) { o.CleanStart = true }), open(func(o *replication.SessionOpen) { o.CleanStart = true }), 0},
		{"expired session deleted first, open unconditional",
			with(func(o *Open) { o.Expired = del }),
			batch(del, open(func(o *replication.SessionOpen) { o.IfOpened = 0 })), 1},
		{"clean start ignores the expired session",
			with(func(o *Open) { o.CleanStart, o.Expired = true, del }),
			open(func(o *replication.SessionOpen) { o.CleanStart = true }), 0},
		{"unfenced will follows the open", with(func(o *Open) { o.Will = sw }), batch(open(nil), sw), 0},
		{"fenced will inside the open",
			with(func(o *Open) { o.Fenced, o.Will = true, sw }),
			open(func(o *replication.SessionOpen) { o.Fenced, o.Will = true, &sw.Will }), 0},
		{"takeover will first",
			with(func(o *Open) { o.Takeover = []replication.Command{tw} }),
			batch(tw, open(nil)), 1},
		{"takeover, expired session, will",
			with(func(o *Open) { o.Takeover, o.Expired, o.Will = []replication.Command{tw}, del, sw }),
			batch(tw, del, open(func(o *replication.SessionOpen) { o.IfOpened = 0 }), sw), 2},
	} {
		got, pos := OpenCommands(c.in)
		if !reflect.DeepEqual(got, c.want) || pos != c.wantPos {
			t.Errorf("%s:\n got %s at %d\nwant %s at %d", c.name, describe(got), pos, describe(c.want), c.wantPos)
		}
		if at := OpenAtOf(got); at != 100 {
			t.Errorf("%s: OpenAtOf = %d, want 100", c.name, at)
		}
		if b, ok := got.(*replication.Batch); ok {
			if _, ok := b.Commands[pos].(*replication.SessionOpen); !ok {
				t.Errorf("%s: position %d holds %T, not the open", c.name, pos, b.Commands[pos])
			}
		}
	}
}

func TestOpenErr(t *testing.T) {
	errApply := errors.New("apply failed")
	open := &replication.SessionOpen{ClientID: "c", At: 1}
	tw := &replication.TakeoverWill{ClientID: "c", IfOpened: 1, At: 1}
	b := &replication.Batch{Commands: []replication.Command{tw, open}}
	for _, c := range []struct {
		name string
		cmd  replication.Command
		res  replication.Result
		err  error
		want error
	}{
		{"apply error wins", b, replication.Result{}, errApply, errApply},
		{"single command: its error", open, replication.Result{Err: replication.ErrReopened}, nil, nil},
		{"batch: the open's result", b,
			replication.Result{Results: []replication.Result{{}, {Err: replication.ErrReopened}}}, nil, replication.ErrReopened},
		{"batch: another command's error is not the open's", b,
			replication.Result{Results: []replication.Result{{Err: errApply}, {}}}, nil, nil},
		{"batch: the open first", &replication.Batch{Commands: []replication.Command{open, &replication.SetWill{ClientID: "c"}}},
			replication.Result{Results: []replication.Result{{Err: replication.ErrReopened}, {}}}, nil, replication.ErrReopened},
		{"batch without results", b, replication.Result{}, nil, nil},
		{"batch without an open", &replication.Batch{Commands: []replication.Command{tw}},
			replication.Result{Results: []replication.Result{{Err: errApply}}}, nil, nil},
	} {
		if got := OpenErr(c.cmd, c.res, c.err); !errors.Is(got, c.want) || (c.want == nil && got != nil) {
			t.Errorf("%s: OpenErr = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestOpenAtOf(t *testing.T) {
	if got := OpenAtOf(&replication.SessionDelete{ClientID: "c"}); got != 0 {
		t.Errorf("no open: %d, want 0", got)
	}
	if got := OpenAtOf(&replication.Batch{Commands: []replication.Command{&replication.SessionDelete{ClientID: "c"}}}); got != 0 {
		t.Errorf("batch without an open: %d, want 0", got)
	}
	if got := OpenAtOf(&replication.Batch{Commands: []replication.Command{
		&replication.SessionDelete{ClientID: "c"}, &replication.SessionOpen{At: 42}}}); got != 42 {
		t.Errorf("batch: %d, want 42", got)
	}
}

func TestOpenClock(t *testing.T) {
	var c OpenClock
	for i, s := range []struct{ now, want int64 }{
		{100, 100},
		{100, 101}, // same millisecond: one later
		{50, 102},  // clock stepped back: still later
		{200, 200},
	} {
		if got := c.Next(s.now); got != s.want {
			t.Errorf("step %d: Next(%d) = %d, want %d", i, s.now, got, s.want)
		}
	}
	// Concurrent opens in one millisecond all get their own At.
	var mu sync.Mutex
	seen := map[int64]bool{}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				at := c.Next(300)
				mu.Lock()
				if seen[at] {
					t.Errorf("At %d given twice", at)
				}
				seen[at] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(seen) != 800 {
		t.Errorf("%d distinct At, want 800", len(seen))
	}
}

func TestReopen(t *testing.T) {
	base := Refused{Read: 7, SessionNow: true, Self: "n1", Arrival: 1000}
	with := func(f func(*Refused)) Refused { r := base; f(&r); return r }
	for _, c := range []struct {
		name string
		in   Refused
		want bool
	}{
		{"older change: open again", base, true},
		{"newer connection elsewhere holds the id", with(func(r *Refused) {
			r.Owner, r.OwnerFound = replication.Owner{Node: "n2", Since: 1000}, true
		}), false},
		{"older connection elsewhere", with(func(r *Refused) {
			r.Owner, r.OwnerFound = replication.Owner{Node: "n2", Since: 999}, true
		}), true},
		{"owned here", with(func(r *Refused) { r.Owner, r.OwnerFound = replication.Owner{Node: "n1", Since: 5000}, true }), true},
		{"resume whose session was deleted since", with(func(r *Refused) { r.SessionNow = false }), false},
		{"clean start whose session was deleted since", with(func(r *Refused) { r.SessionNow, r.CleanStart = false, true }), true},
		{"read no session, one exists now", with(func(r *Refused) { r.Read = 0 }), true},
		{"read no session, none now", with(func(r *Refused) { r.Read, r.SessionNow = 0, false }), true},
	} {
		if got, why := Reopen(c.in); got != c.want {
			t.Errorf("%s: Reopen = %v (%s), want %v", c.name, got, why, c.want)
		}
	}
}
