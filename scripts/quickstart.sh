#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, brings the stack up and runs the
# demo pipeline end to end as far as it exists (today: tenant and API key created with the CLI,
# a realistic AI-usage stream posted to the ingest edge, every event acknowledged durably in
# Kafka). Aggregation, the meter query and invoices join as their issues land.
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
KEY_JSON=$($CLI keys create --tenant "$TENANT" --scopes ingest,read --name "quickstart $(date -u +%FT%TZ)")
KEY=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["key"])' "$KEY_JSON")
log "API key ${KEY:0:11}… created (shown once)"

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
done < <(python3 "$ROOT/scripts/demo-events.py" "$EVENTS" "$BATCH")
rm -f /tmp/quickstart-resp.$$
echo >&2
[ "$failed" = 0 ] || die "$failed batches were refused"

accepted=$(curl -s "http://127.0.0.1:$INGEST_PORT/metrics" | awk '/^ingest_events_total\{outcome="accepted"/ {s+=$2} END {print s+0}')
cat <<MSG

The pipeline is up and took $sent events, each acknowledged only after Kafka stored it:
  ingest        http://127.0.0.1:$INGEST_PORT/api/v1/events   ($accepted events accepted since it started)
  PostgreSQL    $DATABASE_URL (migrated)
  Kafka (tansu) $KAFKA_BROKERS, topic $USAGE_TOPIC ($USAGE_TOPIC_PARTITIONS partitions)
  Prometheus    http://127.0.0.1:$PROMETHEUS_PORT

Windowed usage, the meter query and invoices join this demo as the aggregator and rater land.
Stop everything with: scripts/stack.sh down
MSG
