#!/usr/bin/env bash
# Traffic-pattern benchmark with the project's load tool, every broker in
# the same run: Debian's mosquitto, a standalone mochi (cmd/mochi-baseline),
# this broker as one node, and a three-node cluster whose clients are spread
# over its nodes (round robin: most messages cross nodes). Cases:
#   fan-in:   8 publishers to one subscriber, QoS 0 and 1, paced at 8,000
#             msg/s in all and unpaced (then "lost" is what the broker's
#             drop policy did to a subscriber that cannot keep up);
#   fan-out:  one publisher at 500 msg/s to 16 subscribers of one topic
#             (8,000 deliveries/s), QoS 0 and 1;
#   retained: 16 publishers each overwriting its own retained topic, QoS 1,
#             one write in flight each, unpaced (on the cluster every
#             retained write is a raft commit before its PUBACK).
# For each: deliveries per second, messages lost, publish-to-delivery
# latency (p50, p99, p99.9, max) and the brokers' CPU per delivery
# (user+system from /proc, every node of the case summed), also as a ratio
# of standalone mochi's in the same case.
#   scripts/bench-patterns.sh [duration] [markdown-out]
#   (defaults: 10s per case, bin/bench-patterns.md)
set -euo pipefail
dur=${1:-10s}
out=${2:-bin/bench-patterns.md}
. scripts/bench-lib.sh
bench_init mochi

start_lineup psolo pat 21903 22900 28100 27986
nodes=127.0.0.1:22901,127.0.0.1:22902,127.0.0.1:22903


results="$tmp/results.tsv"
: >"$results"
# run CASE BROKER ADDRS "MQTTLOAD ARGS" PID...: ADDRS serve both publishers
# and subscribers (round robin over a list).
run() {
  local kase=$1 broker=$2 addrs=$3 args=$4
  shift 4
  local before after json us
  echo "patterns: $kase, $broker" >&2
  before=$(cpu "$@")
  # shellcheck disable=SC2086 # args is a word list
  json=$(bin/mqttload --json --label "$broker" --pub "$addrs" --sub "$addrs" --duration "$dur" $args)
  after=$(cpu "$@")
  us=$(us_per_msg "$before" "$after" "$json")
  printf '%s\t%s\t%s\t%s\n' "$kase" "$broker" "$us" "$json" >>"$results"
}
cases=(
  "fan-in QoS 0, 8 publishers, 8,000 msg/s|--publishers 8 --subscribers 1 --qos 0 --rate 8000"
  "fan-in QoS 0, 8 publishers, unpaced|--publishers 8 --subscribers 1 --qos 0 --rate 0"
  "fan-in QoS 1, 8 publishers, 8,000 msg/s|--publishers 8 --subscribers 1 --qos 1 --rate 8000"
  "fan-in QoS 1, 8 publishers, unpaced|--publishers 8 --subscribers 1 --qos 1 --rate 0"
  "fan-out QoS 0, 1 publisher at 500 msg/s to 16|--fanout --publishers 1 --subscribers 16 --qos 0 --rate 500"
  "fan-out QoS 1, 1 publisher at 500 msg/s to 16|--fanout --publishers 1 --subscribers 16 --qos 1 --rate 500"
  "retained QoS 1 writes, 16 publishers, unpaced|--retain --publishers 16 --subscribers 16 --qos 1 --rate 0"
)
for c in "${cases[@]}"; do
  kase=${c%%|*}
  args=${c#*|}
  run "$kase" "mosquitto" 127.0.0.1:21903 "$args" "$pid_mosquitto"
  run "$kase" "mochi" 127.0.0.1:21904 "$args" "$pid_mochi"
  run "$kase" "broker 1 node" 127.0.0.1:22900 "$args" "$pid_solo"
  run "$kase" "broker 3 nodes" "$nodes" "$args" "${cluster_pids[@]}"
done

{
  echo "| case | broker | deliveries/s | lost | p50 / p99 / p99.9 / max (ms) | CPU µs/delivery | CPU vs mochi |"
  echo "|---|---|---|---|---|---|---|"
  awk -F'\t' "$awk_json"'
    { lines[NR] = $0; if ($2 == "mochi") base[$1] = $3 }
    END {
      for (i = 1; i <= NR; i++) {
        split(lines[i], f, "\t")
        ratio = (base[f[1]] > 0) ? sprintf("%.2f", f[3] / base[f[1]]) : "-"
        printf "| %s | %s | %.0f | %d of %d | %.2f / %.2f / %.2f / %.2f | %s | %s |\n", f[1], f[2],
          field(f[4], "throughput_msgs_per_s"), field(f[4], "lost"), field(f[4], "expected"),
          field(f[4], "p50_us") / 1000, field(f[4], "p99_us") / 1000, field(f[4], "p999_us") / 1000,
          field(f[4], "max_us") / 1000, f[3], ratio
      }
    }' "$results"
} >"$out"
cat "$out"
echo "table written to $out" >&2
