package session

import (
	"fmt"
	"strings"

	"github.com/mqtt-ha/broker/replication"
)

// describe prints a command (a batch's commands one by one) for failure
// messages.
func describe(cmd replication.Command) string {
	if b, ok := cmd.(*replication.Batch); ok {
		var parts []string
		for _, c := range b.Commands {
			parts = append(parts, describe(c))
		}
		return "Batch[" + strings.Join(parts, ", ") + "]"
	}
	return fmt.Sprintf("%T%+v", cmd, cmd)
}
