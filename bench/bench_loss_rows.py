"""The partial-label loss's voxel pass, before and after skipping the non-annotated (sample, class) rows.

Both run in this process on the same logits: "before" is ``losses/voxel_sums.py`` as of ``--before``
(read with ``git show``; it computed every row and then zeroed the non-annotated ones), "after" is the
working tree's. The batch: ``--batch`` samples, each from a dataset of the ``--catalog`` preset drawn at
random (seeded), the logits of all the catalog's heads at ``--patch``; forward and backward of
``PartialLabelLoss`` (batch Dice, mean). Reported: median CPU seconds per call (``time.process_time``),
interleaved round by round, and the loss/gradient agreement.

    .venv/bin/python bench/bench_loss_rows.py --patch 48,96,96 --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import multitalent.losses.partial_label as partial_label
from benchlib import interleaved, machine_line
from multitalent.catalog import load_preset
from multitalent.losses import PartialLabelLoss

REPO = Path(__file__).resolve().parents[1]

FORMER = "d305b7b"  # the last commit that computed every row


def former_voxel_sums(rev: str):
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:platform/multitalent/losses/voxel_sums.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "voxel_sums_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("voxel_sums_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.voxel_sums


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default="multitalent13")
    parser.add_argument("--patch", default="48,96,96")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", default=FORMER)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = tuple(int(s) for s in args.patch.split(","))
    catalog = load_preset(args.catalog)
    rng = np.random.default_rng(args.seed)
    datasets = rng.integers(0, len(catalog.dataset_ids), size=args.batch)
    annotated = torch.from_numpy(np.asarray(catalog.annotated_mask())[datasets])
    k = annotated.shape[1]
    g = torch.Generator().manual_seed(args.seed)
    logits = torch.randn((args.batch, k, *patch), generator=g)
    target = torch.rand((args.batch, k, *patch), generator=g) < 0.1
    loss_fn = PartialLabelLoss()
    impls = {"before": former_voxel_sums(args.before), "after": partial_label.voxel_sums}

    def run(name: str) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
        partial_label.voxel_sums = impls[name]
        x = logits.clone().requires_grad_(True)
        start = time.process_time()
        loss, _ = loss_fn(x, target, annotated)
        loss.backward()
        assert x.grad is not None
        return time.process_time() - start, (loss.detach(), x.grad)

    times, results = interleaved(run, list(impls), args.rounds)
    partial_label.voxel_sums = impls["after"]
    (l0, g0), (l1, g1) = results["before"], results["after"]
    rel = float((g1 - g0).norm() / g0.norm().clamp_min(1e-30))
    share = float(annotated.float().mean())
    names = [catalog.dataset_ids[int(d)] for d in datasets]
    print(machine_line())
    print(
        f"batch {args.batch} from {', '.join(names)}; {k} heads of {args.catalog}; patch {patch}; "
        f"{share:.0%} of the (sample, class) rows annotated; {args.threads} thread(s), {args.rounds} rounds\n"
    )
    print("| voxel pass | CPU s per forward + backward (median) |\n|---|---|")
    for name in impls:
        label = f"before ({args.before}: every row)" if name == "before" else "after (annotated rows only)"
        print(f"| {label} | {statistics.median(times[name]):.3f} |")
    speedup = statistics.median(times["before"]) / statistics.median(times["after"])
    agree = f"loss before {float(l0):.6f} after {float(l1):.6f}; gradient rel. diff {rel:.1e}"
    print(f"\nspeed-up {speedup:.2f}x; {agree}")


if __name__ == "__main__":
    main()
