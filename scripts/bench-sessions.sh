#!/usr/bin/env bash
# Durable-session benchmark with the project's load tool: QoS 1 to
# persistent sessions on a three-node cluster (every message committed to
# the raft log before PUBACK, acknowledged deliveries replicated too),
# against the same run with clean sessions on the same cluster, and
# Debian's mosquitto (persistent sessions, persistence off) as a baseline.
# Publishers and subscribers are spread over the three nodes.
#   scripts/bench-sessions.sh [duration] [publishers] [subscribers] [rate]
set -euo pipefail
dur=${1:-10s}
pubs=${2:-48}
subs=${3:-48}
rate=${4:-0}
make -s build
go build -o bin/mqttload ./cmd/mqttload
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

printf 'listener 21893 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' > "$tmp/mosquitto.conf"
mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
join=127.0.0.1:26946,127.0.0.1:26956,127.0.0.1:26966
for i in 1 2 3; do
  bin/broker serve --node-id "sbench$i" --data-dir "$tmp/n$i" --mqtt-addr "127.0.0.1:2289$i" \
    --http-addr "127.0.0.1:2809$i" --gossip-addr "127.0.0.1:269$((3 + i))6" --cluster-addr "127.0.0.1:269$((3 + i))7" \
    --advertise-host 127.0.0.1 --join "$join" --bootstrap-expect 3 --log-level warn --log-format json 2>"$tmp/n$i.log" &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:2809$i/readyz" >/dev/null && break; sleep 0.2; done
done
nodes=127.0.0.1:22891,127.0.0.1:22892,127.0.0.1:22893
# Subscribers start on the node after their publisher's: every message
# crosses nodes.
subnodes=127.0.0.1:22892,127.0.0.1:22893,127.0.0.1:22891

run() { bin/mqttload --label "$1" --pub "$2" --sub "$3" --qos 1 --rate "$rate" --duration "$dur" \
  --publishers "$pubs" --subscribers "$subs" "${@:4}"; }
run "mosquitto persistent" 127.0.0.1:21893 127.0.0.1:21893 --persistent
run "cluster clean" "$nodes" "$subnodes"
run "cluster persistent" "$nodes" "$subnodes" --persistent
