#!/usr/bin/env bash
# Runs a local broker on 127.0.0.1 with data under ./data, and stops it on Ctrl-C.
# One node for now; it becomes a three-node cluster (MQTT 1883-1885) with the
# cluster work.
set -euo pipefail
bin=${1:-bin/broker}
pids=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait
}
trap cleanup INT TERM EXIT

"$bin" serve --node-id node1 --data-dir ./data/node1 \
  --mqtt-addr 127.0.0.1:1883 --http-addr 127.0.0.1:8081 \
  --gossip-addr 127.0.0.1:7946 --cluster-addr 127.0.0.1:7947 --log-format text &
pids+=($!)

cat <<MSG

  broker running: MQTT on 127.0.0.1:1883, HTTP (/healthz /readyz /metrics) on 127.0.0.1:8081
  try:  mosquitto_sub -h 127.0.0.1 -p 1883 -t '#' -v
        mosquitto_pub -h 127.0.0.1 -p 1883 -t test/topic -m hi
  Ctrl-C stops it.

MSG
wait -n "${pids[@]}"
