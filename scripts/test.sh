#!/usr/bin/env bash
# Every test of the workspace against the real stack: brings the stack up (installing what is
# missing), lints the protobuf contracts, then runs all tests with nextest.
#
#   scripts/test.sh [extra nextest arguments]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
cd "$ROOT"

"$ROOT/scripts/stack.sh" up

log "buf lint (schemas/proto)"
(cd schemas/proto && buf lint)

log "dropping test databases left by earlier runs"
psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -tAc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'metering\_t\_%'" |
  while read -r db; do
    [ -n "$db" ] && psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  done

log "cargo nextest (profile $METERING_PROFILE)"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --cargo-profile "$METERING_PROFILE" --no-fail-fast "$@"
else
  cargo test --workspace --profile "$METERING_PROFILE" --no-fail-fast "$@"
fi
