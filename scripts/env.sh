# Shared settings of the project's scripts; sourced, not run. Every value can be overridden from
# the environment. Caches and state live outside the clone so they survive between CI runs.
: "${METERING_CACHE:=/var/cache/metering}"          # tansu build, node tools, state, logs
: "${METERING_STATE:=$METERING_CACHE/state}"        # broker data, Prometheus data, pids, logs
: "${CARGO_TARGET_DIR:=$METERING_CACHE/target}"     # one target dir for scripts, tests and CI
: "${METERING_PROFILE:=ci}"                         # cargo profile of the services the stack runs
: "${PGHOST:=127.0.0.1}"
: "${PGPORT:=5432}"
: "${PGUSER:=postgres}"
: "${METERING_DB:=metering}"
: "${DATABASE_URL:=postgres://$PGUSER@$PGHOST:$PGPORT/$METERING_DB}"
: "${KAFKA_BROKERS:=127.0.0.1:9092}"
: "${USAGE_TOPIC:=usage-events}"
: "${USAGE_TOPIC_PARTITIONS:=8}"
: "${INGEST_PORT:=8080}"
: "${CONTROL_API_PORT:=8081}"
: "${AGGREGATOR_METRICS_PORT:=9181}"
: "${PROMETHEUS_PORT:=9090}"
: "${TANSU_VERSION:=0.6.0}"
export METERING_CACHE METERING_STATE CARGO_TARGET_DIR METERING_PROFILE PGHOST PGPORT PGUSER \
  METERING_DB DATABASE_URL KAFKA_BROKERS USAGE_TOPIC USAGE_TOPIC_PARTITIONS INGEST_PORT \
  CONTROL_API_PORT AGGREGATOR_METRICS_PORT PROMETHEUS_PORT TANSU_VERSION
export PATH="$METERING_CACHE/tansu/bin:$METERING_CACHE/node/node_modules/.bin:$METERING_CACHE/k6/bin:$HOME/.cargo/bin:$PATH"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
