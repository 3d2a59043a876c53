#!/usr/bin/env bash
# Delivery benchmark with the project's load tool, against a baseline in the
# same run: Debian's mosquitto, then this broker same-node and cross-node
# (three-node cluster on 127.0.0.1). Compare ratios, not absolute numbers.
#   scripts/bench-delivery.sh [duration]     (default 10s per case)
set -euo pipefail
dur=${1:-10s}
make -s build
go build -o bin/mqttload ./cmd/mqttload
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

printf 'listener 21883 127.0.0.1\nallow_anonymous true\npersistence false\n' > "$tmp/mosquitto.conf"
mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
join=127.0.0.1:27946,127.0.0.1:27956,127.0.0.1:27966
for i in 1 2 3; do
  bin/broker serve --node-id "bench$i" --data-dir "$tmp/n$i" --mqtt-addr "127.0.0.1:2288$i" \
    --http-addr "127.0.0.1:2808$i" --gossip-addr "127.0.0.1:279$((3 + i))6" --cluster-addr "127.0.0.1:279$((3 + i))7" \
    --advertise-host 127.0.0.1 --join "$join" --bootstrap-expect 3 --log-level warn --log-format json 2>"$tmp/n$i.log" &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:2808$i/readyz" >/dev/null && break; sleep 0.2; done
done

run() { bin/mqttload --label "$1" --pub "$2" --sub "$3" --qos "$4" --rate "$5" --duration "$dur"; }
for qos in 0 1; do
  for rate in 5000 0; do
    run "mosquitto" 127.0.0.1:21883 127.0.0.1:21883 "$qos" "$rate"
    run "broker same-node" 127.0.0.1:22881 127.0.0.1:22881 "$qos" "$rate"
    run "broker cross-node" 127.0.0.1:22881 127.0.0.1:22882 "$qos" "$rate"
  done
done
