# Shared by the bench-*.sh scripts (source it; it runs nothing itself):
# building, starting and stopping the brokers, waiting until they are
# ready, reading their CPU time, and the awk helpers the tables use.

# bench_init [mochi]: builds the broker and the load tool (and the
# standalone mochi with "mochi"), makes $tmp, and stops every process in
# $pids and removes $tmp when the script exits.
bench_init() {
  make -s build
  go build -o bin/mqttload ./cmd/mqttload
  if [ "${1:-}" = mochi ]; then go build -o bin/mochi-baseline ./cmd/mochi-baseline; fi
  tmp=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}

# start_mosquitto PORT [CONF-LINE...]: Debian's mosquitto on 127.0.0.1:PORT,
# no persistence, with the extra configuration lines; its PID in $started.
start_mosquitto() {
  local port=$1 mosq
  shift
  mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  { printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port"; printf '%s\n' "$@"; } >"$tmp/mosquitto-$port.conf"
  "$mosq" -c "$tmp/mosquitto-$port.conf" >"$tmp/mosquitto-$port.log" 2>&1 &
  started=$!
  pids+=("$started")
}

# start_mochi PORT: the standalone mochi (cmd/mochi-baseline) on
# 127.0.0.1:PORT; its PID in $started.
start_mochi() {
  bin/mochi-baseline --addr "127.0.0.1:$1" 2>"$tmp/mochi-$1.log" &
  started=$!
  pids+=("$started")
}

# start_node ID DIR MQTT HTTP GOSSIP CLUSTER [FLAG...]: one broker node on
# 127.0.0.1 (ports), data in $tmp/DIR, warnings logged to $tmp/DIR.log
# (appended: a restarted node keeps its log); its PID in $started. Without
# --join among the flags it is a cluster of one.
start_node() {
  local id=$1 dir=$2 mqtt=$3 http=$4 gossip=$5 cluster=$6
  shift 6
  local expect=(--bootstrap-expect 1)
  if [[ " $* " == *" --join "* ]]; then expect=(); fi
  bin/broker serve --node-id "$id" --data-dir "$tmp/$dir" --mqtt-addr "127.0.0.1:$mqtt" --http-addr "127.0.0.1:$http" \
    --gossip-addr "127.0.0.1:$gossip" --cluster-addr "127.0.0.1:$cluster" --advertise-host 127.0.0.1 "${expect[@]}" "$@" \
    --log-level warn --log-format json 2>>"$tmp/$dir.log" &
  started=$!
  pids+=("$started")
}

# start_cluster NAME DIR MQTT HTTP GOSSIP FIRST LAST [FLAG...]: nodes
# FIRST..LAST of a cluster, node i named NAMEi with its data in $tmp/DIRi,
# listening on MQTT+i, HTTP+i, GOSSIP+10i (gossip) and GOSSIP+10i+1
# (raft), each joining the others; their PIDs in $cluster_pids.
start_cluster() {
  local name=$1 dir=$2 mqtt=$3 http=$4 gossip=$5 first=$6 last=$7 i join=""
  shift 7
  for i in $(seq "$first" "$last"); do join+="${join:+,}127.0.0.1:$((gossip + 10 * i))"; done
  cluster_pids=()
  for i in $(seq "$first" "$last"); do
    start_node "$name$i" "$dir$i" "$((mqtt + i))" "$((http + i))" "$((gossip + 10 * i))" "$((gossip + 10 * i + 1))" \
      --join "$join" --bootstrap-expect $((last - first + 1)) "$@"
    cluster_pids+=("$started")
  done
}

# start_lineup SOLO NAME MOSQ MQTT HTTP GOSSIP: the four brokers the
# delivery benchmarks compare, ready: mosquitto on MOSQ, mochi on MOSQ+1,
# this broker as one node named SOLO (ports MQTT, HTTP, GOSSIP and
# GOSSIP+1) and a three-node cluster NAME1-3 (start_cluster). PIDs in
# $pid_mosquitto, $pid_mochi, $pid_solo and $cluster_pids.
start_lineup() {
  local solo=$1 name=$2 mosq=$3 mqtt=$4 http=$5 gossip=$6
  start_mosquitto "$mosq"
  pid_mosquitto=$started
  start_mochi $((mosq + 1))
  pid_mochi=$started
  start_node "$solo" solo "$mqtt" "$http" "$gossip" $((gossip + 1))
  pid_solo=$started
  start_cluster "$name" n "$mqtt" "$http" "$gossip" 1 3
  wait_ready "$http" $((http + 1)) $((http + 2)) $((http + 3))
}

# wait_ready HTTP-PORT...: until each node answers /readyz (30 s each at
# most; the run goes on and the case shows what did not work).
wait_ready() {
  local port
  for port in "$@"; do
    for _ in $(seq 150); do curl -fs "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
  done
}

hz=$(getconf CLK_TCK)

# cpu PID...: user+system clock ticks of the processes.
cpu() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }

# us_per_msg BEFORE AFTER JSON: CPU microseconds per message received,
# from cpu's ticks before and after an mqttload run and its --json line.
us_per_msg() {
  local recv
  recv=$(echo "$3" | sed -E 's/.*"received":([0-9]+).*/\1/')
  if [ "$recv" -gt 0 ]; then echo $(( ($2 - $1) * 1000000 / hz / recv )); else echo 0; fi
}

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

# awk_json: awk functions over one line of mqttload --json output:
# field(line, key), a number (0 if absent), and label(line).
awk_json='
function field(j, k,   m) { if (match(j, "\"" k "\":[0-9.e+-]+")) { m = substr(j, RSTART, RLENGTH); sub(/[^:]*:/, "", m); return m + 0 } return 0 }
function label(j,   m) { if (match(j, "\"label\":\"[^\"]*\"")) { m = substr(j, RSTART + 9, RLENGTH - 10); return m } return "?" }
'
