#!/usr/bin/env bash
# An MLflow tracking server for the platform: runs, metrics and the model registry in PostgreSQL,
# artifacts (exported weights, model packages, PNGs) in object storage or a folder, proxied by the server
# so clients need no storage credentials of their own; optionally MLflow's basic authentication.
#
#   PGHOST=db.internal PGUSER=mlflow PGDATABASE=mlflow PGPASSFILE=/etc/mlflow/pgpass \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow infra/mlflow-server.sh
#
# Environment (nothing secret lives in this file, and no secret goes on a command line or into a URI):
#   PGHOST, PGPORT (5432), PGUSER, PGDATABASE   where the backend store is. The password is NOT put in
#   PGPASSWORD, PGPASSFILE or ~/.pgpass          the URI (it would show in `ps`): libpq reads it from
#                                                PGPASSWORD or the password file (chmod 600) by itself.
#   MLFLOW_BACKEND_STORE_URI                     overrides the PG* variables (any SQLAlchemy URI).
#   MLFLOW_ARTIFACTS_DESTINATION                 s3://..., gs://..., or a local folder (required).
#   AWS_* / MLFLOW_S3_ENDPOINT_URL               credentials and endpoint of an S3(-compatible) store;
#   GOOGLE_APPLICATION_CREDENTIALS               only the server needs them.
#   MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS                         Host headers to accept when MLFLOW_HOST is not local,
#                                                e.g. "mlflow.internal:5000,10.0.0.5:5000".
#   MLFLOW_BIN                                   the mlflow executable (default: the one on PATH, else
#                                                this repository's .venv/bin/mlflow).
# Basic authentication (`mlflow server --app-name basic-auth`), on when MLFLOW_BASIC_AUTH=1:
#   MLFLOW_FLASK_SERVER_SECRET_KEY               required: a random string, the same for every server
#   MLFLOW_AUTH_ADMIN_USERNAME (admin)           the admin MLflow creates on the first start against an
#   MLFLOW_AUTH_ADMIN_PASSWORD                   empty user store (ignored once the user exists)
#   MLFLOW_AUTH_CONFIG_PATH                      your own basic_auth.ini; without it one is written to
#                                                ${TMPDIR:-/tmp} with the user store in PostgreSQL:
#   MLFLOW_AUTH_DATABASE (mlflow_auth)           a database beside PGDATABASE on the same server (create
#                                                it first), or MLFLOW_AUTH_DATABASE_URI (any SQLAlchemy URI)
#   MLFLOW_AUTH_DEFAULT_PERMISSION (READ)        what a signed-in user may do with others' experiments
#                                                (READ, USE, EDIT, MANAGE or NO_PERMISSIONS)
#   Clients then set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; a request without them gets 401.
#   Users are added by the admin (MlflowClient's auth API: mlflow.server.get_app_client("basic-auth", ...)).
#
# Needs a PostgreSQL driver beside mlflow: `pip install "psycopg[binary]"` (psycopg 3, SQLAlchemy
# 2's default PostgreSQL driver; in this repository's dev extras, not a dependency of the package).
# The server creates and migrates its tables on first start. Put it behind TLS when it is reachable from
# outside the cluster's private network: basic auth sends the password with every request.
# A local PostgreSQL for trying this out: scripts/postgres.sh start; eval "$(scripts/postgres.sh env)".
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mlflow_bin="${MLFLOW_BIN:-$(command -v mlflow || echo "$here/../.venv/bin/mlflow")}"
[[ -x "$mlflow_bin" ]] || { echo "error: no mlflow executable at $mlflow_bin (set MLFLOW_BIN)" >&2; exit 2; }
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"

pg_uri() {  # a SQLAlchemy URI for database $1 on the PG* server, without a password
    echo "postgresql+psycopg://${PGUSER}@${PGHOST}:${PGPORT:-5432}/$1"
}

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
    : "${PGHOST:?set PGHOST (and PGUSER, PGDATABASE, PGPASSWORD or PGPASSFILE) or MLFLOW_BACKEND_STORE_URI}"
    : "${PGUSER:?set PGUSER}"
    : "${PGDATABASE:?set PGDATABASE}"
    MLFLOW_BACKEND_STORE_URI="$(pg_uri "$PGDATABASE")"
fi
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix, gs://..., or a folder)}"

# The interpreter mlflow runs under is the one its console script names on its first line.
mlflow_python="$(head -n 1 "$mlflow_bin" | sed 's/^#! *//')"

args=(
    server
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
    --serve-artifacts
    --host "$host"
    --port "$port"
    --workers "${MLFLOW_WORKERS:-4}"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

auth_db_uri=""
if [[ "${MLFLOW_BASIC_AUTH:-0}" == 1 ]]; then
    [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] \
        || { echo "error: MLFLOW_BASIC_AUTH=1 needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random string)" >&2; exit 2; }
    if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
        if [[ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]]; then
            auth_db_uri="$MLFLOW_AUTH_DATABASE_URI"
        elif [[ -n "${PGHOST:-}" && -n "${PGUSER:-}" ]]; then
            auth_db_uri="$(pg_uri "${MLFLOW_AUTH_DATABASE:-mlflow_auth}")"
        else
            echo "error: MLFLOW_BASIC_AUTH=1 needs MLFLOW_AUTH_CONFIG_PATH, MLFLOW_AUTH_DATABASE_URI or PGHOST/PGUSER" >&2
            exit 2
        fi
        # No secret in it (the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD), so a plain file;
        # written whole, then renamed, so a server starting beside this one never reads half of it.
        MLFLOW_AUTH_CONFIG_PATH="${TMPDIR:-/tmp}/mlflow-basic-auth-$(id -un)-${port}.ini"
        tmp="$(mktemp "$MLFLOW_AUTH_CONFIG_PATH.XXXXXX")"
        cat >"$tmp" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $auth_db_uri
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
        chmod 644 "$tmp"
        mv "$tmp" "$MLFLOW_AUTH_CONFIG_PATH"
        export MLFLOW_AUTH_CONFIG_PATH
    fi
    args+=(--app-name basic-auth)
fi

if [[ "${MLFLOW_BASIC_AUTH:-0}" == 1 ]]; then
    "$mlflow_python" -c "import flask_wtf" 2>/dev/null \
        || { echo "error: basic auth needs Flask-WTF beside $mlflow_bin: pip install 'mlflow[auth]'" >&2; exit 2; }
fi

# Before starting: the driver is there and the database answers (a wrong password or a missing database
# is one line here, not a traceback per worker). The URIs carry no password; libpq finds it.
check_db() {
    [[ "$1" == postgresql* ]] || return 0
    "$mlflow_python" - "$1" <<'PY' || exit 2
import sys
try:
    import psycopg
except ImportError:
    sys.exit(f"error: no PostgreSQL driver beside mlflow ({sys.executable}): pip install 'psycopg[binary]'")
from sqlalchemy.engine import make_url

url = make_url(sys.argv[1])
try:
    psycopg.connect(**url.translate_connect_args(username="user", database="dbname"), connect_timeout=10).close()
except psycopg.Error as e:
    reason = " ".join(str(e).split())
    sys.exit(f"error: cannot use the database {url.render_as_string(hide_password=True)}: {reason}")
PY
}
check_db "$MLFLOW_BACKEND_STORE_URI"
if [[ -n "$auth_db_uri" ]]; then
    check_db "$auth_db_uri"
fi

# Print where it listens, never the store URI's credentials (there are none in it, but a URI given
# through MLFLOW_BACKEND_STORE_URI might carry some).
auth_note=""
if [[ "${MLFLOW_BASIC_AUTH:-0}" == 1 ]]; then
    auth_note="; basic auth (users: $MLFLOW_AUTH_CONFIG_PATH)"
fi
echo "mlflow server on http://$host:$port; artifacts -> $MLFLOW_ARTIFACTS_DESTINATION$auth_note" >&2
exec "$mlflow_bin" "${args[@]}"
