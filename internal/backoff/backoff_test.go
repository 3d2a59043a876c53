package backoff

import (
	"testing"
	"time"
)

func TestAccept(t *testing.T) {
	var a Accept
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i, w := range want {
		if got := a.Failed(); got != w*time.Millisecond {
			t.Fatalf("failure %d: wait %v, want %v", i+1, got, w*time.Millisecond)
		}
	}
	a.Succeeded()
	if got := a.Failed(); got != 5*time.Millisecond {
		t.Fatalf("after a success: wait %v, want 5ms", got)
	}
}
