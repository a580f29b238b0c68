#!/usr/bin/env bash
# The test command: runs the whole suite against a real, throwaway PostgreSQL.
#
#   bash scripts/test.sh [pytest arguments...]
#
# 1. creates/reuses .venv and installs -e '.[dev]' (skipped while pyproject.toml is unchanged);
# 2. runs the static gates: ruff check, ruff format --check, mypy;
# 3. creates a PostgreSQL cluster in a fresh temporary folder (unix socket only, fsync off: never
#    use these settings for data that matters) and starts it;
# 4. runs pytest with SAGA_TEST_DSN / SAGA_TEST_PGBIN / SAGA_TEST_PGDATA / SAGA_TEST_PGCTL set;
# 5. always stops the server and deletes the folder on exit (success, failure, Ctrl-C, SIGTERM).
#
# Runs from any folder, as root or not, never prompts. As root, the server runs as the
# `postgres` system user (PostgreSQL refuses to run as root); Python and pytest stay root.
# When no PostgreSQL server binaries are found, root installs Debian's `postgresql` package;
# likewise Debian's `chromium` for the dashboard's browser tests (without it, and not as
# root, those tests are skipped, except under CI=true where they fail).
#
# Environment:
#   SAGA_TEST_PGBIN  folder with initdb/pg_ctl to use (default: newest /usr/lib/postgresql/*/bin)
#   SAGA_PYTHON      interpreter used to create .venv (see scripts/_venv.sh)
#   SAGA_TEST_CHROMIUM  the Chromium binary of the browser tests (default: /usr/bin/chromium)
set -euo pipefail

repo_root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo_root"

# shellcheck source=scripts/_venv.sh
source "$repo_root/scripts/_venv.sh"

banner() {
    printf '\n==================== %s ====================\n' "$*" >&2
}

fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
banner "setup: .venv"
saga_venv_ensure "$repo_root" dev
venv_bin="$repo_root/.venv/bin"

# ---------------------------------------------------------------------------------------------
banner "gate 1/4: ruff check"
"$venv_bin/ruff" check . || fail "ruff check (fix with: .venv/bin/ruff check --fix .)"

banner "gate 2/4: ruff format --check"
"$venv_bin/ruff" format --check . || fail "ruff format --check (fix with: .venv/bin/ruff format .)"

banner "gate 3/4: mypy"
"$venv_bin/mypy" || fail "mypy (files and strictness are set in pyproject.toml [tool.mypy])"

# ---------------------------------------------------------------------------------------------
banner "setup: throwaway PostgreSQL"

is_root=0
if [[ "$(id -u)" -eq 0 ]]; then
    is_root=1
fi

# Prints the newest /usr/lib/postgresql/<version>/bin holding initdb, or nothing.
# (pg_config --bindir is not reliable: it can belong to libpq-dev without a server.)
find_pg_bindir() {
    if [[ -n "${SAGA_TEST_PGBIN:-}" ]]; then
        [[ -x "$SAGA_TEST_PGBIN/initdb" ]] || fail "SAGA_TEST_PGBIN=$SAGA_TEST_PGBIN has no initdb"
        printf '%s\n' "$SAGA_TEST_PGBIN"
        return 0
    fi
    local initdb
    initdb="$(
        shopt -s nullglob
        for f in /usr/lib/postgresql/*/bin/initdb; do
            [[ -x "$f" ]] && printf '%s\n' "$f"
        done | sort -V | tail -n 1
    )"
    if [[ -n "$initdb" ]]; then
        dirname -- "$initdb"
    fi
}

pg_bin="$(find_pg_bindir)"
if [[ -z "$pg_bin" ]]; then
    if [[ "$is_root" -eq 1 ]]; then
        saga_say "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; installing Debian's postgresql"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q || fail "apt-get update"
        apt-get install -y -q --no-install-recommends postgresql </dev/null ||
            fail "apt-get install postgresql"
        pg_bin="$(find_pg_bindir)"
    fi
    [[ -n "$pg_bin" ]] || fail "no PostgreSQL server binaries found (looked for \
/usr/lib/postgresql/*/bin/initdb). Install the server (Debian/Ubuntu: sudo apt-get install \
postgresql) or point SAGA_TEST_PGBIN at the folder holding initdb and pg_ctl."
fi

# The dashboard's browser tests drive Debian's Chromium (Playwright with the system browser;
# browser downloads from the internet do not work everywhere). Root installs it when missing.
find_chromium() {
    local candidate
    for candidate in "${SAGA_TEST_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
}
chromium_bin="$(find_chromium)"
if [[ -z "$chromium_bin" && "$is_root" -eq 1 ]]; then
    saga_say "no Chromium found; installing Debian's chromium for the browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || fail "apt-get update"
    apt-get install -y -q --no-install-recommends chromium </dev/null ||
        fail "apt-get install chromium"
    chromium_bin="$(find_chromium)"
fi
if [[ -n "$chromium_bin" ]]; then
    export SAGA_TEST_CHROMIUM="$chromium_bin"
    saga_say "browser tests use $chromium_bin"
else
    saga_say "no Chromium: the browser tests will be skipped (install Debian's chromium)"
fi

if [[ "$is_root" -eq 1 ]]; then
    pg_user=postgres
    if ! id -u "$pg_user" >/dev/null 2>&1; then
        saga_say "creating system user $pg_user (PostgreSQL refuses to run as root)"
        useradd --system --no-create-home --shell /usr/sbin/nologin "$pg_user" ||
            fail "useradd $pg_user"
    fi
else
    pg_user="$(id -un)"
fi

# Runs a PostgreSQL binary as the cluster owner, from / (runuser would otherwise warn that the
# postgres user cannot enter the current folder).
as_pg() {
    if [[ "$is_root" -eq 1 ]]; then
        (cd / && runuser -u "$pg_user" -- "$@")
    else
        "$@"
    fi
}

# /tmp rather than $TMPDIR: the socket path (<dir>/.s.PGSQL.5432) must stay under ~107 bytes.
pg_tmp="$(mktemp -d /tmp/saga-test-pg.XXXXXXXX)"
pg_data="$pg_tmp/data"
pg_log="$pg_tmp/server.log"
pg_port=5432 # no clash: unix socket only, in a folder nobody else uses
pg_started=0

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    if [[ "$pg_started" -eq 1 ]]; then
        if ! as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m fast -w -t 30 stop >/dev/null 2>&1; then
            # Already stopped (a test may have stopped it), or stuck: make sure it is gone.
            if as_pg "$pg_bin/pg_ctl" -D "$pg_data" status >/dev/null 2>&1; then
                printf 'warning: fast stop failed; stopping PostgreSQL with -m immediate\n' >&2
                as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m immediate -w -t 30 stop >/dev/null 2>&1
            fi
        fi
    fi
    rm -rf -- "$pg_tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [[ "$is_root" -eq 1 ]]; then
    chown "$pg_user:" "$pg_tmp"
fi
chmod 755 "$pg_tmp"

pg_version="$("$pg_bin/postgres" --version 2>/dev/null || true)"
saga_say "server: ${pg_version:-$pg_bin/postgres} (as user $pg_user), folder: $pg_tmp"

as_pg "$pg_bin/initdb" -D "$pg_data" -E UTF8 --locale=C.UTF-8 --no-sync --auth=trust \
    -U postgres >"$pg_tmp/initdb.log" 2>&1 || {
    cat "$pg_tmp/initdb.log" >&2
    fail "initdb"
}

# The same settings as -o below, written to postgresql.conf too, so that a test which stops and
# starts the server again with plain `pg_ctl -D "$SAGA_TEST_PGDATA" start` gets them back.
# Throwaway cluster only: fsync/synchronous_commit/full_page_writes off trade durability for speed.
cat >>"$pg_data/postgresql.conf" <<EOF

# --- added by scripts/test.sh (throwaway test cluster) ---
listen_addresses = ''
unix_socket_directories = '$pg_tmp'
port = $pg_port
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF

pg_started=1
if ! as_pg "$pg_bin/pg_ctl" -D "$pg_data" -w -t 60 -l "$pg_log" \
    -o "-h '' -k $pg_tmp -p $pg_port -c fsync=off -c synchronous_commit=off \
-c full_page_writes=off -c max_connections=200" start >/dev/null; then
    printf '\n--- tail of %s ---\n' "$pg_log" >&2
    tail -n 50 "$pg_log" >&2 || true
    fail "could not start PostgreSQL"
fi

# A pg_ctl wrapper for tests that stop/start/restart the server: as root it runs pg_ctl as the
# cluster owner from /; use it as: "$SAGA_TEST_PGCTL" -D "$SAGA_TEST_PGDATA" -m fast -w restart
pg_ctl_wrapper="$pg_tmp/pg_ctl"
if [[ "$is_root" -eq 1 ]]; then
    printf '#!/bin/sh\ncd / && exec runuser -u %q -- %q "$@"\n' "$pg_user" "$pg_bin/pg_ctl" \
        >"$pg_ctl_wrapper"
else
    printf '#!/bin/sh\nexec %q "$@"\n' "$pg_bin/pg_ctl" >"$pg_ctl_wrapper"
fi
chmod 755 "$pg_ctl_wrapper"

export SAGA_TEST_DSN="postgresql://postgres@/postgres?host=$pg_tmp&port=$pg_port"
export SAGA_TEST_PGBIN="$pg_bin"
export SAGA_TEST_PGDATA="$pg_data"
export SAGA_TEST_PGCTL="$pg_ctl_wrapper"
saga_say "SAGA_TEST_DSN=$SAGA_TEST_DSN"

# ---------------------------------------------------------------------------------------------
banner "gate 4/4: pytest"
set +e
"$venv_bin/python" -m pytest "$@"
pytest_rc=$?
set -e
case "$pytest_rc" in
0) ;;
5) fail "pytest collected no tests (exit code 5): a run that tests nothing is not a pass" ;;
*) fail "pytest (exit code $pytest_rc)" ;;
esac

banner "all gates passed"
