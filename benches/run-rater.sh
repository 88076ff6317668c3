#!/usr/bin/env bash
# Rater benchmark: time to rate one period for CUSTOMERS customers × 5 meters, beside the bare
# PostgreSQL read of the same usage rows in the same run. Uses a private database, dropped at
# the end. Prints a markdown table.
#
#   benches/run-rater.sh [CUSTOMERS] [ACTIVE_DAYS]   (default 100000 customers, 10 days)
#
# Each customer (UTC, anchor day 1, subscribed to one plan with graduated, volume, package and
# unit prices plus a monthly fee) has usage on ACTIVE_DAYS days of October 2026 for each of the
# 5 meters, stored as the aggregator stores it (day rollups; periods are whole UTC days, so the
# rater reads day rows only). Measured:
# 1. bare read: `COPY (SELECT the same columns …) TO /dev/null` through psql;
# 2. `rater run --dry-run`: load into Arrow, DataFusion join + aggregation, pricing, invoices
#    computed, nothing written;
# 3. `rater run`: the same plus writing 100 k draft invoices and their lines;
# 4. `rater run` again: idempotent re-run (compares, writes nothing).
# BENCH_KEEP=1 keeps the database (metering_bench_rater) for profiling.
# Built with the `ci` profile (release optimisations with debug assertions), the build the stack
# and tests use; DataFusion is not built a second time for benchmarks.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
CUSTOMERS=${1:-100000}
DAYS=${2:-10}
DB=metering_bench_rater
cleanup() {
  [ -n "${BENCH_KEEP:-}" ] && return
  psql -q -h "$PGHOST" -U "$PGUSER" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
(cd "$ROOT" && cargo build --quiet --profile "$METERING_PROFILE" -p rater -p control-api --bins)
BIN="$CARGO_TARGET_DIR/$METERING_PROFILE"
psql -q -h "$PGHOST" -U "$PGUSER" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB"
"$BIN/control-api" --database-url "$URL" migrate >/dev/null
calc() { python3 -c "print($1)"; }
q() { psql -q -At -h "$PGHOST" -U "$PGUSER" -d "$DB" -v ON_ERROR_STOP=1 "$@"; }

log "seeding $CUSTOMERS customers × 5 meters × $DAYS active days"
t0=$(date +%s.%N)
q <<SQL
INSERT INTO tenants (id, name) VALUES ('00000000-0000-0000-0000-0000000000b1', 'bench');
INSERT INTO meters (id, tenant_id, slug, event_type, aggregation, value_property)
SELECT ('00000000-0000-0000-0000-00000000000' || i)::uuid, '00000000-0000-0000-0000-0000000000b1',
       'm' || i, 'm' || i, CASE WHEN i = 5 THEN 'COUNT' ELSE 'SUM' END, CASE WHEN i = 5 THEN NULL ELSE '\$.v' END
  FROM generate_series(1, 5) i;
INSERT INTO plans (id, tenant_id, key, tier) VALUES ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-0000000000b1', 'bench', 'pro');
INSERT INTO plan_versions (id, tenant_id, plan_id, version, currency, recurring_fee)
VALUES ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000c1', 1, 'USD', 49);
INSERT INTO plan_prices (tenant_id, plan_version_id, meter_id, price)
SELECT '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000d1', ('00000000-0000-0000-0000-00000000000' || i)::uuid, p::jsonb
  FROM (VALUES
    (1, '{"type":"tiered","mode":"graduated","tiers":[{"upToAmount":"100000","unitPrice":{"type":"unit","amount":"0.000003"}},{"unitPrice":{"type":"unit","amount":"0.000002"}}]}'),
    (2, '{"type":"tiered","mode":"volume","tiers":[{"upToAmount":"1000","unitPrice":{"type":"unit","amount":"0.01"}},{"unitPrice":{"type":"unit","amount":"0.008"}}]}'),
    (3, '{"type":"package","amount":"0.25","quantityPerPackage":"1000"}'),
    (4, '{"type":"unit","amount":"0.0009","minimumAmount":"5"}'),
    (5, '{"type":"unit","amount":"0.0005","freeQuantity":"100"}')) AS x(i, p);
INSERT INTO customers (id, tenant_id, key, currency)
SELECT md5('c' || i)::uuid, '00000000-0000-0000-0000-0000000000b1', 'c' || i, 'USD' FROM generate_series(1, $CUSTOMERS) i;
INSERT INTO customer_subjects (tenant_id, subject, customer_id)
SELECT '00000000-0000-0000-0000-0000000000b1', 'c' || i, md5('c' || i)::uuid FROM generate_series(1, $CUSTOMERS) i;
INSERT INTO subscriptions (tenant_id, customer_id, plan_version_id, started_at)
SELECT '00000000-0000-0000-0000-0000000000b1', md5('c' || i)::uuid, '00000000-0000-0000-0000-0000000000d1', '2026-01-01Z'
  FROM generate_series(1, $CUSTOMERS) i;
INSERT INTO usage_day (tenant_id, meter_id, window_start, subject, sum_value, event_count, min_value, max_value, latest_value, latest_time)
SELECT '00000000-0000-0000-0000-0000000000b1', ('00000000-0000-0000-0000-00000000000' || m)::uuid,
       timestamptz '2026-10-01Z' + make_interval(days => (d * 3 + i) % 31), 'c' || i,
       (i % 997) * 13 + d, 10 + d, 1, 100, 7, timestamptz '2026-10-01Z' + make_interval(days => (d * 3 + i) % 31)
  FROM generate_series(1, $CUSTOMERS) i, generate_series(1, 5) m, generate_series(0, $DAYS - 1) d;
ANALYZE;
SQL
ROWS=$(q -c "SELECT count(*) FROM usage_day")
log "seeded $ROWS usage rows in $(calc "round($(date +%s.%N) - $t0)") s"

timed() { local s; s=$(date +%s.%N); "$@" >/dev/null 2>"$WORKLOG"; calc "round($(date +%s.%N) - $s, 2)"; }
WORKLOG=$(mktemp)
bare=$(timed psql -q -h "$PGHOST" -U "$PGUSER" -d "$DB" -c "\\copy (SELECT subject, meter_id, window_start, group_values::text, sum_value, event_count, min_value, max_value, latest_value, latest_time FROM usage_day WHERE tenant_id = '00000000-0000-0000-0000-0000000000b1' AND window_start >= '2026-10-01Z' AND window_start < '2026-11-01Z') TO /dev/null")
dry=$(timed env RATER_LOG=info "$BIN/rater" run --period 2026-10 --dry-run --database-url "$URL"); dry_log=$(cat "$WORKLOG")
full=$(timed env RATER_LOG=info "$BIN/rater" run --period 2026-10 --database-url "$URL"); full_log=$(cat "$WORKLOG")
again=$(timed env RATER_LOG=info "$BIN/rater" run --period 2026-10 --database-url "$URL"); again_log=$(cat "$WORKLOG")
rm -f "$WORKLOG"
INVOICES=$(q -c "SELECT count(*) FROM invoices")
LINES=$(q -c "SELECT count(*) FROM invoice_lines")
echo "$dry_log" >&2; echo "$full_log" >&2; echo "$again_log" >&2

rate() { calc "round($ROWS / $1)"; }
ratio() { calc "round($bare / $1, 2)"; }
cat <<MD

Rater, one period: $CUSTOMERS customers × 5 meters, $ROWS day rows; $INVOICES invoices, $LINES lines written.

| run | seconds | usage rows/s | vs bare read |
|-----|--------:|-------------:|-------------:|
| bare PostgreSQL read of the rows (psql \\copy to /dev/null) | $bare | $(rate "$bare") | 1.00 |
| rater run --dry-run (load, DataFusion, price, no writes) | $dry | $(rate "$dry") | $(ratio "$dry") |
| rater run (writes drafts) | $full | $(rate "$full") | $(ratio "$full") |
| rater run again (idempotent, writes nothing) | $again | $(rate "$again") | $(ratio "$again") |
MD
