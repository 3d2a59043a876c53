#!/usr/bin/env bash
# Durable-session benchmark with the project's load tool: QoS 1 into
# persistent sessions on a three-node cluster (every message committed to
# the raft log before its PUBACK; deliveries acknowledged through the log
# too), every message crossing nodes, against Debian's mosquitto
# (persistent sessions, persistence off: nothing on disk) in the same run.
# One publisher connection (waiting for each PUBACK, and with 64 in
# flight, which the publish pipeline commits in batches), and many; the
# cluster cases again with the experimental --read-lease, and two with the
# experimental --raft-pipeline.
#   scripts/bench-sessions.sh [duration] [publishers] [markdown-out]
#   (defaults: 10s, 48, bin/bench-sessions.md)
set -euo pipefail
dur=${1:-10s}
pubs=${2:-48}
out=${3:-bin/bench-sessions.md}
make -s build
go build -o bin/mqttload ./cmd/mqttload
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
printf 'listener 21893 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 65535\n' > "$tmp/mosquitto.conf"
"$mosq" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
# Two clusters: nodes 1-3 with the defaults, nodes 4-6 with --read-lease.
for i in 1 2 3 4 5 6; do
  if [ "$i" -le 3 ]; then join=127.0.0.1:26946,127.0.0.1:26956,127.0.0.1:26966; extra=(); else
    join=127.0.0.1:26976,127.0.0.1:26986,127.0.0.1:26996; extra=(--read-lease); fi
  bin/broker serve --node-id "sbench$i" --data-dir "$tmp/n$i" --mqtt-addr "127.0.0.1:2289$i" \
    --http-addr "127.0.0.1:2809$i" --gossip-addr "127.0.0.1:269$((3 + i))6" --cluster-addr "127.0.0.1:269$((3 + i))7" \
    --advertise-host 127.0.0.1 --join "$join" --bootstrap-expect 3 --max-queued-messages 65535 "${extra[@]}" \
    --log-level warn --log-format json 2>"$tmp/n$i.log" &
  pids+=($!)
done
for i in 1 2 3 4 5 6; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:2809$i/readyz" >/dev/null && break; sleep 0.2; done
done
nodes=127.0.0.1:22891,127.0.0.1:22892,127.0.0.1:22893
# Subscribers start on the node after their publisher's: every message
# crosses nodes.
subnodes=127.0.0.1:22892,127.0.0.1:22893,127.0.0.1:22891
lnodes=127.0.0.1:22894,127.0.0.1:22895,127.0.0.1:22896
lsubnodes=127.0.0.1:22895,127.0.0.1:22896,127.0.0.1:22894

results="$tmp/results.jsonl"
: >"$results"
# counters PID...: user+system clock ticks, and read plus write system
# calls (/proc/PID/io syscr + syscw), of the processes.
counters() {
  local t=0 s=0 p
  for p in "$@"; do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    s=$((s + $(awk '/^sysc[rw]:/ {n += $2} END {print n}' "/proc/$p/io")))
  done
  echo "$t $s"
}
hz=$(getconf CLK_TCK)
# run LABEL PUB SUB PUBLISHERS INFLIGHT PID...: the PIDs are the case's
# brokers, whose CPU time and system calls per delivered message are added
# to the result (system calls vary far less between runs than throughput
# on this shared machine, so they show what a change saves).
run() {
  echo "sessions: $1" >&2
  local label=$1 pub=$2 sub=$3 n=$4 inflight=$5 t0 s0 t1 s1 json recv cpu=0 sys=0
  shift 5
  read -r t0 s0 < <(counters "$@")
  json=$(bin/mqttload --json --label "$label" --pub "$pub" --sub "$sub" --qos 1 --rate 0 --duration "$dur" \
    --publishers "$n" --subscribers "$n" --inflight "$inflight" --persistent)
  read -r t1 s1 < <(counters "$@")
  recv=$(echo "$json" | sed -E 's/.*"received":([0-9]+).*/\1/')
  if [ "$recv" -gt 0 ]; then
    cpu=$(( (t1 - t0) * 1000000 / hz / recv ))
    sys=$(awk -v a="$s0" -v b="$s1" -v r="$recv" 'BEGIN {printf "%.1f", (b - a) / r}')
  fi
  echo "{\"cpu_us_per_msg\":$cpu,\"syscalls_per_msg\":$sys,${json#\{}" | tee -a "$results" >&2
}
run "mosquitto, 1 publisher, 1 in flight" 127.0.0.1:21893 127.0.0.1:21893 1 1 "${pids[0]}"
run "mosquitto, 1 publisher, 64 in flight" 127.0.0.1:21893 127.0.0.1:21893 1 64 "${pids[0]}"
run "mosquitto, $pubs publishers" 127.0.0.1:21893 127.0.0.1:21893 "$pubs" 1 "${pids[0]}"
run "cluster, 1 publisher, 1 in flight" 127.0.0.1:22891 127.0.0.1:22892 1 1 "${pids[@]:1:3}"
run "cluster, 1 publisher, 64 in flight" 127.0.0.1:22891 127.0.0.1:22892 1 64 "${pids[@]:1:3}"
run "cluster, $pubs publishers" "$nodes" "$subnodes" "$pubs" 1 "${pids[@]:1:3}"
run "cluster, $pubs publishers, 16 in flight" "$nodes" "$subnodes" "$pubs" 16 "${pids[@]:1:3}"
# Resume with a backlog: 10,000 QoS 1 messages of 1 KiB queued for a
# persistent session while it is away, then the time to its CONNACK and
# until all of them arrived.
backlogs="$tmp/backlog.jsonl"
: >"$backlogs"
backlog() {
  echo "sessions: backlog, $1" >&2
  bin/mqttload --json --label "$1" --pub "$2" --sub "$3" --backlog 10000 --size 1024 --inflight 64 | tee -a "$backlogs" >&2
}
backlog "mosquitto" 127.0.0.1:21893 127.0.0.1:21893
backlog "cluster (published on one node, resumed on another)" 127.0.0.1:22891 127.0.0.1:22892
run "cluster --read-lease, 1 publisher, 1 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 1 "${pids[@]:4:3}"
run "cluster --read-lease, 1 publisher, 64 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 64 "${pids[@]:4:3}"
run "cluster --read-lease, $pubs publishers" "$lnodes" "$lsubnodes" "$pubs" 1 "${pids[@]:4:3}"
run "cluster --read-lease, $pubs publishers, 16 in flight" "$lnodes" "$lsubnodes" "$pubs" 16 "${pids[@]:4:3}"

# A third cluster with --raft-pipeline, started once the lease cluster is
# stopped (its idle heartbeats would share the CPU): nodes 4-6's addresses
# again, fresh data dirs.
for i in 4 5 6; do kill "${pids[$i]}" 2>/dev/null || true; wait "${pids[$i]}" 2>/dev/null || true; done
for i in 4 5 6; do
  bin/broker serve --node-id "sbench$i" --data-dir "$tmp/p$i" --mqtt-addr "127.0.0.1:2289$i" \
    --http-addr "127.0.0.1:2809$i" --gossip-addr "127.0.0.1:269$((3 + i))6" --cluster-addr "127.0.0.1:269$((3 + i))7" \
    --advertise-host 127.0.0.1 --join 127.0.0.1:26976,127.0.0.1:26986,127.0.0.1:26996 --bootstrap-expect 3 \
    --max-queued-messages 65535 --raft-pipeline --log-level warn --log-format json 2>"$tmp/p$i.log" &
  pids+=($!)
done
for i in 4 5 6; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:2809$i/readyz" >/dev/null && break; sleep 0.2; done
done
run "cluster --raft-pipeline, 1 publisher, 64 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 64 "${pids[@]:7:3}"
run "cluster --raft-pipeline, $pubs publishers" "$lnodes" "$lsubnodes" "$pubs" 1 "${pids[@]:7:3}"

{
  echo "| case | delivered msg/s | lost | p50 / p99 / p99.9 / max (ms) | brokers' CPU per message (µs) | system calls per message |"
  echo "|---|---|---|---|---|---|"
  awk '
    function field(j, k,   m) { if (match(j, "\"" k "\":[0-9.e+-]+")) { m = substr(j, RSTART, RLENGTH); sub(/[^:]*:/, "", m); return m + 0 } return 0 }
    function label(j,   m) { if (match(j, "\"label\":\"[^\"]*\"")) { m = substr(j, RSTART + 9, RLENGTH - 10); return m } return "?" }
    { printf "| %s | %.0f | %d | %.1f / %.1f / %.1f / %.1f | %d | %.1f |\n", label($0), field($0, "throughput_msgs_per_s"), field($0, "lost"),
        field($0, "p50_us") / 1000, field($0, "p99_us") / 1000, field($0, "p999_us") / 1000, field($0, "max_us") / 1000,
        field($0, "cpu_us_per_msg"), field($0, "syscalls_per_msg") }' "$results"
  echo
  echo "Resume with a backlog: 10,000 QoS 1 messages of 1 KiB queued for a persistent session while it was away."
  echo
  echo "| broker | CONNACK after (ms) | whole backlog after (s) | msg/s |"
  echo "|---|---|---|---|"
  awk '
    function field(j, k,   m) { if (match(j, "\"" k "\":[0-9.e+-]+")) { m = substr(j, RSTART, RLENGTH); sub(/[^:]*:/, "", m); return m + 0 } return 0 }
    function label(j,   m) { if (match(j, "\"label\":\"[^\"]*\"")) { m = substr(j, RSTART + 9, RLENGTH - 10); return m } return "?" }
    { printf "| %s | %.1f | %.2f | %.0f |\n", label($0), field($0, "connack_ms"), field($0, "drain_s"), field($0, "drain_msgs_per_s") }' "$backlogs"
} >"$out"
cat "$out"
echo "table written to $out" >&2
