package session

import (
	"reflect"
	"testing"

	"github.com/mqtt-ha/broker/replication"
)

func TestClaimWill(t *testing.T) {
	want := &replication.PublishWill{ClientID: "c", IfOpened: 7, At: 100, MaxQueued: 10}
	if got := ClaimWill("c", 7, 100, 10); !reflect.DeepEqual(got, want) {
		t.Errorf("ClaimWill = %+v, want %+v", got, want)
	}
	if got := ClaimWill("c", 7, 100, -1); got.MaxQueued != 0 {
		t.Errorf("negative max_queued_messages: MaxQueued %d, want 0", got.MaxQueued)
	}
}

func TestWillDue(t *testing.T) {
	s := func(delay, expiry uint32) replication.Session {
		return replication.Session{ClientID: "c", DisconnectedAt: 10_000, ExpiryInterval: expiry,
			Will: &replication.Will{Topic: "w", DelaySeconds: delay}}
	}
	for _, c := range []struct {
		name string
		s    replication.Session
		now  int64
		want bool
	}{
		{"no delay", s(0, 60), 10_000, true},
		{"before the delay", s(5, 60), 14_999, false},
		{"at the delay", s(5, 60), 15_000, true},
		{"expiry sooner than the delay", s(30, 2), 12_000, true},
		{"expiry sooner, not yet", s(30, 2), 11_999, false},
		{"never expires: the delay", s(30, replication.NeverExpires), 39_999, false},
		{"never expires, delay passed", s(30, replication.NeverExpires), 40_000, true},
		{"no will", replication.Session{ClientID: "c", DisconnectedAt: 1}, 1 << 40, false},
	} {
		if got := WillDue(c.s, c.now); got != c.want {
			t.Errorf("%s: WillDue = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestTakeoverWill(t *testing.T) {
	live := replication.Session{ClientID: "c", Connected: true, Owner: "n1", OpenedIndex: 7, ExpiryInterval: 0,
		Will: &replication.Will{Topic: "w"}}
	with := func(f func(*replication.Session)) replication.Session {
		s := live
		w := *live.Will
		s.Will = &w
		f(&s)
		return s
	}
	in := func(s replication.Session, clean bool) Takeover {
		return Takeover{ClientID: "c", Session: s, Self: "n1", Opened: 7, CleanStart: clean, At: 500, MaxQueued: 3}
	}
	for _, c := range []struct {
		name string
		in   Takeover
		ends bool // want a TakeoverWill with EndsSession (false: want nil)
	}{
		{"expiry 0 ends the session", in(live, false), true},
		{"clean start ends the session", in(with(func(s *replication.Session) { s.ExpiryInterval = 60 }), true), true},
		{"session continues: will kept", in(with(func(s *replication.Session) { s.ExpiryInterval = 60 }), false), false},
		{"delayed will: cancelled, not published", in(with(func(s *replication.Session) { s.Will.DelaySeconds = 5 }), true), false},
		{"no will", in(with(func(s *replication.Session) { s.Will = nil }), true), false},
		{"not connected", in(with(func(s *replication.Session) { s.Connected = false }), true), false},
		{"owned elsewhere", in(with(func(s *replication.Session) { s.Owner = "n2" }), true), false},
		{"opened by another connection", in(with(func(s *replication.Session) { s.OpenedIndex = 8 }), true), false},
		{"no session", in(replication.Session{}, true), false},
	} {
		got := TakeoverWill(c.in)
		if !c.ends {
			if got != nil {
				t.Errorf("%s: TakeoverWill = %+v, want nil", c.name, got)
			}
			continue
		}
		want := &replication.TakeoverWill{ClientID: "c", IfOpened: 7, At: 500, MaxQueued: 3, EndsSession: true}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: TakeoverWill = %+v, want %+v", c.name, got, want)
		}
	}
}

func TestEndingWill(t *testing.T) {
	will := &replication.Will{Topic: "w"}
	delayed := &replication.Will{Topic: "w", DelaySeconds: 5}
	s := func(w *replication.Will, connected bool) replication.Session {
		// Closed at 0 (connected: not yet), expiry a minute: a 5 s delay
		// is due from 5,000 on.
		return replication.Session{ClientID: "c", OpenedIndex: 9, Connected: connected, Will: w, ExpiryInterval: 60}
	}
	at := func(ms int64, ss replication.Session) replication.Session { ss.DisconnectedAt = ms; return ss }
	want := &replication.PublishWill{ClientID: "c", IfOpened: 9, At: 100, MaxQueued: 10}
	for _, c := range []struct {
		name          string
		s             replication.Session
		found, clean  bool
		wantPublished bool
	}{
		{"clean start ends a session with a will", s(will, false), true, true, true},
		{"still connected when read: fenced in the log, not decided here", s(will, true), true, true, true},
		{"a resume keeps the session: its will is cancelled by the open", s(will, false), true, false, false},
		{"no session", replication.Session{}, false, true, false},
		{"no will", s(nil, false), true, true, false},
		{"a delayed will not due yet is cancelled by the new connection", at(-4000, s(delayed, false)), true, true, false},
		{"a delayed will already due is published", at(-5000, s(delayed, false)), true, true, true},
		{"a delayed will of a session that ended with its connection is due", func() replication.Session {
			ss := at(0, s(delayed, false))
			ss.ExpiryInterval = 0
			return ss
		}(), true, true, true},
		{"a delayed will of a connected session: the log cannot tell", at(-9000, s(delayed, true)), true, true, false},
	} {
		got := EndingWill(c.s, c.found, c.clean, 100, 10)
		if (got != nil) != c.wantPublished || got != nil && !reflect.DeepEqual(got, want) {
			t.Errorf("%s: EndingWill = %+v, want published %v", c.name, got, c.wantPublished)
		}
	}
}
