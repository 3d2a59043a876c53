#!/usr/bin/env bash
# Runs a local three-node cluster on 127.0.0.1 with data under ./data, and
# stops it all on Ctrl-C. Node i (1-3): MQTT 188(2+i), HTTP 808i,
# gossip 79(4+2i)6, cluster port 79(4+2i)7.
set -euo pipefail
bin=${1:-bin/broker}
pids=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
}
trap cleanup INT TERM EXIT

join=127.0.0.1:7946,127.0.0.1:7956,127.0.0.1:7966
for i in 1 2 3; do
  "$bin" serve --node-id "node$i" --data-dir "./data/node$i" \
    --mqtt-addr "127.0.0.1:$((1882 + i))" --http-addr "127.0.0.1:$((8080 + i))" \
    --gossip-addr "127.0.0.1:$((7936 + 10 * i))" --cluster-addr "127.0.0.1:$((7937 + 10 * i))" \
    --advertise-host 127.0.0.1 --join "$join" --bootstrap-expect 3 --log-format text \
    2> >(sed -u "s/^/[node$i] /" >&2) &
  pids+=($!)
done

cat <<MSG

  three-node cluster on 127.0.0.1: MQTT 1883, 1884, 1885; HTTP 8081, 8082, 8083
  try:  mosquitto_sub -h 127.0.0.1 -p 1884 -t '#' -v          # subscribe on node 2
        mosquitto_pub -h 127.0.0.1 -p 1883 -t test/topic -m hi  # publish on node 1
        bin/broker cluster status --http-addr 127.0.0.1:8081
  Ctrl-C stops all three.

MSG
wait -n "${pids[@]}"
