#!/usr/bin/env bash
# Connection storm with the project's load tool: connects per second
# (CONNECT then CONNACK, one client after another, then from 64 clients at
# once: a wave of devices reconnecting after a node loss) and resident
# memory per idle connection with N connections held open (after the first
# storm), for Debian's mosquitto, a
# standalone mochi (cmd/mochi-baseline, mochi's defaults), this broker as
# one node, and one node of a three-node cluster. Each broker is fresh.
#   scripts/bench-storm.sh [connections] [markdown-out]
#   (defaults: 10000, bin/bench-storm.md)
set -euo pipefail
n=${1:-10000}
out=${2:-bin/bench-storm.md}
. scripts/bench-lib.sh
bench_init mochi
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((n + 1000)) ]; then
  echo "bench-storm: open-file limit $(ulimit -n) is below $n connections; run with fewer" >&2
  exit 1
fi

results="$tmp/results.tsv"
: >"$results"
wave=64
# storm LABEL ADDR PID...: N connections one after another (memory measured
# with all of them open), then N more from $wave clients at once.
storm() {
  local label=$1 addr=$2
  shift 2
  local pidlist seq conc
  pidlist=$(IFS=,; echo "$*")
  echo "storm: $label, $n connections one after another" >&2
  seq=$(bin/mqttload --json --label "$label" --pub "$addr" --connections "$n" --rss-pids "$pidlist")
  echo "$seq" >&2
  echo "storm: $label, $n connections, $wave at once" >&2
  conc=$(bin/mqttload --json --label "$label" --pub "$addr" --connections "$n" --connectors "$wave" --settle 0s)
  echo "$conc" >&2
  echo "$seq $conc" >>"$results"
}

start_mosquitto 21783 'max_connections -1'
sleep 0.5
storm mosquitto 127.0.0.1:21783 "$started"
kill "$started"

start_mochi 21784
sleep 0.5
storm mochi 127.0.0.1:21784 "$started"
kill "$started"

start_node storm-solo solo 21780 28780 27736 27737
wait_ready 28780
storm "broker 1 node" 127.0.0.1:21780 "$started"
kill "$started"

start_cluster storm n 21780 28780 27736 1 3
wait_ready 28781 28782 28783
storm "broker, node of 3" 127.0.0.1:21781 "${cluster_pids[0]}"

{
  echo "| broker | connects/s, one at a time | vs mochi | connects/s, $wave at once | vs mochi | KB per idle connection ($n) | vs mochi |"
  echo "|---|---|---|---|---|---|---|"
  # Each line: the sequential storm's JSON, then the concurrent one's.
  awk "$awk_json"'
    { split($0, half, "} {"); l[NR] = label(half[1]); c[NR] = field(half[1], "connects_per_s"); w[NR] = field(half[2], "connects_per_s"); k[NR] = field(half[1], "kb_per_connection")
      if (l[NR] == "mochi") { bc = c[NR]; bw = w[NR]; bk = k[NR] } }
    END { for (i = 1; i <= NR; i++) printf "| %s | %.0f | %.2f | %.0f | %.2f | %.1f | %.2f |\n", l[i], c[i], (bc ? c[i] / bc : 0), w[i], (bw ? w[i] / bw : 0), k[i], (bk ? k[i] / bk : 0) }' "$results"
} >"$out"
cat "$out"
echo "table written to $out" >&2
