#!/usr/bin/env bash
# Connection storm with the project's load tool: connects per second
# (CONNECT then CONNACK, one client after another) and resident memory per
# idle connection with N connections held open, for Debian's mosquitto, a
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
# storm LABEL ADDR PID...
storm() {
  local label=$1 addr=$2
  shift 2
  local pidlist
  pidlist=$(IFS=,; echo "$*")
  echo "storm: $label, $n connections" >&2
  bin/mqttload --json --label "$label" --pub "$addr" --connections "$n" --rss-pids "$pidlist" | tee -a "$results" >&2
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
  echo "| broker | connects/s | vs mochi | KB per idle connection ($n) | vs mochi |"
  echo "|---|---|---|---|---|"
  awk '
    function field(j, k,   m) { if (match(j, "\"" k "\":[0-9.e+-]+")) { m = substr(j, RSTART, RLENGTH); sub(/[^:]*:/, "", m); return m + 0 } return 0 }
    function label(j,   m) { if (match(j, "\"label\":\"[^\"]*\"")) { m = substr(j, RSTART + 9, RLENGTH - 10); return m } return "?" }
    { l[NR] = label($0); c[NR] = field($0, "connects_per_s"); k[NR] = field($0, "kb_per_connection"); if (l[NR] == "mochi") { bc = c[NR]; bk = k[NR] } }
    END { for (i = 1; i <= NR; i++) printf "| %s | %.0f | %.2f | %.1f | %.2f |\n", l[i], c[i], (bc ? c[i] / bc : 0), k[i], (bk ? k[i] / bk : 0) }' "$results"
} >"$out"
cat "$out"
echo "table written to $out" >&2
