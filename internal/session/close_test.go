package session

import (
	"math"
	"reflect"
	"testing"

	"github.com/mqtt-ha/broker/replication"
)

func TestPersistent(t *testing.T) {
	for _, c := range []struct {
		version byte
		expiry  uint32
		clean   bool
		want    bool
	}{
		{5, 0, false, false}, // MQTT 5: the expiry decides, not clean start
		{5, 1, true, true},
		{5, 60, false, true},
		{4, 0, false, true}, // 3.1.1: clean session 0
		{4, 60, true, false},
		{3, 0, false, true},
	} {
		if got := Persistent(c.version, c.expiry, c.clean); got != c.want {
			t.Errorf("Persistent(%d, %d, %v) = %v, want %v", c.version, c.expiry, c.clean, got, c.want)
		}
	}
}

func TestMayResumeWithoutExpiry(t *testing.T) {
	for _, c := range []struct {
		version byte
		clean   bool
		expiry  uint32
		want    bool
	}{
		{5, false, 0, true},
		{5, true, 0, false},
		{5, false, 1, false},
		{4, false, 0, false},
	} {
		if got := MayResumeWithoutExpiry(c.version, c.clean, c.expiry); got != c.want {
			t.Errorf("MayResumeWithoutExpiry(%d, %v, %d) = %v, want %v", c.version, c.clean, c.expiry, got, c.want)
		}
	}
}

func TestEndsWithConnection(t *testing.T) {
	for _, c := range []struct {
		version byte
		expiry  uint32
		clean   bool
		want    bool
	}{
		{5, 0, false, true},
		{5, 0, true, true},
		{5, 10, true, false}, // MQTT 5: clean start does not end the session
		{4, 0, true, true},
		{4, 0, false, false},
		{3, 100, true, true},
	} {
		if got := EndsWithConnection(c.version, c.expiry, c.clean); got != c.want {
			t.Errorf("EndsWithConnection(%d, %d, %v) = %v, want %v", c.version, c.expiry, c.clean, got, c.want)
		}
	}
}

func TestCapExpiry(t *testing.T) {
	for _, c := range []struct{ e, limit, want uint32 }{
		{10, 5, 5},
		{5, 10, 5},
		{0, 10, 0},
		{math.MaxUint32, math.MaxUint32, replication.NeverExpires},
		{math.MaxUint32, 3600, 3600},
	} {
		if got := CapExpiry(c.e, c.limit); got != c.want {
			t.Errorf("CapExpiry(%d, %d) = %d, want %d", c.e, c.limit, got, c.want)
		}
	}
}

func TestExpiryOf(t *testing.T) {
	for _, c := range []struct {
		version       byte
		expiry, limit uint32
		want          uint32
	}{
		{5, 60, 3600, 60},
		{5, 7200, 3600, 3600},
		{5, 0, 3600, 0},
		{4, 60, 3600, 3600}, // 3.1.1 has no expiry: the server's maximum
		{3, 0, math.MaxUint32, replication.NeverExpires},
		{5, math.MaxUint32, math.MaxUint32, replication.NeverExpires},
	} {
		if got := ExpiryOf(c.version, c.expiry, c.limit); got != c.want {
			t.Errorf("ExpiryOf(%d, %d, %d) = %d, want %d", c.version, c.expiry, c.limit, got, c.want)
		}
	}
}

func TestExpiredAt(t *testing.T) {
	closed := replication.Session{ClientID: "c", DisconnectedAt: 10_000, ExpiryInterval: 5, OpenedIndex: 7}
	connected := closed
	connected.Connected = true
	never := closed
	never.ExpiryInterval = replication.NeverExpires
	noClose := closed
	noClose.DisconnectedAt = 0
	zero := closed
	zero.ExpiryInterval = 0
	for _, c := range []struct {
		name string
		s    replication.Session
		now  int64
		want bool
	}{
		{"before", closed, 14_999, false},
		{"at", closed, 15_000, true},
		{"after", closed, 20_000, true},
		{"connected", connected, 20_000, false},
		{"never expires", never, 1 << 50, false},
		{"not closed", noClose, 20_000, false},
		{"expiry 0", zero, 10_000, true},
	} {
		if got := ExpiredAt(c.s, c.now); got != c.want {
			t.Errorf("%s: ExpiredAt = %v, want %v", c.name, got, c.want)
		}
		del := ExpiredDelete("c", c.s, c.now)
		if !c.want {
			if del != nil {
				t.Errorf("%s: ExpiredDelete = %#v, want nil", c.name, del)
			}
			continue
		}
		if want := (&replication.SessionDelete{ClientID: "c", IfOpened: 7}); !reflect.DeepEqual(del, want) {
			t.Errorf("%s: ExpiredDelete = %#v, want %#v", c.name, del, want)
		}
	}
}

func TestCloseCommands(t *testing.T) {
	base := Close{ClientID: "c", Owner: "n1", Opened: 7, At: 1234, Expiry: 60, ProtocolVersion: 5,
		MaxExpiry: 3600}
	with := func(f func(*Close)) Close { c := base; f(&c); return c }
	closeCmd := func(f func(*replication.SessionClose)) *replication.SessionClose {
		c := &replication.SessionClose{ClientID: "c", Owner: "n1", IfOpened: 7, At: 1234}
		if f != nil {
			f(c)
		}
		return c
	}
	// A DISCONNECT's close discards the will, also one owed elsewhere.
	disc := func(s *replication.SessionClose) { s.WillPublished = true }
	clear := &replication.ClearWill{ClientID: "c"}
	drop := &replication.ClaimWill{ClientID: "c", IfOpened: 7} // fenced, unpublished
	del := &replication.SessionDelete{ClientID: "c", IfOpened: 7}
	batch := func(cmds ...replication.Command) replication.Command { return &replication.Batch{Commands: cmds} }
	for _, c := range []struct {
		name string
		in   Close
		want replication.Command
	}{
		{"dropped, expiry kept", base, closeCmd(nil)},
		{"DISCONNECT clears the will, fenced to this connection", with(func(c *Close) { c.Disconnect = true }), batch(closeCmd(disc), drop)},
		{"DISCONNECT with the same expiry",
			with(func(c *Close) { c.Disconnect, c.ExpirySet, c.ExpiryProp = true, true, 60 }),
			batch(closeCmd(disc), drop)},
		{"DISCONNECT sets a new expiry",
			with(func(c *Close) { c.Disconnect, c.ExpirySet, c.ExpiryProp = true, true, 120 }),
			batch(closeCmd(func(s *replication.SessionClose) { disc(s); s.SetExpiry, s.ExpiryInterval = true, 120 }), drop)},
		{"new expiry capped to the stored one: unchanged",
			with(func(c *Close) { c.Expiry, c.ExpirySet, c.ExpiryProp = 3600, true, 7200 }),
			closeCmd(nil)},
		{"new expiry capped",
			with(func(c *Close) { c.ExpirySet, c.ExpiryProp = true, 7200 }),
			closeCmd(func(s *replication.SessionClose) { s.SetExpiry, s.ExpiryInterval = true, 3600 })},
		{"DISCONNECT with expiry 0 deletes the session",
			with(func(c *Close) { c.Disconnect, c.Will, c.ExpirySet, c.ExpiryProp = true, true, true, 0 }),
			batch(closeCmd(func(s *replication.SessionClose) { disc(s); s.SetExpiry, s.ExpiryInterval = true, 0 }), drop, del)},
		{"dropped with expiry 0 and a will: the leader publishes it",
			with(func(c *Close) { c.Expiry, c.Will = 0, true }),
			closeCmd(nil)},
		{"dropped with expiry 0 and no will",
			with(func(c *Close) { c.Expiry = 0 }),
			batch(closeCmd(nil), del)},
		{"expiry 0 but the open is not known: no delete",
			with(func(c *Close) { c.Expiry, c.Opened, c.Disconnect = 0, 0, true }),
			batch(clear, &replication.SessionClose{ClientID: "c", Owner: "n1", At: 1234})},
		{"3.1.1 ignores the expiry property",
			with(func(c *Close) { c.ProtocolVersion, c.ExpirySet, c.ExpiryProp = 4, true, 0 }),
			closeCmd(nil)},
		{"never expires stays never",
			with(func(c *Close) {
				c.Expiry, c.MaxExpiry, c.ExpirySet, c.ExpiryProp = replication.NeverExpires, math.MaxUint32, true, math.MaxUint32
			}),
			closeCmd(nil)},
	} {
		if got := CloseCommands(c.in); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s:\n got %s\nwant %s", c.name, describe(got), describe(c.want))
		}
	}
}
