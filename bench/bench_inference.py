"""Inference benchmarks (CPU): sliding window vs MONAI, one multi-head model vs K single-dataset models,
and the export of 164 classes vs nnU-Net v2's ``export_prediction_from_logits``.

1. ``sliding``: our ``sliding_window`` against MONAI ``sliding_window_inference`` with the same network
   (the tiny U-Net, deep supervision off), patch, overlap 0.5, Gaussian sigma 1/8 and window batch, on a
   volume needing many windows; no mirroring. Also the largest difference of the logits.
2. ``heads``: one network with the heads of all K phantom datasets against K networks of the same
   architecture with one dataset's heads each, end to end per scan (preprocess, 8-way mirrored sliding
   window, export of label maps to NIfTI), untrained weights (speed only).
3. ``export``: 164 sigmoid classes (13 datasets) on a 112 x 160 x 160 preprocessed grid, each class a blob,
   back to a 0.8 x 0.8 x 2.5 mm input grid: ours (class by class inside each class's box, one label map per
   dataset) against nnU-Net v2 (region-based label manager, 164 regions, resampling every class channel
   with its default ``resample_data_or_seg_to_shape``). Seconds and peak traced memory (tracemalloc sees
   numpy's and torch-CPU-free allocations; torch's own CPU allocator is not traced, so nnU-Net's peak is
   a lower bound).

    PYTHONPATH=platform .venv/bin/python bench/bench_inference.py [--only sliding,heads,export]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _time(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median CPU seconds of this process (the 2 shared cores make wall time noise) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


# ---------------------------------------------------------------------------------------- sliding
def bench_sliding(repeats: int) -> dict[str, Any]:
    from monai.inferers import sliding_window_inference

    from multitalent.inference.sliding_window import SlidingWindowSettings, sliding_window
    from multitalent.models import build_network

    patch = (32, 64, 64)
    torch.manual_seed(0)
    unet = build_network("unet", [5, 5], size="tiny", deep_supervision=False, patch_size_zyx=patch).eval()
    # a pointwise net isolates the stitching, the part the two implementations differ in
    pointwise = torch.nn.Conv3d(1, 10, 1).eval()
    # sizes where both window rules place the same windows: p + m * p / 2
    x = torch.randn(1, 32 + 4 * 16, 64 + 3 * 32, 64 + 3 * 32)
    settings = SlidingWindowSettings(patch_zyx=patch, batch_size=2)
    row: dict[str, Any] = {"volume_zyx": list(x.shape[1:]), "patch_zyx": list(patch), "windows": 5 * 4 * 4}
    for name, net in (("tiny_unet", unet), ("pointwise_net", pointwise)):

        def ours(net: Any = net) -> torch.Tensor:
            return sliding_window(net, x, settings)

        def monai(net: Any = net) -> torch.Tensor:
            with torch.inference_mode():
                return sliding_window_inference(
                    x[None], patch, 2, net, overlap=0.5, mode="gaussian", sigma_scale=0.125
                )[0]

        ours(), monai()  # warm-up
        t_ours, t_monai = [], []
        for _ in range(repeats):  # interleaved, so both see the same load
            t, y_ours = _time(ours, 1)
            t_ours.append(t)
            t, y_monai = _time(monai, 1)
            t_monai.append(t)
        row[name] = {
            "ours_cpu_s": round(statistics.median(t_ours), 3),
            "monai_cpu_s": round(statistics.median(t_monai), 3),
            "speedup": round(statistics.median(t_monai) / statistics.median(t_ours), 3),
            "max_abs_diff": float((y_ours - y_monai).abs().max()),
        }
    return row


# ------------------------------------------------------------------------------------------ heads
def bench_heads(repeats: int) -> dict[str, Any]:
    import nibabel as nib

    from multitalent.catalog import load_catalog
    from multitalent.inference.model import LoadedModel, ModelFiles
    from multitalent.inference.predictor import Predictor, PredictSettings
    from multitalent.models import build_network
    from multitalent.preprocess import Plan

    catalog = load_catalog("phantom")
    plan = Plan.for_catalog(catalog)
    patch = [32, 48, 48]
    rng = np.random.default_rng(0)
    shape = (96, 96, 48)  # x y z at 1 x 1 x 2 mm
    image = np.full(shape, -1000, np.int16)
    image[8:-8, 8:-8, 2:-2] = rng.normal(40, 40, (80, 80, 44)).astype(np.int16)
    tmp = Path(tempfile.mkdtemp())
    scan = tmp / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.0, 1.0, 2.0, 1.0])), scan)  # written once, read per run
    settings = PredictSettings(device="cpu", batch_size=2)

    def predictor(heads: list[int], cat: Any) -> Predictor:
        torch.manual_seed(0)
        net = build_network("unet", heads, size="tiny", deep_supervision=False, patch_size_zyx=patch)
        files = ModelFiles(Path("-"), {"patch_size_zyx": patch}, Plan.for_catalog(cat), cat)
        return Predictor(LoadedModel(net.eval(), files), settings)

    multi = predictor(list(catalog.classes_per_dataset()), catalog)
    singles = [predictor([len(d.classes)], catalog.subset([d.id])) for d in catalog.datasets]
    assert plan.target_spacing_zyx_mm == singles[0].model.plan.target_spacing_zyx_mm

    def run_multi() -> None:
        multi.predict_file(scan, tmp / "multi", classes=list(catalog.classes))

    def run_singles() -> None:
        for p in singles:
            p.predict_file(scan, tmp / "single", classes=list(p.catalog.classes))

    run_multi()
    t_multi, _ = _time(run_multi, repeats)
    t_single, _ = _time(run_singles, repeats)
    k = len(singles)
    return {
        "datasets_K": k,
        "classes": catalog.num_classes,
        "scan_xyz": list(shape),
        "multi_head_s": round(t_multi, 2),
        "k_single_models_s": round(t_single, 2),
        "speedup": round(t_single / t_multi, 2),
        "target": f">= {0.8 * k:.1f}",
    }


# ----------------------------------------------------------------------------------------- export
def _export_case(n_classes: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Logits (K, z, y, x) on the preprocessed grid with one blob per class, the geometry record of an
    input of 200 x 200 x 67 voxels at 0.8 x 0.8 x 2.5 mm (x y z), and the input's affine."""
    from multitalent.catalog import Catalog
    from multitalent.preprocess import Plan, preprocess_image

    rng = np.random.default_rng(seed)
    shape_xyz, spacing_xyz = (200, 200, 67), (0.8, 0.8, 2.5)
    affine = np.diag([*spacing_xyz, 1.0])
    image = np.full(shape_xyz, 0, np.int16)  # all body: no crop
    plan = Plan.for_catalog(Catalog("none", ()), target_spacing_zyx_mm=(1.5, 1.0, 1.0))
    _, _, geometry = preprocess_image(image, affine, plan=plan)
    after = geometry["shape_after_resample_zyx"]
    logits = np.full((n_classes, *after), -8.0, np.float32)
    zz, yy, xx = np.ogrid[: after[0], : after[1], : after[2]]
    for k in range(n_classes):
        r = rng.uniform(4, 18, 3)
        c = [rng.uniform(r[i], after[i] - r[i]) for i in range(3)]
        inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
        logits[k][inside] = 8.0
    return logits, geometry, affine


def bench_export() -> dict[str, Any]:
    import nibabel as nib

    from multitalent.inference.export import InverseGeometry, restore_label_map
    from multitalent.inference.predictor import write_like

    n = 164
    logits, geometry, affine = _export_case(n)
    tmp = Path(tempfile.mkdtemp())
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), affine).header
    header.set_data_shape(geometry["original_shape"])
    datasets = np.array_split(np.arange(n), 13)
    probs = torch.sigmoid(torch.from_numpy(logits))  # what the sliding window hands over
    del logits

    def ours() -> None:
        g = InverseGeometry.from_record(geometry)
        for i, channels in enumerate(datasets):
            values = [(j + 1,) for j in range(len(channels))]
            label = restore_label_map(probs[channels], values, g).label
            write_like(label, header, tmp / f"ours_{i}.nii.gz")

    tracemalloc.start()
    t0 = time.process_time()
    ours()
    t_ours = time.process_time() - t0
    peak_ours = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row: dict[str, Any] = {
        "classes": n,
        "preprocessed_zyx": geometry["shape_after_resample_zyx"],
        "input_xyz": geometry["original_shape"],
        "input_probs_gb_fp32": round(probs.numel() * 4 / 1e9, 2),
        "ours_s": round(t_ours, 2),
        "ours_peak_traced_gb": round(peak_ours / 1e9, 3),
    }
    try:
        t_nn, peak_nn = _nnunet_export(n, geometry, affine, tmp)
        row.update({"nnunet_s": round(t_nn, 2), "nnunet_peak_traced_gb": round(peak_nn / 1e9, 3)})
    except Exception as e:  # the peer is optional (bench extra)
        row["nnunet_error"] = f"{type(e).__name__}: {e}"
    return row


def _nnunet_export(n: int, geometry: dict[str, Any], affine: np.ndarray, tmp: Path) -> tuple[float, int]:
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    after = geometry["shape_after_resample_zyx"]
    plans = {
        "dataset_name": "Dataset999_Bench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 0.8, 0.8],
        "original_median_shape_after_transp": [67, 200, 200],
        "image_reader_writer": "NibabelIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {
            "3d_fullres": {
                "data_identifier": "x",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [96, 160, 160],
                "median_image_size_in_voxels": after,
                "spacing": [1.5, 1.0, 1.0],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []},
                "batch_dice": True,
            }
        },
    }
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    # region-based (sigmoid) label manager: nnU-Net needs one region of more than one label to take that path
    labels: dict[str, Any] = {"background": 0, "c1": [1, 2], **{f"c{k}": [k] for k in range(2, n + 1)}}
    dataset_json = {"labels": labels, "regions_class_order": list(range(1, n + 1)), "file_ending": ".nii.gz"}
    # nnU-Net's geometry is (z, y, x) after its own transpose; NibabelIO stores x y z (transposes itself)
    props = {
        "spacing": [2.5, 0.8, 0.8],
        "shape_before_cropping": [67, 200, 200],
        "shape_after_cropping_and_before_resampling": [67, 200, 200],
        "bbox_used_for_cropping": [[0, 67], [0, 200], [0, 200]],
        "nibabel_stuff": {"original_affine": affine},
    }
    logits, _, _ = _export_case(n)
    tracemalloc.start()
    t0 = time.process_time()
    export_prediction_from_logits(
        torch.from_numpy(logits), props, cm, pm, dataset_json, str(tmp / "nnunet"), num_threads_torch=1
    )
    t = time.process_time() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return t, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="sliding,heads,export")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for name in args.only.split(","):
        benches = {"sliding": lambda: bench_sliding(args.repeats), "heads": lambda: bench_heads(1)}
        results[name] = benches.get(name, bench_export)()
        print(json.dumps({name: results[name]}), flush=True)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
