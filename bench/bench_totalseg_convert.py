"""Converting one case at TotalSegmentator scale: 512 x 512 x 300 voxels and its 117 mask files.

Ours: ``rawio.load_case`` (reads ``ct.nii.gz`` and the 117 ``segmentations/*.nii.gz``, checks each mask
and merges them into one label map), ``preprocess_case`` and the Zarr write, as a conversion worker
runs them. Peer, side by side on the same files: the masks merged as TotalSegmentator's own dataset
conversion does (``combine_masks_to_multilabel_file``: ``nib.load(mask).get_fdata()``, then
``out[img > 0.5] = idx``), then nnU-Net v2's ``DefaultPreprocessor.run_case_npy`` (3d_fullres,
1.5 x 1 x 1 mm, CT normalisation) and its blosc2 write, as ``bench_preprocess.py`` runs it.

Each method runs in its own process (one BLAS thread, a fresh interpreter: the peak resident set is
that process's), alternating, ``--rounds`` times. The synthetic case is generated once into
``--case-dir`` (kept for later runs; ~2 min to write).

    .venv/bin/python bench/bench_totalseg_convert.py --rounds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE_XYZ = (512, 512, 300)
SPACING_XYZ = (0.8, 0.8, 1.5)
CASE_ID = "s0001"


def make_case(case_dir: Path, seed: int = 0) -> Path:
    """A TotalSegmentator-layout dataset of one case: CT-like int16 image, 117 ellipsoid structures
    (some overlapping, a few empty as in the real download), every mask file written."""
    from multitalent.catalog import load_catalog
    from multitalent.synth.writer import write_case

    dataset = load_catalog("totalsegmentator").datasets[0]
    if (case_dir / CASE_ID / "segmentations").is_dir() and (case_dir / "meta.csv").is_file():
        return case_dir
    rng = np.random.default_rng(seed)
    nx, ny, _ = SHAPE_XYZ
    image = rng.normal(40, 20, size=SHAPE_XYZ).astype(np.float32)
    x = np.arange(nx)[:, None, None]
    y = np.arange(ny)[None, :, None]
    body = ((x - nx / 2) / (0.42 * nx)) ** 2 + ((y - ny / 2) / (0.35 * ny)) ** 2 > 1
    image[np.broadcast_to(body, SHAPE_XYZ)] = -1000
    label = np.zeros(SHAPE_XYZ, np.uint8)
    values = sorted(dataset.labels)
    for value in values[:-4]:  # the last four stay empty
        r = rng.integers(4, 40, size=3)
        c = [rng.integers(r[i] + 1, SHAPE_XYZ[i] - r[i] - 1) for i in range(3)]
        box = tuple(slice(int(c[i] - r[i]), int(c[i] + r[i] + 1)) for i in range(3))
        g = np.ogrid[tuple(slice(-int(r[i]), int(r[i]) + 1) for i in range(3))]
        inside = sum((g[i] / r[i]) ** 2 for i in range(3)) <= 1
        label[box][inside] = value
        image[box][inside] = rng.integers(-100, 300)
    affine = np.diag([-SPACING_XYZ[0], -SPACING_XYZ[1], SPACING_XYZ[2], 1.0])
    write_case(case_dir, dataset, case_id=CASE_ID, image=image, label=label, affine=affine)
    return case_dir


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(case_dir: Path, out: Path) -> dict[str, Any]:
    from multitalent.catalog import load_catalog
    from multitalent.preprocess import Plan, preprocess_case
    from multitalent.rawio import discover_cases, load_case
    from multitalent.shards import write_case_zarr

    catalog = load_catalog("totalsegmentator")
    dataset = catalog.datasets[0]
    plan = Plan.for_catalog(catalog)
    (case,) = discover_cases(dataset, case_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    loaded = load_case(case, dataset)
    t1, c1 = time.perf_counter(), time.process_time()
    pre = preprocess_case(
        loaded.image, loaded.label, loaded.affine, plan=plan, dataset=dataset, seed_key=f"ts/{CASE_ID}"
    )
    t2 = time.perf_counter()
    write_case_zarr(out, pre, dataset_id=dataset.id, case_id=CASE_ID)
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "load_s": t1 - t0,
        "preprocess_s": t2 - t1,
        "write_s": t3 - t2,
        "total_s": t3 - t0,
        "load_cpu_s": c1 - c0,
        "total_cpu_s": c3 - c0,
    }


def _bench_preprocess() -> Any:
    spec = importlib.util.spec_from_file_location("bench_preprocess", REPO / "bench" / "bench_preprocess.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_peer(case_dir: Path, out: Path) -> dict[str, Any]:
    import nibabel as nib

    from multitalent.catalog import load_catalog
    from multitalent.preprocess import Plan

    catalog = load_catalog("totalsegmentator")
    names = [catalog.datasets[0].labels[v] for v in sorted(catalog.datasets[0].labels)]
    masks_dir = case_dir / CASE_ID / "segmentations"
    t0, c0 = time.perf_counter(), time.process_time()
    image = nib.load(case_dir / CASE_ID / "ct.nii.gz").get_fdata(dtype=np.float32)
    ref = nib.load(masks_dir / "liver.nii.gz")
    merged = np.zeros(ref.shape).astype(np.uint8)
    for idx, name in enumerate(names):  # TotalSegmentator's combine_masks_to_multilabel_file
        img = nib.load(masks_dir / f"{name}.nii.gz").get_fdata()
        merged[img > 0.5] = idx + 1
    t1, c1 = time.perf_counter(), time.process_time()
    bp = _bench_preprocess()
    bp.SHAPE_XYZ, bp.SPACING_XYZ = SHAPE_XYZ, SPACING_XYZ
    bp.LABELS = dict(enumerate(names, start=1))
    # nnU-Net's SimpleITK reader hands over (z, y, x) in LPS order; the affine here is already LPS-like
    image_zyx = np.ascontiguousarray(image.transpose(2, 1, 0))
    label_zyx = np.ascontiguousarray(merged.transpose(2, 1, 0))
    del image, merged
    r = bp.run_nnunet(image_zyx, label_zyx, Plan.for_catalog(catalog).normalization.to_dict(), out)
    return {
        "load_s": t1 - t0,
        "preprocess_s": r["preprocess_s"],
        "write_s": r["write_s"],
        "total_s": t1 - t0 + r["preprocess_s"] + r["write_s"],
        "load_cpu_s": c1 - c0,
        "total_cpu_s": time.process_time() - c0,
    }


def _child(method: str, case_dir: Path) -> None:
    from threadpoolctl import threadpool_limits

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, tempfile.mkdtemp())
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1, user_api="blas"):
        result = (run_ours if method == "ours" else run_peer)(case_dir, Path(tmp))
    result["peak_rss_mb"] = _rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_totalseg_case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["ours", "peer"], help="run one method")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.case_dir)
        return
    t = time.perf_counter()
    make_case(args.case_dir)
    print(f"case in {args.case_dir} ({time.perf_counter() - t:.0f} s to make or find)", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    methods = [args.only] if args.only else ["ours", "peer"]
    for i in range(args.rounds):
        for method in methods:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, "--case-dir", str(args.case_dir)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode or line is None:
                raise SystemExit(f"{method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            r = json.loads(line.removeprefix("RESULT "))
            runs[method].append(r)
            print(
                f"round {i + 1} {method:4s}: load {r['load_s']:6.1f} s  "
                f"preprocess {r['preprocess_s']:5.1f} s  write {r['write_s']:4.1f} s  "
                f"total {r['total_s']:6.1f} s ({r['total_cpu_s']:.1f} CPU-s, load {r['load_cpu_s']:.1f})  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    summary = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items() if rs}
    print()
    print(
        "| per case (median of rounds) | load + merge | preprocess | write | total | "
        "load + merge, CPU-s | total, CPU-s | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m, s in summary.items():
        name = "ours" if m == "ours" else "TotalSegmentator merge + nnU-Net v2"
        print(
            f"| {name} | {s['load_s']:.1f} s | {s['preprocess_s']:.1f} s | {s['write_s']:.1f} s | "
            f"{s['total_s']:.1f} s | {s['load_cpu_s']:.1f} | {s['total_cpu_s']:.1f} | "
            f"{s['peak_rss_mb'] / 1024:.2f} GB |"
        )
    if len(summary) == 2:
        wall = summary["peer"]["total_s"] / summary["ours"]["total_s"]
        cpu = summary["peer"]["total_cpu_s"] / summary["ours"]["total_cpu_s"]
        print(f"\nspeed-up: {wall:.1f}x wall, {cpu:.1f}x CPU time")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
