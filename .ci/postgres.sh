#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1:5432 for the shared-study tests
# (tests/test_search.py -m postgres) and print the variable that points them at it:
#
#   eval "$(bash .ci/postgres.sh)"      # then: pytest -m postgres
#
# Installs Debian's postgresql (apt) and the psycopg2 driver (pip, psycopg2-binary) into the
# Python that runs the tests ($PYTHON, default python3). Needs root. Idempotent: a server that
# already answers is reused. Local TCP connections are trusted (CI only: never on a shared host).
# Everything but the final `export` line goes to stderr, so `eval "$(...)"` is safe.
set -euo pipefail

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
DB=${PREFETCH_TUNE_PG_DB:-prefetch_tune}
PORT=5432
URL="postgresql+psycopg2://postgres@127.0.0.1:${PORT}/${DB}"

log() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "needs root (apt-get install, pg_ctlcluster)"
    exit 1
fi

if ! command -v pg_lsclusters >/dev/null 2>&1; then
    log "installing postgresql (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi

if ! "$PYTHON" -c "import psycopg2" >/dev/null 2>&1; then
    log "installing psycopg2-binary (pip) into $PYTHON"
    "$PYTHON" -m pip install -q psycopg2-binary >&2
fi

# The cluster Debian created on install (e.g. 15 main); create one if there is none.
read -r VERSION CLUSTER < <(pg_lsclusters --no-header | awk 'NR==1 {print $1, $2}') || true
if [ -z "${VERSION:-}" ]; then
    VERSION=$(ls /usr/lib/postgresql | sort -V | tail -1)
    CLUSTER=main
    log "creating cluster $VERSION/$CLUSTER"
    pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" >&2
fi
CONF=/etc/postgresql/$VERSION/$CLUSTER

# Listen on 127.0.0.1:5432 and trust local TCP (first matching pg_hba line wins).
sed -i -E "s/^#?\s*port\s*=.*/port = ${PORT}/" "$CONF/postgresql.conf"
sed -i -E "s/^#?\s*listen_addresses\s*=.*/listen_addresses = '127.0.0.1'/" "$CONF/postgresql.conf"
if ! grep -q '^# prefetch-tune CI' "$CONF/pg_hba.conf"; then
    {
        echo "# prefetch-tune CI: trust local TCP"
        echo "host all all 127.0.0.1/32 trust"
        cat "$CONF/pg_hba.conf"
    } >"$CONF/pg_hba.conf.new"
    mv "$CONF/pg_hba.conf.new" "$CONF/pg_hba.conf"
    chown postgres:postgres "$CONF/pg_hba.conf"
fi

if pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
    pg_ctlcluster "$VERSION" "$CLUSTER" reload >&2
else
    log "starting cluster $VERSION/$CLUSTER on 127.0.0.1:$PORT"
    pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi

for _ in $(seq 1 30); do
    if pg_isready -q -h 127.0.0.1 -p "$PORT"; then
        break
    fi
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$PORT" >&2

if ! psql -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='${DB}'" | grep -q 1; then
    log "creating database $DB"
    psql -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE ${DB}" >&2
fi

"$PYTHON" - "$URL" >&2 <<'EOF'
import sys

import sqlalchemy

engine = sqlalchemy.create_engine(sys.argv[1])
with engine.connect() as conn:
    print("postgres.sh: connected:", conn.execute(sqlalchemy.text("SELECT version()")).scalar())
EOF

echo "export PREFETCH_TUNE_TEST_POSTGRES=${URL}"
