package session

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"github.com/mqtt-ha/broker/replication"
)

func TestSubscribeCode(t *testing.T) {
	for _, c := range []struct {
		name                    string
		valid, allowed, obscure bool
		qos, maxQoS, version    byte
		code, granted           byte
		ok                      bool
	}{
		{"granted as asked", true, true, false, 1, 2, 5, 1, 1, true},
		{"downgraded to the maximum", true, true, false, 2, 1, 5, 1, 1, true},
		{"QoS 0", true, true, false, 0, 2, 4, 0, 0, true},
		{"invalid filter", false, false, false, 1, 2, 5, 0x8F, 0, false},
		{"invalid filter, 3.1.1", false, false, false, 1, 2, 4, 0x80, 0, false},
		{"not authorized", true, false, false, 1, 2, 5, 0x87, 0, false},
		{"not authorized, obscured", true, false, true, 1, 2, 5, 0x80, 0, false},
		{"not authorized, 3.1.1", true, false, false, 1, 2, 4, 0x80, 0, false},
		{"invalid wins over the ACL", false, true, false, 1, 2, 5, 0x8F, 0, false},
	} {
		code, granted, ok := SubscribeCode(c.valid, c.allowed, c.obscure, c.qos, c.maxQoS, c.version)
		if code != c.code || granted != c.granted || ok != c.ok {
			t.Errorf("%s: SubscribeCode = %#x, %d, %v; want %#x, %d, %v", c.name, code, granted, ok, c.code, c.granted, c.ok)
		}
	}
}

func TestSubackMerge(t *testing.T) {
	for _, c := range []struct {
		name  string
		p     Suback
		mochi []byte
		want  []byte
	}{
		{"none left to mochi", Suback{Codes: []byte{1, 0x87}}, []byte{}, []byte{1, 0x87}},
		{"shared filters in between", Suback{Codes: []byte{1, 0, 2, 0}, Mochi: []int{1, 3}}, []byte{0x02, 0x97},
			[]byte{1, 0x02, 2, 0x97}},
		{"mochi's SUBACK shorter than its filters", Suback{Codes: []byte{0, 0, 1}, Mochi: []int{0, 1}}, []byte{0x91},
			[]byte{0x91, 0, 1}},
	} {
		if got := c.p.Merge(c.mochi); !bytes.Equal(got, c.want) {
			t.Errorf("%s: Merge = %x, want %x", c.name, got, c.want)
		}
	}
}

func TestChunkCommands(t *testing.T) {
	enq := func(topic string, n int) *replication.Enqueue {
		return &replication.Enqueue{Topic: topic, Payload: []byte(strings.Repeat("x", n))}
	}
	other := &replication.Ack{ClientID: "c"}
	a, b, c, d := enq("a", 1000-256-1), enq("b", 500-256-1), enq("c", 600-256-1), enq("d", 5000)
	for _, tc := range []struct {
		name   string
		cmds   []replication.Command
		budget int
		want   [][]replication.Command
	}{
		{"empty", nil, 1000, nil},
		{"one group", []replication.Command{a, other}, 1000 + 256, [][]replication.Command{{a, other}}},
		{"exactly the budget stays together", []replication.Command{b, b}, 1000, [][]replication.Command{{b, b}}},
		{"split in order", []replication.Command{a, b, c, other}, 1000,
			[][]replication.Command{{a}, {b}, {c, other}}},
		{"larger than the budget: alone", []replication.Command{b, d, b}, 1000,
			[][]replication.Command{{b}, {d}, {b}}},
		{"non-enqueues count 256 bytes", []replication.Command{other, other, other, other, other}, 512,
			[][]replication.Command{{other, other}, {other, other}, {other}}},
	} {
		got := ChunkCommands(tc.cmds, tc.budget)
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: %d groups %v, want %d groups %v", tc.name, len(got), sizes(got), len(tc.want), sizes(tc.want))
		}
	}
}

func sizes(groups [][]replication.Command) []int {
	var out []int
	for _, g := range groups {
		out = append(out, len(g))
	}
	return out
}
