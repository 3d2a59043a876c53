#!/usr/bin/env bash
# test-digest.sh FILE: after a failed go test run, print what failed from
# its saved output, so that the tail of a long CI log (often all a reader
# gets) names the cause: each failing test's first lines, and the first
# lines of a crash (panic, fatal error, data race) that names no test.
set -uo pipefail
out=${1:?usage: test-digest.sh FILE}
[[ -f $out ]] || exit 0
echo "===== test digest (full output: $out) ====="
grep -E '^FAIL\s' "$out" || true
# Crashes: the first 40 lines from each 'panic:', 'fatal error:' or race
# report (a goroutine dump's tail is useless without its head).
grep -nE '^(panic: |fatal error: |WARNING: DATA RACE|race: limit)' "$out" | head -5 | while IFS=: read -r line _; do
	echo "--- at line $line:"
	sed -n "${line},$((line + 40))p" "$out" | grep -v '^\s*{"time"' | cut -c1-300
done
# A timeout's dump holds thousands of goroutines; the ones that matter
# are the tests' own (a frame in a _test.go file): print those, and the
# most common top frames (a livelock shows as one frame many times).
if grep -q '^panic: test timed out' "$out"; then
	echo "--- goroutines in test code at the timeout:"
	awk '/^panic: test timed out/ {on=1} on' "$out" |
		awk 'BEGIN {RS=""} /_test\.go:/ {print; print ""; if (++n == 8) exit}' |
		grep -v '^\s*{"time"' | cut -c1-300 | head -150
	echo "--- most common top frames:"
	awk '/^panic: test timed out/ {on=1} on' "$out" |
		awk '/^goroutine [0-9]+ \[/ {getline f; print f}' | sed 's/(0x.*//' |
		sort | uniq -c | sort -rn | head -8
fi
# Failing tests: each --- FAIL line with the 6 lines after it.
grep -nE '^\s*--- FAIL' "$out" | head -20 | while IFS=: read -r line _; do
	sed -n "${line},$((line + 6))p" "$out" | grep -v '^\s*{"time"' | cut -c1-300
done
