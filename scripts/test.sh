#!/usr/bin/env bash
# The test suite. Runs on CPU; starts real Ray clusters, DeepSpeed engines and MLflow stores itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
exec .venv/bin/pytest "$@"
