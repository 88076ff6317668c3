#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, brings the stack up and runs the
# demo pipeline end to end as far as it exists: tenant and API key created with the CLI, meters
# created through the OpenMeter-compatible API, a realistic AI-usage stream posted to the ingest
# edge (acknowledged only once Kafka holds it), counted exactly once by the aggregator into
# PostgreSQL, read back with the meter query; plans with graduated and volume prices, customers
# and subscriptions created through the API; the rater run for the current period, each
# customer's draft invoice printed, and the reconcile check; last period's invoices issued, paid
# through the sandbox payment provider and reconciled against its records.
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
# A person too: the tenant's org_admin signs in to the control API with email and password.
ADMIN_EMAIL="admin+${TENANT:0:8}@demo.example"
ADMIN_PASSWORD="quickstart-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
if ! psql "$DATABASE_URL" -tAc "SELECT 1 FROM users WHERE email = '$ADMIN_EMAIL'" | grep -q 1; then
  CONTROL_API_SECRET=${CONTROL_API_SECRET:-$(cat "$METERING_STATE/control-api.secret")} \
    $CLI users create --tenant "$TENANT" --email "$ADMIN_EMAIL" --role org_admin --password-stdin \
    <<<"$ADMIN_PASSWORD" >/dev/null
  echo "$ADMIN_PASSWORD" >"$METERING_STATE/demo-admin-password"
  chmod 600 "$METERING_STATE/demo-admin-password"
fi
ADMIN_PASSWORD=$(cat "$METERING_STATE/demo-admin-password")
ACCESS=$(curl -sf -H 'Content-Type: application/json' \
  --data "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}" \
  "http://127.0.0.1:$CONTROL_API_PORT/api/v1/auth/login" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])') \
  || die "the org_admin could not sign in"
log "signed in as $ADMIN_EMAIL (org_admin); keys of the tenant: $(curl -sf -H "Authorization: Bearer $ACCESS" \
  "http://127.0.0.1:$CONTROL_API_PORT/api/v1/api-keys?limit=200" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))')"

API="http://127.0.0.1:$INGEST_PORT/api/v1"
# Creates an object through the API; 409 (it exists from an earlier run) is fine.
create() {
  local path=$1 body=$2 code
  code=$(curl -s -o /tmp/quickstart-create.$$ -w '%{http_code}' -X "${3:-POST}" -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' --data "$body" "$API/$path")
  case "$code" in 200|201|409) ;; *) die "POST $path answered $code: $(cat /tmp/quickstart-create.$$)" ;; esac
  rm -f /tmp/quickstart-create.$$
}
# Meters first: a meter counts the events received after it exists.
for m in \
  '{"slug":"input_tokens","eventType":"llm.tokens","aggregation":"SUM","valueProperty":"$.input_tokens","groupBy":{"model":"$.model"}}' \
  '{"slug":"output_tokens","eventType":"llm.tokens","aggregation":"SUM","valueProperty":"$.output_tokens","groupBy":{"model":"$.model"}}' \
  '{"slug":"api_requests","eventType":"api.request","aggregation":"COUNT","groupBy":{"endpoint":"$.endpoint"}}' \
  '{"slug":"gpu_seconds","eventType":"compute.seconds","aggregation":"SUM","valueProperty":"$.seconds","groupBy":{"gpu":"$.gpu"}}'; do
  create meters "$m"
done
log "meters: input_tokens, output_tokens, api_requests, gpu_seconds"

# Plans: graduated token prices on "starter", volume prices and a monthly fee on "pro".
create plans '{"key":"starter","name":"Starter","tier":"basic","currency":"USD","prices":[
  {"meter":"input_tokens","price":{"type":"tiered","mode":"graduated","tiers":[
    {"upToAmount":"100000","unitPrice":{"type":"unit","amount":"0.000003"}},
    {"unitPrice":{"type":"unit","amount":"0.000002"}}]},"entitlement":"5000000"},
  {"meter":"output_tokens","price":{"type":"tiered","mode":"graduated","tiers":[
    {"upToAmount":"50000","unitPrice":{"type":"unit","amount":"0.000012"}},
    {"unitPrice":{"type":"unit","amount":"0.00001"}}]}},
  {"meter":"api_requests","price":{"type":"unit","amount":"0.0005","freeQuantity":"100"}},
  {"meter":"gpu_seconds","price":{"type":"unit","amount":"0.0011"}}]}'
create plans '{"key":"pro","name":"Pro","tier":"pro","currency":"USD","recurringFee":"49","prices":[
  {"meter":"input_tokens","price":{"type":"tiered","mode":"volume","tiers":[
    {"upToAmount":"100000","unitPrice":{"type":"unit","amount":"0.0000025"}},
    {"upToAmount":"1000000","unitPrice":{"type":"unit","amount":"0.000002"}},
    {"unitPrice":{"type":"unit","amount":"0.0000015"}}]}},
  {"meter":"output_tokens","price":{"type":"tiered","mode":"volume","tiers":[
    {"upToAmount":"100000","unitPrice":{"type":"unit","amount":"0.00001"}},
    {"unitPrice":{"type":"unit","amount":"0.000008"}}]}},
  {"meter":"api_requests","price":{"type":"package","amount":"0.25","quantityPerPackage":"1000"}},
  {"meter":"gpu_seconds","price":{"type":"unit","amount":"0.0009","minimumAmount":"5"}}]}'
create tax-rates/DE '{"rate":"19"}' PUT
create tax-rates/US-NY '{"rate":"8.875"}' PUT
# Customers (one per demo subject), each subscribed since the start of last month.
since=$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m-01T00:00:00Z)
for c in acme-corp:Europe/Berlin:DE:pro globex:America/New_York:US-NY:starter initech:UTC::starter \
         umbrella:Asia/Tokyo::pro hooli:America/Los_Angeles::starter; do
  IFS=: read -r key tz tax plan <<<"$c"
  create customers "{\"key\":\"$key\",\"currency\":\"USD\",\"timezone\":\"$tz\",\"subjects\":[\"$key\"]$([ -n "$tax" ] && echo ",\"taxRegion\":\"$tax\"")}"
  create subscriptions "{\"customer\":\"$key\",\"plan\":\"$plan\",\"startedAt\":\"$since\"}"
done
log "plans starter (graduated) and pro (volume + 49 USD/month); 5 customers subscribed since $since"
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

PERIOD=$(date -u +%Y-%m)
RATER="$CARGO_TARGET_DIR/$METERING_PROFILE/rater"
log "rating $PERIOD (usage so far; drafts are rewritten by each run until issued)"
"$RATER" run --period "$PERIOD" --tenant "$TENANT" --database-url "$DATABASE_URL"
echo
"$RATER" show --period "$PERIOD" --tenant "$TENANT" --database-url "$DATABASE_URL"
log "cost by model this period (usage lines split over the meters' model group-by)"
"$RATER" costs --period "$PERIOD" --tenant "$TENANT" --by model --database-url "$DATABASE_URL"
"$RATER" reconcile --period "$PERIOD" --tenant "$TENANT" --database-url "$DATABASE_URL" >/dev/null \
  || die "reconcile found differences: $RATER reconcile --period $PERIOD --tenant $TENANT"
# Last period: rated, issued (gapless numbers), paid through the sandbox provider's test card,
# and the payments reconciled against the provider's records.
PREV=$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m)
log "last period $PREV: rate, issue, pay with the sandbox card 4242 4242 4242 4242, reconcile"
"$RATER" run --period "$PREV" --tenant "$TENANT" --database-url "$DATABASE_URL" >/dev/null
"$RATER" issue --period "$PREV" --tenant "$TENANT" --database-url "$DATABASE_URL" >/dev/null
for inv in $(curl -sf -H "Authorization: Bearer $KEY" "$API/invoices?period=$PREV&status=issued&limit=200"     | python3 -c 'import json,sys; [print(i["id"]) for i in json.load(sys.stdin)["items"] if float(i["total"]) > 0]'); do
  create "invoices/$inv/payments" '{"card":"4242424242424242"}'
done
curl -sf -H "Authorization: Bearer $KEY" "$API/invoices?period=$PREV&limit=200" | python3 -c '
import json, sys
for i in json.load(sys.stdin)["items"]:
    print("  invoice %-4s %-10s %10s %s  %s" % (i["number"], i["customer"], i["total"], i["currency"], i["status"]))'
$CLI payments reconcile --tenant "$TENANT" >/dev/null \
  || die "payments reconcile found mismatches: $CLI payments reconcile --tenant $TENANT"
log "payments reconcile: provider records, payments and invoices agree"

cat <<MSG

The pipeline is up: $sent events acknowledged by ingest (only once Kafka stored them), then
counted exactly once by the aggregator into PostgreSQL (all-time outcomes for this tenant:
$outcomes).
  ingest + API  http://127.0.0.1:$INGEST_PORT/api/v1   (events, meters, meter queries)
  control-api   http://127.0.0.1:$CONTROL_API_PORT   (Swagger UI at /docs, OpenAPI at /openapi.json)
  org_admin     $ADMIN_EMAIL, password in $METERING_STATE/demo-admin-password
  PostgreSQL    $DATABASE_URL (migrated)
  Kafka (tansu) $KAFKA_BROKERS, topic $USAGE_TOPIC ($USAGE_TOPIC_PARTITIONS partitions)
  Prometheus    http://127.0.0.1:$PROMETHEUS_PORT

Try: curl -H "Authorization: Bearer <key>" "$API/meters/gpu_seconds/query?windowSize=HOUR&windowTimeZone=Europe%2FBerlin"
Billing ops: $RATER run|show|reconcile|issue|costs --period $PERIOD --tenant $TENANT
             $RATER simulate --tenant $TENANT --plan starter --from $PERIOD --to $PERIOD
Stop everything with: scripts/stack.sh down
MSG
