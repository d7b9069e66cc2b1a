#!/usr/bin/env bash
# GPU checks and timings in one run (device machine: torch with CUDA present, no network).
# Carries .whl/ (wheels of dynamic-network-architectures 0.4.4 and monai 1.6.1, fetched with `pip download`,
# see the device notes); results are recorded in docs/benchmarks.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/platform:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 bench/gpu.py --device cuda --reps "${REPS:-10}" --out "${OUT:-/tmp}/gpu.json" "$@"
