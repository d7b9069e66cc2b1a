#!/usr/bin/env bash
# An MLflow tracking server for the platform: runs and metrics in PostgreSQL, artifacts (checkpoints'
# exported weights, PNGs) in object storage or a folder, proxied by the server so clients need no
# storage credentials of their own.
#
#   PGHOST=db.internal PGUSER=mlflow PGDATABASE=mlflow PGPASSWORD=... \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow infra/mlflow-server.sh
#
# Environment (nothing secret lives in this file):
#   PGHOST, PGPORT (5432), PGUSER, PGDATABASE   where the backend store is. The password is NOT put in
#   PGPASSWORD or ~/.pgpass                      the URI (it would show in `ps`): libpq reads it from
#                                                PGPASSWORD or ~/.pgpass (chmod 600) by itself.
#   MLFLOW_BACKEND_STORE_URI                     overrides the PG* variables (any SQLAlchemy URI).
#   MLFLOW_ARTIFACTS_DESTINATION                 s3://..., gs://..., or a local folder (required).
#   AWS_* / GOOGLE_APPLICATION_CREDENTIALS       credentials of the artifact store, if it needs any.
#   MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS                         Host headers to accept when MLFLOW_HOST is not local,
#                                                e.g. "mlflow.internal:5000,10.0.0.5:5000".
#   MLFLOW_BIN                                   the mlflow executable (default: the one on PATH, else
#                                                this repository's .venv/bin/mlflow).
#
# Needs a PostgreSQL driver beside mlflow: `pip install "psycopg[binary]"` (psycopg 3, SQLAlchemy
# 2.1's default PostgreSQL driver; server only, not a dependency of the training package). The server creates and migrates its tables on first start.
# Put it behind TLS and authentication (a reverse proxy, or `--app-name basic-auth`) when it is
# reachable from outside the cluster's private network.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mlflow_bin="${MLFLOW_BIN:-$(command -v mlflow || echo "$here/../.venv/bin/mlflow")}"

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
    : "${PGHOST:?set PGHOST (and PGUSER, PGDATABASE, PGPASSWORD) or MLFLOW_BACKEND_STORE_URI}"
    : "${PGUSER:?set PGUSER}"
    : "${PGDATABASE:?set PGDATABASE}"
    # No password in the URI: libpq takes it from PGPASSWORD / ~/.pgpass.
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://${PGUSER}@${PGHOST}:${PGPORT:-5432}/${PGDATABASE}"
fi
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix, gs://..., or a folder)}"

if [[ "$MLFLOW_BACKEND_STORE_URI" == postgresql* ]]; then
    # The interpreter mlflow runs under is the one its console script names on its first line.
    mlflow_python="$(head -n 1 "$mlflow_bin" | sed 's/^#! *//')"
    "$mlflow_python" -c "import psycopg" 2>/dev/null \
        || { echo "error: no PostgreSQL driver beside $mlflow_bin: pip install 'psycopg[binary]'" >&2; exit 2; }
fi

args=(
    server
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
    --serve-artifacts
    --host "${MLFLOW_HOST:-127.0.0.1}"
    --port "${MLFLOW_PORT:-5000}"
    --workers "${MLFLOW_WORKERS:-4}"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

# Print where it listens, never the store URI's credentials (there are none in it, but a URI given
# through MLFLOW_BACKEND_STORE_URI might carry some).
echo "mlflow server on http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}; artifacts -> $MLFLOW_ARTIFACTS_DESTINATION" >&2
exec "$mlflow_bin" "${args[@]}"
