package testutil

import (
	"strings"
	"testing"
)

func TestGoroutinesNamesAStuckFrame(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	for range 3 {
		go stuckHere(stop)
	}
	var got string
	Eventually(t, 5e9, func() error {
		got = Goroutines()
		if !strings.Contains(got, "3 x [chan receive] testutil.stuckHere (goroutines_test.go:24) < testutil.TestGoroutinesNamesAStuckFrame (goroutines_test.go:12)") {
			return errString("no line for the three stuck goroutines in:\n" + got)
		}
		return nil
	})
}

func stuckHere(stop chan struct{}) { <-stop }

type errString string

func (e errString) Error() string { return string(e) }
