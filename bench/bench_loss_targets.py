"""The training objective's loss side, stage by stage: how its loss levers (issue 11, part 1) add up.

The trainer's ``MultiTalentObjective`` on deep-supervision logits of a ``--catalog`` batch (no network: the
logits of every level are given, in ``--dtype``, so only targets, deep supervision and the partial-label
loss are timed). Each stage adds one lever to the one before:

- ``before the levers``: every level's logits copied to float32 first, its dense (B, K, ...) targets built,
  and the voxel pass computing every (sample, class) row and masking the non-annotated ones
  (``upcast_logits=True``, ``dense_targets=True``, ``VISIT_ALL_ROWS``);
- ``+ annotated rows``: the voxel pass visits the annotated rows only;
- ``+ label targets``: no dense targets; the loss makes the annotated rows from the raw labels and the
  region table, chunk by chunk, with the annotated flags read once per batch;
- ``+ no upcast copy``: bf16 logits reach the loss as they are, which upcasts the rows it visits (the
  trainer's default; the same as the stage before for float32 logits).

Reported: median seconds of forward + backward per stage (interleaved round by round), the bytes the last
stage never allocates, and the agreement of loss and gradients with the first stage.

    .venv/bin/python bench/bench_loss_targets.py --patch 48,96,96 --rounds 5 [--dtype bfloat16]
    python3 bench/bench_loss_targets.py --device cuda --patch 96,192,192 --dtype bfloat16   # CUDA events
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchlib import interleaved, machine_line
from multitalent.catalog import load_preset
from multitalent.losses import voxel_sums
from multitalent.train.step import MultiTalentObjective, StepInputs

# stage -> (upcast_logits, dense_targets, visit every row)
STAGES = {
    "before the levers": (True, True, True),
    "+ annotated rows": (True, True, False),
    "+ label targets": (True, False, False),
    "+ no upcast copy": (False, False, False),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default="multitalent13")
    parser.add_argument("--patch", default="48,96,96")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--levels", type=int, default=5, help="deep-supervision levels (the paper's U-Net: 5)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the logits")
    parser.add_argument("--datasets", default="", help="dataset ids, e.g. 07,07 (default: drawn)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = tuple(int(s) for s in args.patch.split(","))
    catalog = load_preset(args.catalog)
    rng = np.random.default_rng(args.seed)
    datasets = rng.integers(0, len(catalog.datasets), size=args.batch)
    if args.datasets:
        datasets = np.array([catalog.dataset_index(d) for d in args.datasets.split(",")])
    idx = torch.from_numpy(datasets).to(device)
    annotated = torch.as_tensor(catalog.annotated_mask(), device=device)[idx]
    lut = torch.as_tensor(catalog.region_lut())
    g = torch.Generator().manual_seed(args.seed)
    label = torch.stack(
        [torch.randint(0, int(lut[d].any(-1).nonzero().max()) + 1, patch, generator=g) for d in datasets]
    ).to(device, torch.uint8)
    k = catalog.num_classes
    shapes = [tuple(max(1, s // 2**i) for s in patch) for i in range(args.levels)]
    dtype = getattr(torch, args.dtype)
    logits = [torch.randn((args.batch, k, *s), generator=g).to(device, dtype) for s in shapes]
    inputs = StepInputs(torch.zeros(args.batch, 1, *patch, device=device), label, idx, annotated)
    objectives = {
        name: MultiTalentObjective(catalog, n_levels=args.levels, upcast_logits=up, dense_targets=dense)
        for name, (up, dense, _) in STAGES.items()
    }

    def run(name: str) -> tuple[float, tuple[torch.Tensor, list[torch.Tensor]]]:
        leaves = [x.clone().requires_grad_(True) for x in logits]
        objective = objectives[name].to(device)
        voxel_sums.VISIT_ALL_ROWS = STAGES[name][2]
        try:
            seconds = _timed(lambda: _forward_backward(objective, leaves, inputs), device)
        finally:
            voxel_sums.VISIT_ALL_ROWS = False
        fresh = [x.detach().clone().requires_grad_(True) for x in logits]
        return seconds, _forward_backward(objective, fresh, inputs)

    times, results = interleaved(run, list(STAGES), args.rounds)
    l0, g0 = results["before the levers"]
    voxels = args.batch * k * sum(int(np.prod(s)) for s in shapes)
    dense_bytes = voxels + (4 * voxels if dtype != torch.float32 else 0)  # bool targets, float32 copy
    share = float(annotated.float().mean())
    names = [catalog.dataset_ids[int(d)] for d in datasets]
    print(machine_line(device))
    print(
        f"batch {args.batch} from {', '.join(names)}; {k} heads of {args.catalog}; patch {patch}, "
        f"{args.levels} levels, {args.dtype} logits; {share:.0%} of the (sample, class) rows annotated; "
        f"{args.threads} thread(s), {args.rounds} rounds\n"
    )
    unit = "CPU s" if device.type == "cpu" else "GPU ms"
    print(f"| loss side | {unit} per forward + backward (median) | ÷ last | loss, gradient vs first |")
    print("|---|---|---|---|")
    last = statistics.median(times[list(STAGES)[-1]])
    for name in STAGES:
        loss, grads = results[name]
        rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads, g0))
        agree = f"{float(loss - l0):+.1e}, rel. {rel:.1e}"
        med = statistics.median(times[name])
        print(f"| {name} | {med * (1 if device.type == 'cpu' else 1e3):.3f} | {med / last:.2f}x | {agree} |")
    what = "dense bool targets" + (" and the float32 copy of the logits" if dtype != torch.float32 else "")
    print(f"\nnot allocated by the last stage: {what}, {dense_bytes / 2**20:.0f} MiB over all levels")


def _forward_backward(
    objective: MultiTalentObjective, leaves: list[torch.Tensor], inputs: StepInputs
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss, _ = objective(lambda _image: leaves, inputs)  # type: ignore[arg-type]
    loss.backward()
    return loss.detach(), [x.grad for x in leaves if x.grad is not None]


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.process_time()
    fn()
    return time.process_time() - begin


if __name__ == "__main__":
    main()
