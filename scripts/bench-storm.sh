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
make -s build
go build -o bin/mqttload ./cmd/mqttload
go build -o bin/mochi-baseline ./cmd/mochi-baseline
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
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

mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
printf 'listener 21783 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n' >"$tmp/mosquitto.conf"
"$mosq" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
p=$!; pids+=("$p")
sleep 0.5
storm mosquitto 127.0.0.1:21783 "$p"
kill "$p"

bin/mochi-baseline --addr 127.0.0.1:21784 2>"$tmp/mochi.log" &
p=$!; pids+=("$p")
sleep 0.5
storm mochi 127.0.0.1:21784 "$p"
kill "$p"

bin/broker serve --node-id storm-solo --data-dir "$tmp/solo" --mqtt-addr 127.0.0.1:21780 --http-addr 127.0.0.1:28780 \
  --gossip-addr 127.0.0.1:27736 --cluster-addr 127.0.0.1:27737 --advertise-host 127.0.0.1 --bootstrap-expect 1 \
  --log-level warn --log-format json 2>"$tmp/solo.log" &
p=$!; pids+=("$p")
for _ in $(seq 150); do curl -fs 127.0.0.1:28780/readyz >/dev/null && break; sleep 0.2; done
storm "broker 1 node" 127.0.0.1:21780 "$p"
kill "$p"

join=127.0.0.1:27746,127.0.0.1:27756,127.0.0.1:27766
cluster=()
for i in 1 2 3; do
  bin/broker serve --node-id "storm$i" --data-dir "$tmp/n$i" --mqtt-addr "127.0.0.1:2178$i" \
    --http-addr "127.0.0.1:2878$i" --gossip-addr "127.0.0.1:277$((3 + i))6" --cluster-addr "127.0.0.1:277$((3 + i))7" \
    --advertise-host 127.0.0.1 --join "$join" --bootstrap-expect 3 --log-level warn --log-format json 2>"$tmp/n$i.log" &
  pids+=($!)
  cluster+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 150); do curl -fs "127.0.0.1:2878$i/readyz" >/dev/null && break; sleep 0.2; done
done
storm "broker, node of 3" 127.0.0.1:21781 "${cluster[0]}"

{
  echo "| broker | connects/s, one at a time | vs mochi | connects/s, $wave at once | vs mochi | KB per idle connection ($n) | vs mochi |"
  echo "|---|---|---|---|---|---|---|"
  # Each line: the sequential storm's JSON, then the concurrent one's.
  awk '
    function field(j, k,   m) { if (match(j, "\"" k "\":[0-9.e+-]+")) { m = substr(j, RSTART, RLENGTH); sub(/[^:]*:/, "", m); return m + 0 } return 0 }
    function label(j,   m) { if (match(j, "\"label\":\"[^\"]*\"")) { m = substr(j, RSTART + 9, RLENGTH - 10); return m } return "?" }
    { split($0, half, "} {"); l[NR] = label(half[1]); c[NR] = field(half[1], "connects_per_s"); w[NR] = field(half[2], "connects_per_s"); k[NR] = field(half[1], "kb_per_connection")
      if (l[NR] == "mochi") { bc = c[NR]; bw = w[NR]; bk = k[NR] } }
    END { for (i = 1; i <= NR; i++) printf "| %s | %.0f | %.2f | %.0f | %.2f | %.1f | %.2f |\n", l[i], c[i], (bc ? c[i] / bc : 0), w[i], (bw ? w[i] / bw : 0), k[i], (bk ? k[i] / bk : 0) }' "$results"
} >"$out"
cat "$out"
echo "table written to $out" >&2
