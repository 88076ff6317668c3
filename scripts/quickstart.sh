#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, brings the stack up and runs the
# demo pipeline end to end (as each stage lands: events in, usage and an invoice out).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"

"$ROOT/scripts/stack.sh" up

cat <<MSG

The stack is up:
  PostgreSQL   $DATABASE_URL (migrated)
  Kafka (tansu) $KAFKA_BROKERS, topic $USAGE_TOPIC ($USAGE_TOPIC_PARTITIONS partitions)
  Prometheus   http://127.0.0.1:$PROMETHEUS_PORT

The demo pipeline (events in, usage and an invoice out) joins this script as the ingest,
aggregator and rater issues land. Stop everything with: scripts/stack.sh down
MSG
