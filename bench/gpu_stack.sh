#!/usr/bin/env bash
# The whole stack on the GPU device machine (issue 11, part 2), within BUDGET_S seconds (default 480):
#   1. unpack .device/site-py312.tar.xz into /tmp/site (bench/build_device_site.sh builds it here) and
#      check that everything `multitalent convert` and `multitalent train` import is there;
#   2. `multitalent convert jobs/convert.yaml`: generate and convert the phantom collection in $STACK_DIR;
#   3. the in-process loops to compare with, in the same call (bench/gpu_stack.py bare: bench/gpu.py's bare
#      torch loop, platform step, platform step + GPU augmentation, same network, heads, batch and patch);
#   4. `multitalent train jobs/pretrain.yaml` on the phantom shards in the paper configuration (ResEnc U-Net,
#      patch 96x192x192, micro-batch 2, bf16, GPU augmentation): Ray Train with 1 GPU worker, DeepSpeed
#      ZeRO-1, MLflow to sqlite under $STACK_DIR; ITERS_Z1 iterations, one checkpoint at the end;
#   5. the same run relaunched for ITERS_RESUME more iterations: it must resume from that checkpoint;
#   6. a second run with ZeRO-3 for ITERS_Z3 iterations;
#   7. bench/gpu_stack.py report: steps/s of every launch from MLflow's per-iteration timestamps against
#      the bare loop (target >= 0.9), the resume point, problems; the table last.
# Each stage has a share of the budget (rows below); one that would start with too little left is skipped
# with a note, one that overruns is interrupted (and the report says what is missing).
#
#   run(command="bash bench/gpu_stack.sh", carry=[".device"], timeout_s=540)
#   DEVICE=cpu bash bench/gpu_stack.sh    # rehearsal without a GPU: tiny U-Net, 2 CPU workers' worth, fp32
# Logs and JSON go to $OUT (or $STACK_DIR). Environment: BUDGET_S, STACK_DIR (/tmp/stack), ARCH
# (resenc_unet), ITERS_Z1 (200), ITERS_RESUME (100), ITERS_Z3 (40), CPUS (of the worker: nproc - 4),
# LOADERS (8 loader processes).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
END=$((T0 + BUDGET_S - 10))
DEVICE=${DEVICE:-cuda}
W=${STACK_DIR:-/tmp/stack}
RESULTS=${OUT:-$W}
mkdir -p "$RESULTS" "$W"
exec > >(tee "$RESULTS/stack.log") 2>&1
source bench/device_site.sh
source bench/budget.sh
# A private machine with no other users: Ray's token authentication off, no usage reports (no network).
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 RAY_AUTH_MODE=disabled
PY=python3
MT=("$PY" -m multitalent.cli)

if [ "$DEVICE" = cuda ]; then
  ARCH=${ARCH:-resenc_unet} SIZE=${SIZE:-paper} PATCH=${PATCH:-96,192,192}
  ITERS_Z1=${ITERS_Z1:-200} ITERS_RESUME=${ITERS_RESUME:-100} ITERS_Z3=${ITERS_Z3:-40}
  CPUS=${CPUS:-$(($(nproc) > 6 ? $(nproc) - 4 : 2))} LOADERS=${LOADERS:-8} USE_GPU=true SCALE=${SCALE:-1.0} WARMUP=${WARMUP:-10}
  SHARES=(60 60 170 100 80) # convert, bare, ZeRO-1, resume, ZeRO-3 (seconds; the report takes ~10)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
else # rehearsal on a CPU: the same stages, tiny
  ARCH=${ARCH:-unet} SIZE=${SIZE:-tiny} PATCH=${PATCH:-32,48,48}
  ITERS_Z1=${ITERS_Z1:-12} ITERS_RESUME=${ITERS_RESUME:-6} ITERS_Z3=${ITERS_Z3:-6}
  CPUS=${CPUS:-1} LOADERS=${LOADERS:-0} USE_GPU=false SCALE=${SCALE:-0.5} WARMUP=${WARMUP:-2}
  SHARES=(120 120 240 180 180)
  export DS_ACCELERATOR=cpu
fi

echo "== imports ($($PY -c 'import sys; print(sys.version.split()[0])'), PYTHONPATH=$PYTHONPATH)"
$PY - <<'EOF'
import importlib, time
t = time.perf_counter()
versions = []
for m in ["torch", "numpy", "ray", "ray.train.torch", "deepspeed", "mlflow", "sqlalchemy", "zarr", "numcodecs",
          "nibabel", "isal", "webdataset", "pydantic", "dynamic_network_architectures", "multitalent.cli",
          "multitalent.train.launch", "multitalent.convert.pipeline"]:
    mod = importlib.import_module(m)
    v = getattr(mod, "__version__", "")
    if v and "." not in m:
        versions.append(f"{m} {v}")
print(", ".join(versions), f"({time.perf_counter() - t:.1f} s)")
EOF

Z=${PATCH//,/, }
JOB=(
  jobs/pretrain.yaml
  --set catalog=phantom
  --set "shards.path=$W/shards"
  --set "architecture.arch=$ARCH" --set "architecture.size=$SIZE" --set "architecture.patch_zyx=[$Z]"
  --set schedule.epochs=1 --set schedule.iterations_per_epoch=100000
  --set batch.global_size=2
  --set workers.num_workers=1 --set "workers.use_gpu=$USE_GPU" --set "workers.resources_per_worker={CPU: $CPUS}"
  --set workers.max_failures=0
  --set checkpoint.every_iterations=100000
  --set validation.fold=null
  --set "data.loader_workers=$LOADERS"
  --set tracking.log_every=1
  --set "run.storage_path=$W/runs"
)
# Ray counts GPUs through NVML; should that fail in the VM while torch sees the GPU, the trainings use a
# Ray head started here with --num-gpus=1 (`multitalent train --address auto`) instead of a local Ray.
ADDRESS=()
head_start() {
  $PY -m ray.scripts.scripts start --head --num-gpus=1 --num-cpus="$(nproc)" --include-dashboard=false \
    --disable-usage-stats >/dev/null && ADDRESS=(--address auto)
}
if [ "$USE_GPU" = true ]; then
  NGPU=$($PY -c "from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as M
print(M.get_current_node_num_accelerators())" 2>/dev/null || echo 0)
  echo "Ray's NVML probe: $NGPU GPU(s)"
  if [ "$NGPU" = 0 ]; then echo "starting a Ray head with --num-gpus=1 for the trainings" && head_start; fi
fi
TRAIN=("${MT[@]}" train "${JOB[@]}")
after() { # stop Ray leftovers of an interrupted stage (and restart the head, if one is used); on the
  # device only: `ray stop` ends every Ray of the machine, and a CPU rehearsal may share its machine
  if [ "$DEVICE" = cuda ] && [ "$SECTION_RC" != 0 ] && [ "$SECTION_RC" != skipped ]; then
    $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
    if [ ${#ADDRESS[@]} -gt 0 ]; then head_start; fi
  fi
}

rm -rf "$W/runs" # a fresh run every time (the shards are kept)
section "convert the phantom collection" "${SHARES[0]}" "${MT[@]}" convert jobs/convert.yaml \
  --set "raw_root=$W/raw" --set "out=$W/shards" --set "synth.scale=$SCALE"
section "in-process loops (bare, platform step)" "${SHARES[1]}" "$PY" bench/gpu_stack.py bare \
  --device "$([ "$DEVICE" = cuda ] && echo cuda || echo cpu)" --catalog phantom --arch "$ARCH" --size "$SIZE" \
  --patch "$PATCH" --reps "$([ "$DEVICE" = cuda ] && echo 10 || echo 2)" --out "$RESULTS/bare.json" \
  --threads "$([ "$DEVICE" = cuda ] && echo 0 || echo "$CPUS")"
section "train ZeRO-1, $ITERS_Z1 iterations" "${SHARES[2]}" "${TRAIN[@]}" "${ADDRESS[@]}" \
  --set run.name=stack-z1 --set zero_stage=1 --set "schedule.stop_after_iterations=$ITERS_Z1"
after
section "resume ZeRO-1, $ITERS_RESUME more" "${SHARES[3]}" "${TRAIN[@]}" "${ADDRESS[@]}" \
  --set run.name=stack-z1 --set zero_stage=1 --set "schedule.stop_after_iterations=$((ITERS_Z1 + ITERS_RESUME))"
after
section "train ZeRO-3, $ITERS_Z3 iterations" "${SHARES[4]}" "${TRAIN[@]}" "${ADDRESS[@]}" \
  --set run.name=stack-z3 --set zero_stage=3 --set "schedule.stop_after_iterations=$ITERS_Z3"
after
if [ ${#ADDRESS[@]} -gt 0 ]; then $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true; fi
MIN_SECTION_S=5
END=$((T0 + BUDGET_S))
section "report" 30 "$PY" bench/gpu_stack.py report --storage "$W/runs" --runs stack-z1,stack-z3 \
  --bare "$RESULTS/bare.json" --warmup "$WARMUP" --out "$RESULTS/stack.json"
echo "bench/gpu_stack.sh: $(($(date +%s) - T0)) s of the ${BUDGET_S} s budget"
