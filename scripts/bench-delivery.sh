#!/usr/bin/env bash
# Delivery benchmark with the project's load tool, every broker in the same
# run: Debian's mosquitto, a standalone mochi (cmd/mochi-baseline, the mochi
# version the broker embeds), this broker as one node, and a three-node
# cluster same-node and cross-node (all on 127.0.0.1). For each case:
# throughput, publish-to-delivery latency, and the brokers' CPU time per
# message delivered (user+system from /proc, every node of the case summed),
# also as a ratio of standalone mochi's in the same round. Compare ratios,
# not absolute numbers: the load tool shares the machine.
#   scripts/bench-delivery.sh [duration] [rounds] [markdown-out]
#   (defaults: 10s per case, 2 rounds, bin/bench-delivery.md)
set -euo pipefail
dur=${1:-10s}
rounds=${2:-2}
out=${3:-bin/bench-delivery.md}
. scripts/bench-lib.sh
bench_init mochi

start_lineup solo bench 21883 22880 28080 27936

results="$tmp/results.tsv"
: >"$results"
# run ROUND LABEL PUB SUB QOS RATE PID...
run() {
  local round=$1 label=$2 pub=$3 sub=$4 qos=$5 rate=$6
  shift 6
  local before after json us
  before=$(cpu "$@")
  json=$(bin/mqttload --json --label "$label" --pub "$pub" --sub "$sub" --qos "$qos" --rate "$rate" --duration "$dur")
  after=$(cpu "$@")
  us=$(us_per_msg "$before" "$after" "$json")
  echo "$json" | sed -E "s/^/round $round: /; s/\$/ cpu_us_per_msg=$us/" >&2
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$qos" "$rate" "$label" "$us" "$json" >>"$results"
}

for round in $(seq "$rounds"); do
  for qos in 0 1; do
    for rate in 5000 0; do
      echo "round $round/$rounds: QoS $qos, rate ${rate/#0/unpaced}" >&2
      run "$round" "mosquitto" 127.0.0.1:21883 127.0.0.1:21883 "$qos" "$rate" "$pid_mosquitto"
      run "$round" "mochi" 127.0.0.1:21884 127.0.0.1:21884 "$qos" "$rate" "$pid_mochi"
      run "$round" "broker 1 node" 127.0.0.1:22880 127.0.0.1:22880 "$qos" "$rate" "$pid_solo"
      run "$round" "broker same-node" 127.0.0.1:22881 127.0.0.1:22881 "$qos" "$rate" "${cluster_pids[@]}"
      run "$round" "broker cross-node" 127.0.0.1:22881 127.0.0.1:22882 "$qos" "$rate" "${cluster_pids[@]}"
    done
  done
done

# The table: one line per case and round, CPU per message also as a ratio
# of mochi's in the same round, QoS and rate.
{
  echo "| round | QoS | rate (msg/s) | case | delivered msg/s | p50 / p99 / p99.9 / max (ms) | CPU µs/msg | CPU vs mochi |"
  echo "|---|---|---|---|---|---|---|---|"
  awk -F'\t' "$awk_json"'
    { key = $1 "|" $2 "|" $3; lines[NR] = $0; if ($4 == "mochi") base[key] = $5 }
    END {
      for (i = 1; i <= NR; i++) {
        split(lines[i], f, "\t"); key = f[1] "|" f[2] "|" f[3]
        ratio = (base[key] > 0) ? sprintf("%.2f", f[5] / base[key]) : "-"
        rate = (f[3] == 0) ? "unpaced" : f[3]
        printf "| %s | %s | %s | %s | %.0f | %.2f / %.2f / %.2f / %.2f | %s | %s |\n", f[1], f[2], rate, f[4],
          field(f[6], "throughput_msgs_per_s"), field(f[6], "p50_us") / 1000, field(f[6], "p99_us") / 1000,
          field(f[6], "p999_us") / 1000, field(f[6], "max_us") / 1000, f[5], ratio
      }
    }' "$results"
} >"$out"
cat "$out"
echo "table written to $out" >&2
# Latency distributions of round 1 at the paced rate, one SVG per QoS.
go build -o bin/benchplot ./cmd/benchplot
for qos in 0 1; do
  awk -F'\t' -v q="$qos" '$1 == 1 && $2 == q && $3 == 5000 { print $6 }' "$results" |
    bin/benchplot --title "QoS $qos at 5,000 msg/s: publish-to-delivery latency (round 1)" >"${out%.md}-latency-qos$qos.svg"
  echo "plot written to ${out%.md}-latency-qos$qos.svg" >&2
done
