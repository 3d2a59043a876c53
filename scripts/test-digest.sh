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
# Failing tests: each --- FAIL line with the 6 lines after it.
grep -nE '^\s*--- FAIL' "$out" | head -20 | while IFS=: read -r line _; do
	sed -n "${line},$((line + 6))p" "$out" | grep -v '^\s*{"time"' | cut -c1-300
done
