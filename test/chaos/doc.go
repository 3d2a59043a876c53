// Package chaos runs a seeded fault campaign against a three-node cluster of
// real broker processes and checks a recorded history of client operations
// against the guarantees the broker provides today (see README.md).
//
// Run with:
//
//	go test -count=1 -v ./test/chaos/
//	CHAOS_DURATION=10m CHAOS_SEED=42 go test -count=1 -v -timeout 0 ./test/chaos/
package chaos
