#!/usr/bin/env bash
# Aggregator benchmark, beside the bare broker in the same run. Needs PostgreSQL and tansu on
# PATH (scripts/stack.sh install); uses a private tansu (SQLite storage) and a private database,
# both removed at the end. Prints markdown tables.
#
#   benches/run-aggregator.sh [EVENTS]   (default 1000000)
#
# 1. bare broker: produce EVENTS events packed 500 per record (acks=all), then consume them all;
# 2. aggregator alone: the same pre-filled topic into PostgreSQL (dedup on, 3 meters);
# 3. whole pipeline: EVENTS more events posted through ingest (1000 per request) while the
#    aggregator runs; time until every event is accounted for in PostgreSQL;
# 4. freshness at a fixed 50 k events/s: reception at ingest → queryable, from the aggregator's
#    histogram.
# Runs 2 and 3 also print the CPU time each process spent per event (tansu, ingest, aggregator,
# all PostgreSQL processes, the rest of the machine), from /proc.
# BENCH_AGGREGATOR_BIN=path runs another aggregator build (before/after comparisons).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
EVENTS=${1:-1000000}
BROKER_PORT=${BENCH_BROKER_PORT:-19092}
INGEST_BENCH_PORT=18080
METRICS_PORT=19181
TOPIC=bench-agg
DB=metering_bench
WORK=$(mktemp -d)
cleanup() {
  # The aggregator first, while the broker is still up (a consumer closing with the broker
  # gone can wait a long time), then the rest; whatever is left after 15 s is killed.
  local p
  p=$(cat "$WORK/aggregator.pid" 2>/dev/null || true)
  if [ -n "$p" ]; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
  kill $(jobs -p) 2>/dev/null || true
  for _ in $(seq 1 150); do [ -z "$(jobs -rp)" ] && break; sleep 0.1; done
  kill -9 $(jobs -rp) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
  psql -q -h "$PGHOST" -U "$PGUSER" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

log "release build of ingest, aggregator, control-api and agg-bench"
(cd "$ROOT" && cargo build --quiet --release -p ingest -p aggregator -p control-api -p benches --bins)
BIN="$CARGO_TARGET_DIR/release"
psql -q -h "$PGHOST" -U "$PGUSER" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB"
CLI="$BIN/control-api --database-url $URL"
$CLI migrate >/dev/null
TENANT=$($CLI tenants create --name bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
KEY=$($CLI keys create --tenant "$TENANT" --scopes ingest,read,admin --rate-limit-rps 1000000000 --rate-limit-eps 2000000000 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
psql -q -h "$PGHOST" -U "$PGUSER" -d "$DB" >/dev/null <<SQL
INSERT INTO meters (tenant_id, slug, event_type, aggregation, value_property, group_by, created_at) VALUES
 ('$TENANT', 'tokens', 'prompt', 'SUM', '\$.tokens', '{"model": "\$.model"}', now() - interval '1 hour'),
 ('$TENANT', 'calls', 'prompt', 'COUNT', NULL, '{}', now() - interval '1 hour'),
 ('$TENANT', 'users', 'prompt', 'UNIQUE_COUNT', '\$.user', '{}', now() - interval '1 hour');
SQL

(cd "$WORK" && exec tansu broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine sqlite://tansu.db \
  >"$WORK/tansu.log" 2>&1) &
TANSU_PID=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null && break; sleep 0.1; done
tansu topic create "$TOPIC" --broker "tcp://127.0.0.1:$BROKER_PORT" --partitions 8 >/dev/null
B=127.0.0.1:$BROKER_PORT
AGG_BIN=${BENCH_AGGREGATOR_BIN:-$BIN/aggregator}
# ticks PID -> CPU time (user + system, clock ticks) the process has used; 0 when it is not there
ticks() { if [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }
# cpu -> "tansu ingest aggregator postgres machine" CPU ticks so far (machine: every busy tick)
cpu() {
  local pg=0 p
  for p in $(pgrep -x postgres || true); do pg=$((pg + $(ticks "$p"))); done
  echo "$(ticks "$TANSU_PID") $(ticks "$(cat "$WORK/ingest.pid" 2>/dev/null)") \
$(ticks "$(cat "$WORK/aggregator.pid" 2>/dev/null)") $pg $(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)"
}
val() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
lap() { log "$1 ($(date +%T))"; }

log "bare broker: produce $EVENTS events, then consume them"
P=$("$BIN/agg-bench" fill "$B" "$TOPIC" "$TENANT" "$EVENTS" | val produce_eps)
C=$("$BIN/agg-bench" drain "$B" "$TOPIC" "$EVENTS" | val consume_eps)

start_aggregator() {
  AGGREGATOR_DATABASE_URL=$URL AGGREGATOR_KAFKA__BROKERS=$B AGGREGATOR_KAFKA__TOPIC=$TOPIC \
    AGGREGATOR_METRICS_LISTEN=127.0.0.1:$METRICS_PORT AGGREGATOR_MEMBER=bench RUST_LOG=warn \
    "$AGG_BIN" serve >>"$WORK/aggregator.log" 2>&1 &
  echo $! >"$WORK/aggregator.pid"
  sleep 1
  kill -0 "$(cat "$WORK/aggregator.pid")" 2>/dev/null || { tail -20 "$WORK/aggregator.log" >&2; die "aggregator did not start"; }
}
log "aggregator alone: the pre-filled topic into PostgreSQL"
CPU_A0=$(cpu)
start_aggregator
A_SECS=$("$BIN/agg-bench" wait "$URL" "$TENANT" "$EVENTS" | val seconds)
CPU_A1=$(cpu)

log "whole pipeline: $EVENTS events through ingest, 1000 per request"
INGEST_PORT=$INGEST_BENCH_PORT INGEST_DATABASE_URL=$URL INGEST_KAFKA__BROKERS=$B \
  INGEST_KAFKA__TOPIC=$TOPIC RUST_LOG=warn "$BIN/ingest" serve >"$WORK/ingest.log" 2>&1 &
echo $! >"$WORK/ingest.pid"
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$INGEST_BENCH_PORT") 2>/dev/null && break; sleep 0.1; done
(exec 3<>"/dev/tcp/127.0.0.1/$INGEST_BENCH_PORT") 2>/dev/null || { tail -20 "$WORK/ingest.log" >&2; die "ingest did not start"; }
"$BIN/agg-bench" post "http://127.0.0.1:$INGEST_BENCH_PORT/api/v1/events" "$KEY" 20000 1000 4 >/dev/null # warm-up
"$BIN/agg-bench" wait "$URL" "$TENANT" $((EVENTS + 20000)) >/dev/null
CPU_P0=$(cpu)
T0=$(date +%s.%N)
POST=$("$BIN/agg-bench" post "http://127.0.0.1:$INGEST_BENCH_PORT/api/v1/events" "$KEY" "$EVENTS" 1000 8 | val post_eps)
"$BIN/agg-bench" wait "$URL" "$TENANT" $((2 * EVENTS + 20000)) >/dev/null
T1=$(date +%s.%N)
CPU_P1=$(cpu)

log "freshness at a fixed 50 k events/s for 20 s"
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/before.prom"
# 50 000 events each second (one burst of 50 requests of 1000 per second), 20 seconds.
for _ in $(seq 1 20); do
  t=$(date +%s%N)
  "$BIN/agg-bench" post "http://127.0.0.1:$INGEST_BENCH_PORT/api/v1/events" "$KEY" 50000 1000 8 >/dev/null
  left=$(( 1000000000 - ($(date +%s%N) - t) ))
  [ "$left" -gt 0 ] && sleep "$(printf '0.%09d' "$left")"
done
"$BIN/agg-bench" wait "$URL" "$TENANT" $((2 * EVENTS + 20000 + 20 * 50000)) >/dev/null || true
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/after.prom"

python3 - "$EVENTS" "$P" "$C" "$A_SECS" "$POST" "$T0" "$T1" "$WORK/before.prom" "$WORK/after.prom" \
  "$CPU_A0" "$CPU_A1" "$CPU_P0" "$CPU_P1" "$(getconf CLK_TCK)" <<'PY'
import sys, re
n, p, c, a_secs, post, t0, t1 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
agg = n / a_secs
e2e = n / (t1 - t0)
bare = 1 / (1 / p + 1 / c)  # produce then consume, one after the other
def buckets(path):
    b = {}
    for line in open(path):
        m = re.match(r'aggregator_freshness_seconds_bucket\{le="([^"]+)"\} (\d+)', line)
        if m:
            b[m.group(1)] = int(m.group(2))
    return b
before, after = buckets(sys.argv[8]), buckets(sys.argv[9])
d = sorted(((float('inf') if k == '+Inf' else float(k)), after[k] - before.get(k, 0)) for k in after)
total = d[-1][1] if d else 0
def q(x):
    for le, cnt in d:
        if total and cnt >= x * total:
            return le
    return float('nan')
print()
print(f"| run ({n} events, 2 cores, co-located broker and PostgreSQL) | events/s | ratio |")
print("|---|---:|---:|")
print(f"| bare broker: produce (500 events/record, acks=all) | {p:.0f} | |")
print(f"| bare broker: consume + decode | {c:.0f} | |")
print(f"| bare broker: produce then consume (baseline) | {bare:.0f} | 1.00 |")
print(f"| aggregator alone: pre-filled topic → PostgreSQL, dedup on | {agg:.0f} | {agg/c:.2f} of bare consume |")
print(f"| whole pipeline: ingest (1000/request) → tansu → aggregator → PostgreSQL | {e2e:.0f} | {e2e/bare:.2f} of bare produce+consume |")
print(f"| (ingest intake during the pipeline run) | {post:.0f} | |")
print()
hz = float(sys.argv[14])
print(f"| CPU µs per event ({n} events) | tansu | ingest | aggregator | PostgreSQL | rest | total | cores busy |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, a, b, secs in (("aggregator alone", sys.argv[10], sys.argv[11], a_secs), ("whole pipeline", sys.argv[12], sys.argv[13], t1 - t0)):
    us = [(int(y) - int(x)) / hz * 1e6 / n for x, y in zip(a.split(), b.split())]
    rest = us[4] - sum(us[:4])
    cells = " | ".join(f"{v:.2f}" for v in us[:4] + [rest, us[4]])
    print(f"| {name} | {cells} | {us[4] * n / 1e6 / secs:.2f} |")
print()
print(f"freshness at 50 k events/s (reception → queryable, per flush, {total} samples): p50 ≤ {q(0.5)} s, p99 ≤ {q(0.99)} s (histogram bucket bounds)")
PY
