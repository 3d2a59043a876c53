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
make -s build
go build -o bin/mqttload ./cmd/mqttload
go build -o bin/mochi-baseline ./cmd/mochi-baseline
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
printf 'listener 21883 127.0.0.1\nallow_anonymous true\npersistence false\n' > "$tmp/mosquitto.conf"
"$mosq" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pid_mosquitto=$!
pids+=("$pid_mosquitto")
bin/mochi-baseline --addr 127.0.0.1:21884 2>"$tmp/mochi.log" &
pid_mochi=$!
pids+=("$pid_mochi")
bin/broker serve --node-id solo --data-dir "$tmp/solo" --mqtt-addr 127.0.0.1:22880 --http-addr 127.0.0.1:28080 \
  --gossip-addr 127.0.0.1:27936 --cluster-addr 127.0.0.1:27937 --advertise-host 127.0.0.1 --bootstrap-expect 1 \
  --log-level warn --log-format json 2>"$tmp/solo.log" &
pid_solo=$!
pids+=("$pid_solo")
join=127.0.0.1:27946,127.0.0.1:27956,127.0.0.1:27966
cluster_pids=()
for i in 1 2 3; do
  bin/broker serve --node-id "bench$i" --data-dir "$tmp/n$i" --mqtt-addr "127.0.0.1:2288$i" \
    --http-addr "127.0.0.1:2808$i" --gossip-addr "127.0.0.1:279$((3 + i))6" --cluster-addr "127.0.0.1:279$((3 + i))7" \
    --advertise-host 127.0.0.1 --join "$join" --bootstrap-expect 3 --log-level warn --log-format json 2>"$tmp/n$i.log" &
  pids+=($!)
  cluster_pids+=($!)
done
for port in 28080 28081 28082 28083; do
  for _ in $(seq 150); do curl -fs "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
done

hz=$(getconf CLK_TCK)
# cpu PID...: user+system clock ticks of the processes.
cpu() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }

results="$tmp/results.tsv"
: >"$results"
# run ROUND LABEL PUB SUB QOS RATE PID...
run() {
  local round=$1 label=$2 pub=$3 sub=$4 qos=$5 rate=$6
  shift 6
  local before after json recv
  before=$(cpu "$@")
  json=$(bin/mqttload --json --label "$label" --pub "$pub" --sub "$sub" --qos "$qos" --rate "$rate" --duration "$dur")
  after=$(cpu "$@")
  recv=$(echo "$json" | sed -E 's/.*"received":([0-9]+).*/\1/')
  local us=0
  if [ "$recv" -gt 0 ]; then us=$(( (after - before) * 1000000 / hz / recv )); fi
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
  awk -F'\t' '
    function field(j, k,   m) { if (match(j, "\"" k "\":[0-9.]+")) { m = substr(j, RSTART, RLENGTH); sub(/.*:/, "", m); return m } return 0 }
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
