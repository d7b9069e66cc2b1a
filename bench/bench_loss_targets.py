"""The training objective's loss side, three ways: how its two loss levers (issue 11, part 1) add up.

The trainer's ``MultiTalentObjective`` on deep-supervision logits of a ``--catalog`` batch (no network: the
logits of every level are given, so only targets, deep supervision and the partial-label loss are timed):

- ``before both``: every level's dense (B, K, ...) targets built first, and the voxel pass computing every
  (sample, class) row and masking the non-annotated ones (``dense_targets=True`` + ``VISIT_ALL_ROWS``);
- ``annotated rows``: dense targets, voxel pass over the annotated rows only (the code before this bench);
- ``label targets``: no dense targets; the loss makes the annotated rows from the raw labels and the
  region table, chunk by chunk, with the annotated flags read once per batch (the trainer's default).

Reported: median CPU seconds of forward + backward per variant (interleaved round by round), the bytes of
the dense targets the last variant never builds, and the agreement of loss and gradients with the first.

    .venv/bin/python bench/bench_loss_targets.py --patch 48,96,96 --rounds 5
    python3 bench/bench_loss_targets.py --device cuda --patch 96,192,192     # on a GPU: CUDA events
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

VARIANTS = ("before both", "annotated rows", "label targets")


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
    logits = [torch.randn((args.batch, k, *s), generator=g).to(device) for s in shapes]
    inputs = StepInputs(torch.zeros(args.batch, 1, *patch, device=device), label, idx, annotated)
    objectives = {
        "before both": MultiTalentObjective(catalog, n_levels=args.levels, dense_targets=True),
        "annotated rows": MultiTalentObjective(catalog, n_levels=args.levels, dense_targets=True),
        "label targets": MultiTalentObjective(catalog, n_levels=args.levels),
    }

    def run(name: str) -> tuple[float, tuple[torch.Tensor, list[torch.Tensor]]]:
        leaves = [x.clone().requires_grad_(True) for x in logits]
        objective = objectives[name].to(device)
        voxel_sums.VISIT_ALL_ROWS = name == "before both"
        try:
            seconds = _timed(lambda: _forward_backward(objective, leaves, inputs), device)
        finally:
            voxel_sums.VISIT_ALL_ROWS = False
        fresh = [x.detach().clone().requires_grad_(True) for x in logits]
        return seconds, _forward_backward(objective, fresh, inputs)

    times, results = interleaved(run, VARIANTS, args.rounds)
    l0, g0 = results["before both"]
    dense_bytes = args.batch * k * sum(int(np.prod(s)) for s in shapes)
    share = float(annotated.float().mean())
    names = [catalog.dataset_ids[int(d)] for d in datasets]
    print(machine_line(device))
    print(
        f"batch {args.batch} from {', '.join(names)}; {k} heads of {args.catalog}; patch {patch}, "
        f"{args.levels} levels; {share:.0%} of the (sample, class) rows annotated; {args.threads} "
        f"thread(s), {args.rounds} rounds\n"
    )
    unit = "CPU s" if device.type == "cpu" else "GPU ms"
    print(
        f"| loss side | {unit} per forward + backward (median) | ÷ label targets | loss, gradient vs first |"
    )
    print("|---|---|---|---|")
    last = statistics.median(times["label targets"])
    for name in VARIANTS:
        loss, grads = results[name]
        rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads, g0))
        agree = f"{float(loss - l0):+.1e}, rel. {rel:.1e}"
        med = statistics.median(times[name])
        print(f"| {name} | {med * (1 if device.type == 'cpu' else 1e3):.3f} | {med / last:.2f}x | {agree} |")
    print(f"\ndense targets not built by 'label targets': {dense_bytes / 2**20:.0f} MiB (bool, all levels)")


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
