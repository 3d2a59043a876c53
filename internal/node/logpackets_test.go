package node

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/logx"
)

// TestMochiPacketLogsCarryNoPayload: mochi logs the packet a hook refused
// ("publish packet error"); the line names it but holds neither payload
// nor password.
func TestMochiPacketLogsCarryNoPayload(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(logx.Rewrite(slog.NewJSONHandler(&buf, nil), packetSummary))
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "home/cam",
		PacketID: 7, Payload: []byte("very-secret-payload"), Connect: packets.ConnectParams{Password: []byte("hunter2")}}
	log.Error("publish packet error", "error", "refused", "hook", "h", "packet", pk)
	log.Debug("failed publishing packet", "packet", &pk)
	out := buf.String()
	for _, leak := range []string{"very-secret-payload", "hunter2", "dmVyeS1zZWNyZXQtcGF5bG9hZA"} {
		if strings.Contains(out, leak) {
			t.Fatalf("log carries %q:\n%s", leak, out)
		}
	}
	if !strings.Contains(out, `"topic":"home/cam"`) || !strings.Contains(out, `"payload_bytes":19`) || !strings.Contains(out, `"packet_id":7`) {
		t.Fatalf("log does not name the packet:\n%s", out)
	}
}
