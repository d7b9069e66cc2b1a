"""Peak resident memory of ``Predictor.predict_file`` on a CT-sized scan, for 47 and for 164 classes.

A 512 x 512 x 300 int16 CT at 0.8 x 0.8 x 1.5 mm (x, y, z) goes the whole way: read, preprocessing to
the plan's 1.5 x 1 x 1 mm (300 x 410 x 410 voxels), the sliding window with the paper's 96 x 192 x 192
patch, and the export of one label map per dataset to NIfTI. Each class count runs in a fresh process
(``ru_maxrss`` is per process).

The network is an oracle, not a U-Net: it returns, for each window, +10 logits inside class ``k``'s
ellipsoid and -10 elsewhere, from a label field drawn on the preprocessed grid. It costs nothing to
run, so the figures are the memory and time of everything around the network (a real network adds its
own activations: see docs/benchmarks.md's GPU section). Each class is an ellipsoid of about
``--organ-fraction`` of the volume (a trained model's classes are ~0 outside their structure, which is
what the store keeps), spread over a grid. No mirroring (it changes time, not memory).

    PYTHONPATH=platform .venv/bin/python bench/bench_predict_memory.py [--classes 47 164]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CATALOGS = {47: "multitalent13", 164: "multitalent13+totalsegmentator"}


def _label_field(shape: tuple[int, int, int], k: int, fraction: float, seed: int = 0) -> np.ndarray:
    """``uint8``/``uint16`` labels 1..k: one ellipsoid each of ~``fraction`` of the volume, centres on a
    jittered grid (overlaps: the later class wins)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    n = int(np.ceil(k ** (1 / 3)))
    grid = [np.linspace(0.15, 0.85, n) * s for s in shape]
    radius = [(fraction * 3 / (4 * np.pi)) ** (1 / 3) * s for s in shape]
    for c in range(k):
        i, j, m = np.unravel_index(c, (n, n, n))
        centre = [grid[0][i], grid[1][j], grid[2][m]]
        centre = [c0 + rng.normal(0, 0.02 * s) for c0, s in zip(centre, shape)]
        lo = [max(int(c0 - r) - 1, 0) for c0, r in zip(centre, radius)]
        hi = [min(int(c0 + r) + 2, s) for c0, r, s in zip(centre, radius, shape)]
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = ((zz - centre[0]) / radius[0]) ** 2 + ((yy - centre[1]) / radius[1]) ** 2 + (
            (xx - centre[2]) / radius[2]
        ) ** 2 <= 1
        labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][inside] = c + 1
    return labels


def one(k: int, args: argparse.Namespace) -> dict[str, Any]:
    import nibabel as nib
    import torch

    from multitalent.catalog import load_catalog
    from multitalent.inference.model import LoadedModel, ModelFiles
    from multitalent.inference.predictor import Predictor, PredictSettings
    from multitalent.inference.sliding_window import padding_for, window_slices
    from multitalent.preprocess import Plan, preprocess_image

    torch.set_num_threads(1)
    catalog = load_catalog(CATALOGS[k])
    assert catalog.num_classes == k, (CATALOGS[k], catalog.num_classes)
    plan = Plan.for_catalog(catalog)
    patch = tuple(args.patch)
    x, y, z = args.shape
    rng = np.random.default_rng(0)
    image = np.full((x, y, z), -1000, np.int16)
    image[24:-24, 40:-40, :] = rng.normal(40, 60, (x - 48, y - 80, z)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    tmp = Path(tempfile.mkdtemp(prefix="predict-memory-"))
    scan = tmp / "ct.nii"  # uncompressed: the bench measures prediction, not gzip
    nib.save(nib.Nifti1Image(image, affine), scan)
    pre, _, _ = preprocess_image(image.astype(np.float32), affine, plan=plan, name="ct")
    del image
    shape = tuple(int(s) for s in pre.shape)
    del pre
    labels = torch.from_numpy(_label_field(shape, k, args.organ_fraction).astype(np.int64))
    pads = padding_for(shape, patch)
    labels = torch.nn.functional.pad(labels, [v for a, b in reversed(pads) for v in (a, b)])
    windows = iter(window_slices(tuple(labels.shape), patch, 0.5))

    class Oracle(torch.nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            out = torch.full((xb.shape[0], k, *patch), -10.0)
            for b in range(xb.shape[0]):
                lab = labels[next(windows)]
                out[b].scatter_(0, (lab.clamp(min=1) - 1)[None], torch.where(lab > 0, 10.0, -10.0)[None])
            return out

    files = ModelFiles(Path("-"), {"patch_size_zyx": list(patch)}, plan, catalog)
    predictor = Predictor(
        LoadedModel(Oracle(), files), PredictSettings(device="cpu", batch_size=1, mirror_axes=())
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t0, c0 = time.perf_counter(), time.process_time()
    record = predictor.predict_file(scan, tmp / "out", classes=list(catalog.classes))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    found = sum(len(v) for v in record["classes_found"].values())
    return {
        "classes": k,
        "catalog": CATALOGS[k],
        "input_xyz": [x, y, z],
        "preprocessed_zyx": list(shape),
        "patch_zyx": list(patch),
        "windows": len(window_slices(tuple(labels.shape), patch, 0.5)),
        "classes_found": found,
        "peak_rss_gb_before_predict": round(rss_before, 2),
        "peak_rss_gb": round(peak, 2),
        "seconds_wall": round(wall, 1),
        "seconds_cpu": round(cpu, 1),
        "seconds_export": round(record["seconds"] - record["seconds_network"], 1),
        "dense_float32_gb": round(k * np.prod(shape) * 4 / 1024**3, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[47, 164], choices=sorted(CATALOGS))
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], help="x y z voxels")
    parser.add_argument("--patch", type=int, nargs=3, default=[96, 192, 192], help="z y x")
    parser.add_argument("--organ-fraction", type=float, default=0.01, help="volume share of each class")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = []
    for k in args.classes:
        print(f"[{k} classes] running in a fresh process ...", flush=True)
        cmd = [sys.executable, __file__, "--one", str(k), "--shape", *map(str, args.shape)]
        cmd += ["--patch", *map(str, args.patch), "--organ-fraction", str(args.organ_fraction)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    head = [
        "classes",
        "preprocessed z y x",
        "windows",
        "peak RSS",
        "before predict",
        "dense float32",
        "wall s",
    ]
    print("\n| " + " | ".join([*head, "export s"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['classes']} | {r['preprocessed_zyx']} | {r['windows']} | {r['peak_rss_gb']} GB | "
            f"{r['peak_rss_gb_before_predict']} GB | {r['dense_float32_gb']} GB | {r['seconds_wall']} | "
            f"{r['seconds_export']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
