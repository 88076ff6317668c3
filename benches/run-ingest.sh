#!/usr/bin/env bash
# Ingest edge benchmark, measured beside a bare hyper server in the same run (same machine,
# load generator co-located). Needs the stack up (scripts/stack.sh up). Prints a markdown table.
#
#   benches/run-ingest.sh [SECONDS_PER_RUN]   (default 10)
#
# Every 2xx counted is durable in Kafka (acks=all); a run with any non-204 answer is marked.
# The broker is a private tansu (SQLite storage) in a temporary folder, removed at the end, so
# runs start from the same empty state and leave no gigabytes behind.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
DUR=${1:-10}
CONNS=${BENCH_CONNECTIONS:-64}
BARE_PORT=18090
INGEST_BENCH_PORT=18080
TOPIC=bench-events
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

command -v wrk >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
log "release build of ingest, control-api and bare-hyper"
(cd "$ROOT" && cargo build --quiet --release -p ingest -p control-api -p benches --bins)
BIN="$CARGO_TARGET_DIR/release"
BROKER_PORT=${BENCH_BROKER_PORT:-19092}
(cd "$WORK" && exec tansu broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine sqlite://tansu.db \
  >"$WORK/tansu.log" 2>&1) &

CLI="$BIN/control-api --database-url $DATABASE_URL"
TENANT=$($CLI tenants create --name bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
KEY=$($CLI keys create --tenant "$TENANT" --rate-limit-rps 1000000000 --rate-limit-eps 2000000000 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

python3 "$ROOT/scripts/demo-events.py" 1 1 1 | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)[0]))' >"$WORK/single.json"
python3 "$ROOT/scripts/demo-events.py" 100 100 2 >"$WORK/batch100.json"
python3 "$ROOT/scripts/demo-events.py" 1000 1000 3 >"$WORK/batch1000.json"

wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; die "port $1 did not open"; }

# run NAME PORT BODY CONTENT_TYPE EVENTS_PER_REQUEST [CONNECTIONS] -> "req/s events/s p50 p99 bad"
run() {
  local name=$1 port=$2 body=$3 ct=$4 per=$5 conns=${6:-$CONNS} out
  out=$(WRK_BODY_FILE="$body" WRK_CONTENT_TYPE="$ct" WRK_KEY="$KEY" WRK_SUBJECTS="${SUBJECTS:-1}" \
    wrk -t2 -c"$conns" -d"${DUR}s" --latency -s "$ROOT/loadtest/post.lua" "http://127.0.0.1:$port/api/v1/events" | grep '^RESULT')
  python3 - "$name" "$per" "$out" <<'PY'
import sys
name, per, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kv = dict(x.split("=") for x in out.split()[1:])
rps = int(kv["requests"]) / float(kv["seconds"])
bad = int(kv["non204"]) + int(kv["errors"])
print(f"{name}\t{rps:.0f}\t{rps*per:.0f}\t{kv['p50_ms']}\t{kv['p99_ms']}\t{bad}")
PY
}

# broker_loop NAME SUBJECTS -> the bare broker under the same closed loop: $CONNS clients, one
# one-event record each, acks=all, waiting for the acknowledgement (no latency figures)
broker_loop() {
  local out
  out=$("$BIN/agg-bench" produce-loop "127.0.0.1:$BROKER_PORT" "$TOPIC" "$TENANT" "$CONNS" "$DUR" "$2" | grep '^RESULT')
  python3 - "$1" "$out" <<'PY'
import sys
kv = dict(x.split("=") for x in sys.argv[2].split()[1:])
rps = float(kv["records_per_s"])
print(f"{sys.argv[1]}\t{rps:.0f}\t{rps:.0f}\t-\t-\t0")
PY
}

start_ingest() {
  INGEST_PORT=$INGEST_BENCH_PORT INGEST_KAFKA__TOPIC=$TOPIC INGEST_KAFKA__PACKING=$1 \
    KAFKA_BROKERS=127.0.0.1:$BROKER_PORT \
    RUST_LOG=warn "$BIN/ingest" serve >"$WORK/ingest.log" 2>&1 &
  echo $! >"$WORK/ingest.pid"
  wait_port $INGEST_BENCH_PORT
  # Warm-up, not measured: the idempotent producer acquires its producer id on first use
  # (librdkafka's PID timer: up to ~0.5 s), which a fresh process pays once.
  WRK_BODY_FILE="$WORK/single.json" WRK_KEY="$KEY" wrk -t1 -c8 -d2s -s "$ROOT/loadtest/post.lua" \
    "http://127.0.0.1:$INGEST_BENCH_PORT/api/v1/events" >/dev/null
}
stop_ingest() { kill "$(cat "$WORK/ingest.pid")"; wait "$(cat "$WORK/ingest.pid")" 2>/dev/null || true; }

wait_port "$BROKER_PORT"
tansu topic create "$TOPIC" --broker "tcp://127.0.0.1:$BROKER_PORT" --partitions 8 >/dev/null
"$BIN/bare-hyper" $BARE_PORT & wait_port $BARE_PORT
results=()
results+=("$(run 'bare hyper, 1 event/request' $BARE_PORT "$WORK/single.json" application/cloudevents+json 1)")
results+=("$(SUBJECTS=64 run 'bare hyper, 1 event/request, 64 subjects' $BARE_PORT "$WORK/single.json" application/cloudevents+json 1)")
results+=("$(broker_loop 'bare broker, closed loop, 1 one-event record/request' 1)")
results+=("$(broker_loop 'bare broker, closed loop, 64 subjects' 64)")
start_ingest partition
results+=("$(run 'ingest, 1 event/request' $INGEST_BENCH_PORT "$WORK/single.json" application/cloudevents+json 1)")
results+=("$(SUBJECTS=64 run 'ingest, 1 event/request, 64 subjects' $INGEST_BENCH_PORT "$WORK/single.json" application/cloudevents+json 1)")
results+=("$(run 'ingest, 1 event/request, 256 connections' $INGEST_BENCH_PORT "$WORK/single.json" application/cloudevents+json 1 256)")
results+=("$(run 'ingest, 100 events/request' $INGEST_BENCH_PORT "$WORK/batch100.json" application/cloudevents-batch+json 100)")
results+=("$(run 'ingest, 1000 events/request' $INGEST_BENCH_PORT "$WORK/batch1000.json" application/cloudevents-batch+json 1000)")
results+=("$(run 'bare hyper, 1000 events/request' $BARE_PORT "$WORK/batch1000.json" application/cloudevents-batch+json 1000)")
stop_ingest
start_ingest event
results+=("$(run 'ingest packing=event, 100 events/request' $INGEST_BENCH_PORT "$WORK/batch100.json" application/cloudevents-batch+json 100)")
results+=("$(run 'ingest packing=event, 1 event/request' $INGEST_BENCH_PORT "$WORK/single.json" application/cloudevents+json 1)")
stop_ingest

echo
echo "| run ($CONNS connections unless named, ${DUR}s each) | requests/s | events/s | p50 ms | p99 ms | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|"
for r in "${results[@]}"; do IFS=$'\t' read -r n a b c d e <<<"$r"; echo "| $n | $a | $b | $c | $d | $e |"; done

# Latency at a fixed arrival rate (open loop, measured from each request's scheduled time).
RATE=${BENCH_RATE:-10000}
start_ingest partition
echo
echo "| fixed rate $RATE single-event req/s, 64 connections, ${DUR}s | achieved req/s | p50 ms | p99 ms | max ms | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|"
for target in "ingest:$INGEST_BENCH_PORT" "bare hyper:$BARE_PORT"; do
  name=${target%%:*}; port=${target##*:}
  out=$("$BIN/fixed-rate" "http://127.0.0.1:$port/api/v1/events" "$RATE" "$DUR" 64 "$WORK/single.json" application/cloudevents+json "$KEY")
  python3 - "$name" "$out" <<'PY'
import sys
kv = dict(x.split("=") for x in sys.argv[2].split()[1:])
print(f"| {sys.argv[1]} | {kv['achieved_rps']} | {kv['p50_ms']} | {kv['p99_ms']} | {kv['max_ms']} | {kv['non2xx']} |")
PY
done
stop_ingest
