package chaos

import (
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// waitStopped tells a running process from a stopped one.
func TestWaitStopped(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	pid := cmd.Process.Pid
	if err := waitStopped(pid, 50*time.Millisecond); err == nil {
		t.Fatal("a running process was reported stopped")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	if err := waitStopped(pid, 5*time.Second); err != nil {
		t.Fatalf("a stopped process: %v", err)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if err := waitStopped(pid, 50*time.Millisecond); err == nil {
		t.Fatal("a continued process was reported stopped")
	}
}
