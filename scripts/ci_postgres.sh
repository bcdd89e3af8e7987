#!/usr/bin/env bash
# Install and start a throw-away PostgreSQL server on 127.0.0.1 for the distributed-search test (tests/test_postgres.py).
#
#   source scripts/ci_postgres.sh      # exports MIRAS_TEST_POSTGRES_URL; .ci/run calls it before pytest
#   scripts/ci_postgres.sh stop        # stops the server again
#
# Debian/Ubuntu: installs the `postgresql` package with apt when no server binary is present, and psycopg2-binary
# with pip. The cluster lives in a temporary folder, listens on loopback only, and trusts local connections.
set -euo pipefail

PGPORT="${MIRAS_PG_PORT:-54329}"
PGDATA_DIR="${MIRAS_PG_DATA:-/tmp/miras-pg-data}"
PGLOG="${PGDATA_DIR}.log"

find_bin() {
  local name="$1"
  command -v "$name" 2>/dev/null && return 0
  ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1
}

as_pg() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-start}" = "stop" ]; then
  PG_CTL="$(find_bin pg_ctl)"
  [ -n "$PG_CTL" ] && as_pg "$PG_CTL" -D "$PGDATA_DIR" -m fast stop || true
  return 0 2>/dev/null || exit 0
fi

if [ -z "$(find_bin initdb)" ]; then
  if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
python -c "import psycopg2" 2>/dev/null || python -m pip install -q "psycopg2-binary>=2.9"

INITDB="$(find_bin initdb)"
PG_CTL="$(find_bin pg_ctl)"
if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql postgres
fi

if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
  rm -rf "$PGDATA_DIR"
  mkdir -p "$PGDATA_DIR"
  [ "$(id -u)" = "0" ] && chown postgres "$PGDATA_DIR"
  as_pg "$INITDB" -D "$PGDATA_DIR" -U miras --auth=trust >/dev/null
fi
if ! as_pg "$PG_CTL" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  touch "$PGLOG"; [ "$(id -u)" = "0" ] && chown postgres "$PGLOG"
  as_pg "$PG_CTL" -D "$PGDATA_DIR" -l "$PGLOG" -w \
    -o "-p $PGPORT -c listen_addresses=127.0.0.1 -k $PGDATA_DIR -c max_connections=100" start >/dev/null
fi
PSQL="$(find_bin psql)"
"$PSQL" -h 127.0.0.1 -p "$PGPORT" -U miras -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='miras_test'" \
  | grep -q 1 || "$PSQL" -h 127.0.0.1 -p "$PGPORT" -U miras -d postgres -qc "CREATE DATABASE miras_test"

export MIRAS_TEST_POSTGRES_URL="postgresql://miras@127.0.0.1:${PGPORT}/miras_test"
echo "PostgreSQL ready: $MIRAS_TEST_POSTGRES_URL"
