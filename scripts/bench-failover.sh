#!/usr/bin/env bash
# Failover time on a three-node cluster with the project's load tool: a
# persistent session is connected to a node, the node is SIGKILLed
# (mqttload --failover-kill), and the time until a retained QoS 1 write is
# acknowledged by a survivor and until the session resumes on a survivor is
# measured from the kill. The victim is the raft leader in odd rounds (an
# election is part of the time) and a follower in even ones; it is
# restarted, with its data, before the next round.
#   scripts/bench-failover.sh [rounds] [markdown-out]   (defaults: 4, bin/bench-failover.md)
set -euo pipefail
rounds=${1:-4}
out=${2:-bin/bench-failover.md}
. scripts/bench-lib.sh
bench_init
declare -A pid

start() { # start NODE (1-3), with its data dir kept across restarts
  start_node "fo$1" "n$1" $((21680 + $1)) $((28680 + $1)) $((27636 + 10 * $1)) $((27637 + 10 * $1)) \
    --join 127.0.0.1:27646,127.0.0.1:27656,127.0.0.1:27666 --bootstrap-expect 3
  pid[$1]=$started
  pids=("${pid[@]}") # the cleanup's: not a killed node's old PID
}
ready() { # wait until every node is ready and node 1 knows a leader
  for i in 1 2 3; do
    for _ in $(seq 300); do curl -fs "127.0.0.1:2868$i/readyz" >/dev/null && break; sleep 0.1; done
    curl -fs "127.0.0.1:2868$i/readyz" >/dev/null || { echo "bench-failover: node $i not ready" >&2; exit 1; }
  done
}
leader() { curl -fs 127.0.0.1:28681/api/cluster | sed -n 's/.*"leader_id": "fo\([0-9]\)".*/\1/p' | head -1; }

for i in 1 2 3; do start "$i"; done
results="$tmp/results.tsv"
: >"$results"
for r in $(seq "$rounds"); do
  ready
  l=$(leader)
  [ -n "$l" ] || { echo "bench-failover: no leader" >&2; exit 1; }
  if [ $((r % 2)) -eq 1 ]; then v=$l; kind=leader; else v=$(( l % 3 + 1 )); kind=follower; fi
  survivors=$(for i in 1 2 3; do [ "$i" = "$v" ] || printf '127.0.0.1:2168%s,' "$i"; done)
  echo "failover round $r: SIGKILL $kind fo$v" >&2
  bin/mqttload --json --label "round $r: $kind" --pub "127.0.0.1:2168$v" --sub "${survivors%,}" \
    --failover-kill "${pid[$v]}" | tee -a "$results" >&2
  { wait "${pid[$v]}"; } 2>/dev/null || true
  start "$v"
done

{
  echo "| round: node killed | retained QoS 1 write acknowledged (ms) | persistent session resumed (ms) |"
  echo "|---|---|---|"
  awk "$awk_json"'
    { printf "| %s | %.0f | %.0f |\n", label($0), field($0, "retained_ms"), field($0, "session_ms") }' "$results"
} >"$out"
cat "$out"
echo "table written to $out" >&2
