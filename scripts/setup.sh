#!/usr/bin/env bash
# Create .venv and install the platform. torch is pinned and installed first: with no torch present,
# pip would resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() {
  local log
  log=$(mktemp)
  if ! .venv/bin/pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -40
    echo "pip install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}
pip_install torch==2.13.0
pip_install -e '.[dev]'
.venv/bin/python -c "import torch, multitalent; print('torch', torch.__version__, '| multitalent', multitalent.__version__)"
