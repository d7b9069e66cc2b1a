#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1 for MLflow's backend store: what CI and the MLflow-server tests use
# (tests/test_mlflow_server.py), and a development store. Not a production database.
#
#   scripts/postgres.sh start            install (Debian packages) if missing, initialise, start; idempotent
#   eval "$(scripts/postgres.sh env)"    PGHOST PGPORT PGUSER PGDATABASE PGPASSFILE for clients (no password)
#   scripts/postgres.sh status           exit 0 when running, 3 when not
#   scripts/postgres.sh stop             stops this cluster only
#
# `start` runs `apt-get install postgresql` (Debian 12: PostgreSQL 15, binaries in
# /usr/lib/postgresql/15/bin) when no initdb/pg_ctl is found, creates the cluster once in
# $MULTITALENT_PG_DIR/data as a non-root user (`postgres`, the user Debian's package creates, when run as
# root; else the current user), and starts it on 127.0.0.1:$MULTITALENT_PG_PORT. The cluster's own
# superuser logs in only through the Unix socket in $MULTITALENT_PG_DIR/run (peer authentication); TCP
# clients need a password (scram-sha-256). It creates the login role `mlflow` (CREATEDB) with databases
# `mlflow` and `mlflow_auth` (MLflow's basic-auth user store). The role's password is generated once and
# kept only in $MULTITALENT_PG_DIR/pgpass (libpq's password file, mode 600): it never appears on a
# command line, in a URI or in this script's output; clients find it through PGPASSFILE.
#
# Environment:
#   MULTITALENT_PG_DIR      state folder (default ${TMPDIR:-/tmp}/multitalent-postgres); its parents must
#                           be searchable by the cluster's user (not under /root)
#   MULTITALENT_PG_PORT     TCP port (default 55432, beside a system cluster on 5432)
#   MULTITALENT_PG_INSTALL  1 (default): install from Debian's packages when missing; 0: never
#   PG_BINDIR               folder holding initdb, pg_ctl, psql (default: found on PATH or under
#                           /usr/lib/postgresql/<newest>/bin)
set -euo pipefail

state="${MULTITALENT_PG_DIR:-${TMPDIR:-/tmp}/multitalent-postgres}"
port="${MULTITALENT_PG_PORT:-55432}"
role=mlflow
databases=(mlflow mlflow_auth)
data="$state/data"
sockets="$state/run"
logfile="$state/log/postgres.log"
pgpass="$state/pgpass"

say() { echo "postgres.sh: $*" >&2; }
die() {
    echo "postgres.sh: error: $*" >&2
    exit 2
}

if [[ $(id -u) == 0 ]]; then
    os_user=postgres
else
    os_user="$(id -un)"
fi

as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        die "installing PostgreSQL needs root (or password-less sudo): run 'apt-get install postgresql' as root"
    fi
}

# Run a command as the cluster's user, from / (its own folders may be unreadable to the caller),
# without the lock's descriptor (a server started from here would hold the lock for its lifetime).
as_cluster_user() {
    if [[ $(id -un) == "$os_user" ]]; then
        (cd / && "$@") 9>&-
    else
        (cd / && runuser -u "$os_user" -- "$@") 9>&-
    fi
}

find_bindir() {
    local d
    if [[ -n "${PG_BINDIR:-}" ]]; then
        [[ -x "$PG_BINDIR/initdb" && -x "$PG_BINDIR/pg_ctl" ]] || die "PG_BINDIR=$PG_BINDIR has no initdb/pg_ctl"
        echo "$PG_BINDIR"
        return 0
    fi
    # Debian's /usr/bin/psql etc. are wrappers; initdb and pg_ctl are not on PATH there, so look at the
    # versioned folders first, then PATH (resolving symlinks to the real folder).
    for d in $(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/psql" ]]; then
            echo "$d"
            return 0
        fi
    done
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        d="$(dirname "$(readlink -f "$(command -v pg_ctl)")")"
        if [[ -x "$d/initdb" && -x "$d/psql" ]]; then
            echo "$d"
            return 0
        fi
    fi
    return 1
}

install_postgres() {
    [[ "${MULTITALENT_PG_INSTALL:-1}" == 1 ]] \
        || die "PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin) and MULTITALENT_PG_INSTALL=0"
    command -v apt-get >/dev/null \
        || die "PostgreSQL is not installed and there is no apt-get: install PostgreSQL >= 13 or set PG_BINDIR"
    say "PostgreSQL not found: installing Debian's 'postgresql' package (apt-get)"
    local log
    log="$(mktemp)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 \
        || ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            postgresql >>"$log" 2>&1; then
        tail -20 "$log" >&2
        rm -f "$log"
        die "apt-get install postgresql failed"
    fi
    rm -f "$log"
}

# Port from a running cluster's postmaster.pid (line 4), else the requested one.
current_port() {
    local p=""
    if [[ -r "$data/postmaster.pid" ]]; then
        p="$(sed -n 4p "$data/postmaster.pid" 2>/dev/null || true)"
    fi
    echo "${p:-$port}"
}

is_running() {
    local bindir
    [[ -f "$data/PG_VERSION" ]] || return 1
    bindir="$(find_bindir)" || return 1
    as_cluster_user "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1
}

port_taken() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

psql_admin() {  # SQL on stdin, as the cluster's superuser over the Unix socket
    as_cluster_user "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$sockets" -p "$(current_port)" \
        -U "$os_user" -d postgres "$@"
}

init_cluster() {
    local tmp="$state/data.initdb"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    chown "$os_user" "$tmp"
    chmod 700 "$tmp"
    as_cluster_user test -w "$tmp" \
        || die "user $os_user cannot write $tmp (a parent folder is not searchable): set MULTITALENT_PG_DIR elsewhere, e.g. under /tmp"
    say "initialising a cluster in $data (as $os_user)"
    local log
    log="$(mktemp)"
    if ! as_cluster_user "$bindir/initdb" -D "$tmp" -U "$os_user" --no-locale -E UTF8 \
        --auth-local=peer --auth-host=scram-sha-256 >"$log" 2>&1; then
        tail -20 "$log" >&2
        rm -f "$log"
        die "initdb failed"
    fi
    rm -f "$log"
    as_cluster_user tee -a "$tmp/postgresql.conf" >/dev/null <<EOF

# scripts/postgres.sh: loopback only; the socket in a private folder; the port is given at start
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockets'
password_encryption = 'scram-sha-256'
EOF
    mv "$tmp" "$data"  # a half-initialised cluster never sits under data/
}

ensure_password() {
    if [[ ! -s "$pgpass" ]]; then
        local secret tmp
        secret="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
        tmp="$(mktemp "$state/.pgpass.XXXXXX")"
        chmod 600 "$tmp"
        printf '127.0.0.1:*:*:%s:%s\nlocalhost:*:*:%s:%s\n' "$role" "$secret" "$role" "$secret" >"$tmp"
        mv "$tmp" "$pgpass"
    fi
    chmod 600 "$pgpass"
}

ensure_role_and_databases() {
    local secret exists db
    secret="$(head -n 1 "$pgpass" | cut -d: -f5)"
    exists="$(echo "SELECT 1 FROM pg_roles WHERE rolname = '$role'" | psql_admin -t -A)"
    # The password goes through psql's standard input (printf is a shell builtin: nothing in `ps`);
    # a failing statement is not written to the server log with its text.
    if [[ "$exists" != 1 ]]; then
        say "creating role $role"
        printf "SET log_min_error_statement = panic;\nCREATE ROLE %s LOGIN CREATEDB PASSWORD '%s';\n" \
            "$role" "$secret" | psql_admin
    else
        printf "SET log_min_error_statement = panic;\nALTER ROLE %s LOGIN CREATEDB PASSWORD '%s';\n" \
            "$role" "$secret" | psql_admin
    fi
    for db in "${databases[@]}"; do
        exists="$(echo "SELECT 1 FROM pg_database WHERE datname = '$db'" | psql_admin -t -A)"
        if [[ "$exists" != 1 ]]; then
            say "creating database $db (owner $role)"
            echo "CREATE DATABASE $db OWNER $role" | psql_admin
        fi
    done
}

start() {
    if ! bindir="$(find_bindir)"; then
        [[ -z "${PG_BINDIR:-}" ]] || exit 2  # find_bindir said what is wrong with it
        install_postgres
        bindir="$(find_bindir)" || die "apt-get installed postgresql, but no initdb/pg_ctl under /usr/lib/postgresql/*/bin"
    fi
    if [[ $(id -u) == 0 ]] && ! id "$os_user" >/dev/null 2>&1; then
        say "creating system user $os_user to run the cluster (initdb refuses root)"
        useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "$os_user"
    fi
    mkdir -p "$state"
    chmod 755 "$state"
    exec 9>"$state/.lock"
    flock 9  # one start at a time (CI and a test fixture may race)
    mkdir -p "$sockets" "$(dirname "$logfile")"
    chown "$os_user" "$sockets" "$(dirname "$logfile")"
    chmod 700 "$sockets"
    local version
    version="$("$bindir/postgres" --version)"
    if is_running; then
        say "already running: $version, $data on 127.0.0.1:$(current_port)"
    else
        if port_taken "$port"; then
            die "127.0.0.1:$port is taken by another server; set MULTITALENT_PG_PORT to a free port"
        fi
        [[ -f "$data/PG_VERSION" ]] || init_cluster
        as_cluster_user "$bindir/pg_ctl" -D "$data" -l "$logfile" -w -t 60 -o "-p $port" start >/dev/null \
            || { tail -20 "$logfile" >&2; die "pg_ctl start failed (log: $logfile)"; }
        say "started $version, $data on 127.0.0.1:$port (log: $logfile)"
    fi
    ensure_password
    ensure_role_and_databases
    say "role $role, databases ${databases[*]}; password in $pgpass (clients: eval \"\$($0 env)\")"
}

case "${1:-start}" in
    start)
        start
        ;;
    stop)
        if is_running; then
            bindir="$(find_bindir)"
            as_cluster_user "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null
            say "stopped the cluster in $data"
        else
            say "not running ($data)"
        fi
        ;;
    status)
        if is_running; then
            echo "running: $data on 127.0.0.1:$(current_port)"
        else
            echo "not running: $data"
            exit 3
        fi
        ;;
    env)
        [[ -s "$pgpass" ]] || die "no $pgpass yet: run '$0 start' first"
        printf 'export PGHOST=127.0.0.1 PGPORT=%q PGUSER=%q PGDATABASE=%q PGPASSFILE=%q\n' \
            "$(current_port)" "$role" "${databases[0]}" "$pgpass"
        ;;
    *)
        die "usage: $0 [start|stop|status|env]"
        ;;
esac
