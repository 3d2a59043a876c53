#!/usr/bin/env bash
# Durable-session benchmark with the project's load tool: QoS 1 into
# persistent sessions on a three-node cluster (every message committed to
# the raft log before its PUBACK; deliveries acknowledged through the log
# too), every message crossing nodes, against Debian's mosquitto
# (persistent sessions, persistence off: nothing on disk) in the same run.
# One publisher connection (waiting for each PUBACK, and with 64 in
# flight, which the publish pipeline commits in batches), and many; the
# cluster cases again with the experimental --read-lease and with
# --raft-log-store=wal, and two with the experimental --raft-pipeline.
#   scripts/bench-sessions.sh [duration] [publishers] [markdown-out]
#   (defaults: 10s, 48, bin/bench-sessions.md)
set -euo pipefail
dur=${1:-10s}
pubs=${2:-48}
out=${3:-bin/bench-sessions.md}
. scripts/bench-lib.sh
bench_init

start_mosquitto 21893 'max_queued_messages 65535'
mosquitto=$started
# Two clusters: nodes 1-3 with the defaults, nodes 4-6 with --read-lease.
start_cluster sbench n 22890 28090 26936 1 3 --max-queued-messages 65535
defaults=("${cluster_pids[@]}")
start_cluster sbench n 22890 28090 26936 4 6 --max-queued-messages 65535 --read-lease
lease=("${cluster_pids[@]}")
wait_ready 28091 28092 28093 28094 28095 28096
nodes=127.0.0.1:22891,127.0.0.1:22892,127.0.0.1:22893
# Subscribers start on the node after their publisher's: every message
# crosses nodes.
subnodes=127.0.0.1:22892,127.0.0.1:22893,127.0.0.1:22891
lnodes=127.0.0.1:22894,127.0.0.1:22895,127.0.0.1:22896
lsubnodes=127.0.0.1:22895,127.0.0.1:22896,127.0.0.1:22894

results="$tmp/results.jsonl"
: >"$results"
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
run "mosquitto, 1 publisher, 1 in flight" 127.0.0.1:21893 127.0.0.1:21893 1 1 "$mosquitto"
run "mosquitto, 1 publisher, 64 in flight" 127.0.0.1:21893 127.0.0.1:21893 1 64 "$mosquitto"
run "mosquitto, $pubs publishers" 127.0.0.1:21893 127.0.0.1:21893 "$pubs" 1 "$mosquitto"
run "cluster, 1 publisher, 1 in flight" 127.0.0.1:22891 127.0.0.1:22892 1 1 "${defaults[@]}"
run "cluster, 1 publisher, 64 in flight" 127.0.0.1:22891 127.0.0.1:22892 1 64 "${defaults[@]}"
run "cluster, $pubs publishers" "$nodes" "$subnodes" "$pubs" 1 "${defaults[@]}"
run "cluster, $pubs publishers, 16 in flight" "$nodes" "$subnodes" "$pubs" 16 "${defaults[@]}"
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
run "cluster --read-lease, 1 publisher, 1 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 1 "${lease[@]}"
run "cluster --read-lease, 1 publisher, 64 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 64 "${lease[@]}"
run "cluster --read-lease, $pubs publishers" "$lnodes" "$lsubnodes" "$pubs" 1 "${lease[@]}"
run "cluster --read-lease, $pubs publishers, 16 in flight" "$lnodes" "$lsubnodes" "$pubs" 16 "${lease[@]}"

# A third cluster with --raft-pipeline, started once the lease cluster is
# stopped (its idle heartbeats would share the CPU): nodes 4-6's addresses
# again, fresh data dirs.
for p in "${lease[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
start_cluster sbench p 22890 28090 26936 4 6 --max-queued-messages 65535 --raft-pipeline
wait_ready 28094 28095 28096
run "cluster --raft-pipeline, 1 publisher, 64 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 64 "${cluster_pids[@]}"
run "cluster --raft-pipeline, $pubs publishers" "$lnodes" "$lsubnodes" "$pubs" 1 "${cluster_pids[@]}"

# A fourth with --raft-log-store=wal (raft-wal: one fdatasync per write
# instead of bolt's two), again on nodes 4-6 once the third is stopped.
for p in "${cluster_pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
start_cluster sbench w 22890 28090 26936 4 6 --max-queued-messages 65535 --raft-log-store wal
wait_ready 28094 28095 28096
run "cluster --raft-log-store=wal, 1 publisher, 1 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 1 "${cluster_pids[@]}"
run "cluster --raft-log-store=wal, 1 publisher, 64 in flight" 127.0.0.1:22894 127.0.0.1:22895 1 64 "${cluster_pids[@]}"
run "cluster --raft-log-store=wal, $pubs publishers" "$lnodes" "$lsubnodes" "$pubs" 1 "${cluster_pids[@]}"
run "cluster --raft-log-store=wal, $pubs publishers, 16 in flight" "$lnodes" "$lsubnodes" "$pubs" 16 "${cluster_pids[@]}"

{
  echo "| case | delivered msg/s | lost | p50 / p99 / p99.9 / max (ms) | brokers' CPU per message (µs) | system calls per message |"
  echo "|---|---|---|---|---|---|"
  awk "$awk_json"'
    { printf "| %s | %.0f | %d | %.1f / %.1f / %.1f / %.1f | %d | %.1f |\n", label($0), field($0, "throughput_msgs_per_s"), field($0, "lost"),
        field($0, "p50_us") / 1000, field($0, "p99_us") / 1000, field($0, "p999_us") / 1000, field($0, "max_us") / 1000,
        field($0, "cpu_us_per_msg"), field($0, "syscalls_per_msg") }' "$results"
  echo
  echo "Resume with a backlog: 10,000 QoS 1 messages of 1 KiB queued for a persistent session while it was away."
  echo
  echo "| broker | CONNACK after (ms) | whole backlog after (s) | msg/s |"
  echo "|---|---|---|---|"
  awk "$awk_json"'
    { printf "| %s | %.1f | %.2f | %.0f |\n", label($0), field($0, "connack_ms"), field($0, "drain_s"), field($0, "drain_msgs_per_s") }' "$backlogs"
} >"$out"
cat "$out"
echo "table written to $out" >&2
