// Package e2e drives the real broker binary as a separate process with real
// clients: Debian's mosquitto_pub, mosquitto_sub and mosquitto_passwd, and
// the paho.golang MQTT 5 client.
//
// TestMain builds ./cmd/broker once; each test starts its own node(s) on free
// 127.0.0.1 ports with a temporary data directory (see harness_test.go).
// Nothing waits with fixed sleeps: every wait is a condition polled by
// eventually (or poll) against a deadline.
//
// Run with:
//
//	go test -race ./test/e2e/
//
// E2E_BROKER_BIN=/path/to/broker tests a prebuilt binary instead of
// building one. E2E_RACE=1 builds the broker itself with -race (slower; any data race it
// reports fails the test that started the node). E2E_LOG_LEVEL sets the
// broker's --log-level (default info). A node's output is printed only when
// its test fails.
package e2e
