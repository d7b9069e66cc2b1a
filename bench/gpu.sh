#!/usr/bin/env bash
# GPU checks and timings in one run (device machine: torch with CUDA present, no network), ending within
# BUDGET_S seconds (default 480) with the tables last:
#   gpu     bench/gpu.py: correctness on the GPU, augmentation, training step and inference per network,
#           one CT through the predictor (at most GPU_PY_S seconds, default 170, of the budget)
#   levers  bench/gpu_levers.py: the training-step levers of U-Net and ResEnc U-Net (the rest of it)
# SECTIONS="gpu levers" (default) picks sections; extra arguments go to gpu_levers.py. Each section gets
# a deadline (rows or networks that would start later are skipped with a printed note) and is stopped
# by `timeout` at the end of its share as a backstop. Packages the image lacks come from
# .device/site-py312.tar.xz or .whl/ (bench/device_site.sh). Logs and JSON go to $OUT (or /tmp).
#   run(command="bash bench/gpu.sh", carry=[".device"], timeout_s=540)
#   run(command="SECTIONS=levers BUDGET_S=300 bash bench/gpu.sh", carry=[".device"])
# Results are recorded in docs/benchmarks.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
END=$((T0 + BUDGET_S - 10)) # margin: tables, exit
RESULTS=${OUT:-/tmp}
SECTIONS=${SECTIONS:-gpu levers}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu.log") 2>&1
source bench/device_site.sh
source bench/budget.sh
DEVICE=${DEVICE:-cuda} # DEVICE=cpu: the same at tiny sizes (--small), to check this script without a GPU
if [ "$DEVICE" = cuda ]; then
  DEV_ARGS="--device cuda"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
else
  DEV_ARGS="--device cpu --small"
fi
export DEV_ARGS

for s in $SECTIONS; do
  case $s in
    gpu)
      section "bench/gpu.py" "${GPU_PY_S:-170}" bash -c \
        'python3 bench/gpu.py $DEV_ARGS --reps "${REPS:-10}" --archs "${ARCHS:-unet,resenc_unet,swin_unetr}" --deadline "$DEADLINE" --out "$0/gpu.json"' "$RESULTS"
      ;;
    levers)
      section "bench/gpu_levers.py" "$BUDGET_S" bash -c \
        'python3 bench/gpu_levers.py $DEV_ARGS --deadline "$DEADLINE" --out "$0/levers.json" "${@}"' "$RESULTS" "$@"
      ;;
    *) echo "unknown section $s (gpu, levers)" >&2; exit 2 ;;
  esac
done
echo "bench/gpu.sh: $(($(date +%s) - T0)) s of the ${BUDGET_S} s budget"
