#!/bin/sh
# Make sure a local PostgreSQL server is available for the multi-machine tuning tests
# (tests/tune/test_postgres.py), and print the URL they use:
#
#     postgresql://gradwise:gradwise@127.0.0.1:5432/gradwise_test
#
# Idempotent: does nothing when that URL (or $GRADWISE_TEST_POSTGRES, a server you bring yourself)
# already accepts connections. Otherwise it installs Debian's `postgresql` package when it is
# missing, creates the `main` cluster of the newest installed version when there is none, starts it
# listening on 127.0.0.1 only (pg_ctlcluster: no systemd needed), and creates the role `gradwise`
# (password `gradwise`, may create databases: each test makes its own) and the database
# `gradwise_test`. Needs root (or sudo) for everything but the fast path.
set -eu

URL="postgresql://gradwise:gradwise@127.0.0.1:5432/gradwise_test"
if [ -n "${GRADWISE_TEST_POSTGRES:-}" ]; then
    echo "$GRADWISE_TEST_POSTGRES" | sed 's#://\([^:@/]*\):[^@/]*@#://\1:***@#'
    exit 0
fi

reachable() {
    command -v psql >/dev/null 2>&1 &&
        PGCONNECT_TIMEOUT=3 psql "$URL" -tAc 'select 1' >/dev/null 2>&1
}
if reachable; then
    echo "$URL"
    exit 0
fi

SUDO=""
AS_POSTGRES="runuser -u postgres --"
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
        AS_POSTGRES="sudo -u postgres"
    else
        echo "ensure_postgres.sh: no PostgreSQL at $URL, and setting one up needs root (or sudo);" \
            "or set GRADWISE_TEST_POSTGRES to a server of yours" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    # Try the install from the existing package lists first; update them only if that fails.
    if ! $SUDO apt-get install -y --no-install-recommends postgresql; then
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends postgresql
    fi
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if [ ! -d "/etc/postgresql/$VERSION/main" ]; then
    $SUDO pg_createcluster "$VERSION" main
fi
PORT=$($SUDO pg_conftool -s "$VERSION" main show port 2>/dev/null || echo 5432)
if [ "$PORT" != 5432 ]; then
    echo "ensure_postgres.sh: cluster $VERSION/main uses port $PORT, not 5432;" \
        "set GRADWISE_TEST_POSTGRES=postgresql://gradwise:gradwise@127.0.0.1:$PORT/gradwise_test" >&2
    exit 1
fi
if ! $SUDO pg_ctlcluster "$VERSION" main status >/dev/null 2>&1; then
    # -o: loopback only, whatever the configuration says; with options pg_ctlcluster starts the
    # server itself rather than through systemd, so this also works in containers.
    $SUDO pg_ctlcluster -o "-c listen_addresses=127.0.0.1" "$VERSION" main start
fi

# The role and the database, created or brought back to the settings above.
$AS_POSTGRES psql -q -v ON_ERROR_STOP=1 -d postgres <<'SQL'
SELECT format('CREATE ROLE gradwise LOGIN CREATEDB PASSWORD %L', 'gradwise')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gradwise') \gexec
ALTER ROLE gradwise LOGIN CREATEDB PASSWORD 'gradwise';
SELECT 'CREATE DATABASE gradwise_test OWNER gradwise'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'gradwise_test') \gexec
SQL

if ! reachable; then
    echo "ensure_postgres.sh: PostgreSQL $VERSION is running but $URL does not accept connections" >&2
    exit 1
fi
echo "$URL"
