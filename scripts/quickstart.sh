#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, brings the stack up and runs the
# demo pipeline end to end as far as it exists: tenant and API key created with the CLI, meters
# created through the OpenMeter-compatible API, a realistic AI-usage stream posted to the ingest
# edge (acknowledged only once Kafka holds it), counted exactly once by the aggregator into
# PostgreSQL, and read back with the meter query. Invoices join when the rater's run lands.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
EVENTS=${DEMO_EVENTS:-5000}
BATCH=${DEMO_BATCH:-100}

"$ROOT/scripts/stack.sh" up

CLI="$(echo "$CARGO_TARGET_DIR/$METERING_PROFILE/control-api") --database-url $DATABASE_URL"
TENANT_FILE="$METERING_STATE/demo-tenant"
if [ -s "$TENANT_FILE" ]; then
  TENANT=$(cat "$TENANT_FILE")
else
  TENANT=$($CLI tenants create --name "Demo AI Co" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  echo "$TENANT" >"$TENANT_FILE"
fi
log "tenant $TENANT"
# A fresh key for this run; it lives only in this shell (keys are never stored in clear).
KEY_JSON=$($CLI keys create --tenant "$TENANT" --scopes ingest,read,admin --name "quickstart $(date -u +%FT%TZ)")
KEY=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["key"])' "$KEY_JSON")
log "API key ${KEY:0:11}… created (shown once)"

API="http://127.0.0.1:$INGEST_PORT/api/v1"
# Meters first: a meter counts the events received after it exists. 409 = already there.
for m in \
  '{"slug":"input_tokens","eventType":"llm.tokens","aggregation":"SUM","valueProperty":"$.input_tokens","groupBy":{"model":"$.model"}}' \
  '{"slug":"output_tokens","eventType":"llm.tokens","aggregation":"SUM","valueProperty":"$.output_tokens","groupBy":{"model":"$.model"}}' \
  '{"slug":"api_requests","eventType":"api.request","aggregation":"COUNT","groupBy":{"endpoint":"$.endpoint"}}' \
  '{"slug":"gpu_seconds","eventType":"compute.seconds","aggregation":"SUM","valueProperty":"$.seconds","groupBy":{"gpu":"$.gpu"}}'; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' --data "$m" "$API/meters")
  case "$code" in 201|409) ;; *) die "creating a meter answered $code" ;; esac
done
log "meters: input_tokens, output_tokens, api_requests, gpu_seconds"
before=$(psql -At -h "$PGHOST" -U "$PGUSER" -d "$METERING_DB" -c \
  "SELECT coalesce(sum(events), 0) FROM event_outcomes WHERE tenant_id = '$TENANT'")

log "posting $EVENTS demo events in batches of $BATCH to http://127.0.0.1:$INGEST_PORT/api/v1/events"
sent=0; failed=0
while read -r line; do
  code=$(curl -s -o /tmp/quickstart-resp.$$ -w '%{http_code}' -X POST \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/cloudevents-batch+json' \
    --data-binary "$line" "http://127.0.0.1:$INGEST_PORT/api/v1/events")
  if [ "$code" = 204 ]; then
    sent=$((sent + $(python3 -c 'import json,sys; print(len(json.loads(sys.argv[1])))' "$line")))
  else
    failed=$((failed + 1)); echo "  batch refused ($code): $(cat /tmp/quickstart-resp.$$)" >&2
  fi
  printf '\r  %d/%d events acknowledged' "$sent" "$EVENTS" >&2
done < <(python3 "$ROOT/scripts/demo-events.py" "$EVENTS" "$BATCH" "$(date +%s)")
rm -f /tmp/quickstart-resp.$$
echo >&2
[ "$failed" = 0 ] || die "$failed batches were refused"

log "waiting for the aggregator to account for them"
for _ in $(seq 1 600); do
  now=$(psql -At -h "$PGHOST" -U "$PGUSER" -d "$METERING_DB" -c \
    "SELECT coalesce(sum(events), 0) FROM event_outcomes WHERE tenant_id = '$TENANT'")
  [ "$((now - before))" -ge "$sent" ] && break
  sleep 0.1
done
[ "$((now - before))" -ge "$sent" ] || die "the aggregator accounted for $((now - before)) of $sent events (log: scripts/stack.sh logs aggregator)"
outcomes=$(psql -At -h "$PGHOST" -U "$PGUSER" -d "$METERING_DB" -F ' ' -c \
  "SELECT outcome, sum(events) FROM event_outcomes WHERE tenant_id = '$TENANT' GROUP BY 1 ORDER BY 1" | paste -sd, -)
usage=$(curl -s -H "Authorization: Bearer $KEY" "$API/meters/input_tokens/query?groupBy=subject&groupBy=model")
USAGE="$usage" python3 - <<'PY'
import json, os
r = json.loads(os.environ["USAGE"])
print("\ninput_tokens per customer and model, %s .. %s:" % (r["from"], r["to"]))
for d in r["data"]:
    print("  %-10s %-10s %10s" % (d["subject"], d["groupBy"]["model"], d["value"]))
PY
cat <<MSG

The pipeline is up: $sent events acknowledged by ingest (only once Kafka stored them), then
counted exactly once by the aggregator into PostgreSQL (all-time outcomes for this tenant:
$outcomes).
  ingest + API  http://127.0.0.1:$INGEST_PORT/api/v1   (events, meters, meter queries)
  control-api   http://127.0.0.1:$CONTROL_API_PORT
  PostgreSQL    $DATABASE_URL (migrated)
  Kafka (tansu) $KAFKA_BROKERS, topic $USAGE_TOPIC ($USAGE_TOPIC_PARTITIONS partitions)
  Prometheus    http://127.0.0.1:$PROMETHEUS_PORT

Try: curl -H "Authorization: Bearer <key>" "$API/meters/gpu_seconds/query?windowSize=HOUR&windowTimeZone=Europe%2FBerlin"
Invoices join this demo when the rater's run lands.
Stop everything with: scripts/stack.sh down
MSG
