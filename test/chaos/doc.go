// Package chaos runs a seeded fault campaign (kill, pause, rolling restart,
// network partition, full restart) against a three-node cluster of real
// broker processes, each in its own network namespace when the test runs
// as root, and checks a recorded history of client operations against the
// guarantees the broker provides today (see README.md). Every campaign
// writes a JSON report, the history and an SVG timeline.
//
// Run with:
//
//	go test -count=1 -v ./test/chaos/
//	CHAOS_DURATION=10m CHAOS_SEED=42 go test -count=1 -v -timeout 0 ./test/chaos/
package chaos
