package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// memberLeft reports whether membership saw node leave gracefully (not
// die): its clients' wills wait for the leave grace (hooks/wills.go).
func (n *Node) memberLeft(node string) bool {
	for _, m := range n.cluster.Status().Members {
		if m.ID == node {
			return m.State == "left"
		}
	}
	return false
}

// stoppedMarker is written in the data directory at the end of a graceful
// stop; the next start reads and removes it, and then gives the sessions
// the previous run left open the same grace as a leave.
const stoppedMarker = "stopped-gracefully"

// takeStoppedMarker reports whether the previous run stopped gracefully,
// and removes the marker (a crash of this run must not inherit it).
func takeStoppedMarker(dataDir string) (bool, error) {
	p := filepath.Join(dataDir, stoppedMarker)
	err := os.Remove(p)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("graceful-stop marker: %w", err)
}

func writeStoppedMarker(dataDir string) error {
	if err := os.WriteFile(filepath.Join(dataDir, stoppedMarker), nil, 0o600); err != nil {
		return fmt.Errorf("graceful-stop marker: %w", err)
	}
	return nil
}
