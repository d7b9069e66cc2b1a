"""Per-case preprocessing: ``multitalent.preprocess`` against nnU-Net v2's ``DefaultPreprocessor``.

One synthetic, CT-like case (512 x 512 x 200 voxels at 0.8 x 0.8 x 2.5 mm, x y z; body with noise,
lungs, spine, table and five labelled organs) is preprocessed to 1.5 x 1 x 1 mm (z y x) by both,
and written to disk in each one's format:

* ours: ``preprocess_case`` (reorient, body crop, resample, int16 HU, fg locations), written to Zarr
  v3 (image int16, label uint8, fg_locations int32; blosc zstd 5 + byte shuffle);
* nnU-Net v2: ``DefaultPreprocessor.run_case_npy`` (3d_fullres, spacing [1.5, 1, 1], CTNormalization)
  and ``nnUNetDatasetBlosc2.save_case`` as ``run_case_save`` does (float32 data, int16 seg, .pkl).

Both start from the image and label in memory (file reading excluded) and run in this process with
BLAS limited to one thread (a conversion worker handles one case per core). Reported: seconds per
case (best and median of the repeats), bytes on disk, and how far our resampled image is from
nnU-Net's on the same (uncropped) grid, in HU.

    .venv/bin/python bench/bench_preprocess.py [--repeats 3] [--nnunet-repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPE_XYZ = (512, 512, 200)
SPACING_XYZ = (0.8, 0.8, 2.5)
TARGET_ZYX = (1.5, 1.0, 1.0)
LABELS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney", 5: "aorta"}


# ------------------------------------------------------------------------------ synthetic case
def make_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CT-like image (float32 HU, Fortran order like nibabel), its label map and affine.

    Stored as a typical DICOM-derived NIfTI: voxel axes (i, j, k) = (x, y, z) with x and y flipped
    (LPS-like affine), so reorientation does real work.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = SHAPE_XYZ
    sx, sy, sz = SPACING_XYZ
    image_zyx = np.empty((nz, ny, nx), dtype=np.float32)
    label_zyx = np.zeros((nz, ny, nx), dtype=np.uint8)
    y_mm = (np.arange(ny) - ny / 2 + 0.5)[:, None] * sy
    x_mm = (np.arange(nx) - nx / 2 + 0.5)[None, :] * sx

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((y_mm - cy) / ry) ** 2 + ((x_mm - cx) / rx) ** 2 < 1

    body_a = ellipse(0, 0, 115, 165)
    table = (np.abs(y_mm - 135) < 6) & (np.abs(x_mm) < 200)
    for z in range(nz):
        zf = z / (nz - 1)  # 0 = feet, 1 = head
        s = image_zyx[z]
        s[:] = -1000
        body = ellipse(0, 0, 115 - 15 * zf, 165 - 20 * zf) & body_a
        s[body] = 40
        s[body & (np.abs(x_mm) > 150 - 15 * zf)] = -100  # subcutaneous fat
        s[table] = 250
        if zf > 0.65:  # lungs
            s[ellipse(-10, -75, 70, 55)] = -850
            s[ellipse(-10, 75, 70, 55)] = -850
        s[ellipse(70, 0, 18, 18)] = 700  # vertebra
        s[ellipse(70, 0, 8, 8)] = 300
        lab = label_zyx[z]
        organs: list[tuple[int, float, float, float, float, float, float, float]] = [
            # value, z-centre (fraction), z half-extent, cy, cx, ry, rx (mm); HU
            (1, 0.55, 0.18, -10, -60, 75, 80, 60),
            (2, 0.55, 0.10, 10, 95, 40, 35, 50),
            (3, 0.40, 0.09, 40, -60, 35, 25, 150),
            (4, 0.42, 0.09, 40, 60, 35, 25, 150),
            (5, 0.50, 0.45, 45, 20, 12, 12, 180),
        ]
        for value, zc, zr, cy, cx, ry, rx, hu in organs:
            t = 1 - ((zf - zc) / zr) ** 2
            if t > 0:
                m = ellipse(cy, cx, ry * np.sqrt(t), rx * np.sqrt(t)) & body
                s[m] = hu
                lab[m] = value
        s += rng.normal(0, 15, size=s.shape).astype(np.float32)
    np.rint(image_zyx, out=image_zyx)
    # stored (i, j, k) = (x, y, z), x and y flipped, Fortran order (what nibabel returns)
    image_ijk = image_zyx.transpose(2, 1, 0)[::-1, ::-1, :]
    label_ijk = label_zyx.transpose(2, 1, 0)[::-1, ::-1, :]
    image_ijk = np.asfortranarray(image_ijk)
    label_ijk = np.asfortranarray(label_ijk)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * nz / 2]
    return image_ijk, label_ijk, affine


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ ours
def run_ours(image: np.ndarray, label: np.ndarray, affine: np.ndarray, out: Path) -> dict[str, Any]:
    from multitalent.catalog import Catalog, DatasetSpec
    from multitalent.preprocess import Plan, preprocess_case
    from multitalent.shards import write_case_zarr

    dataset = DatasetSpec.from_dict(
        {"id": "bench", "layout": "nnunet_v2", "labels": {str(k): v for k, v in LABELS.items()}}
    )
    plan = Plan.for_catalog(Catalog("bench", (dataset,)), target_spacing_zyx_mm=TARGET_ZYX)
    t0 = time.perf_counter()
    case = preprocess_case(image, label, affine, plan=plan, dataset=dataset, seed_key="bench/case_0000")
    t1 = time.perf_counter()
    # The converter's own writer and layout (multitalent.shards.DEFAULT_LAYOUT), so the bytes are what a
    # conversion stores.
    record = write_case_zarr(out, case, dataset_id="bench", case_id="case_0000")
    store = out / record.zarr_path
    t2 = time.perf_counter()
    return {
        "case": case,
        "plan": plan,
        "preprocess_s": t1 - t0,
        "write_s": t2 - t1,
        "bytes": dir_bytes(store),
    }


# ----------------------------------------------------------------------------------- nnU-Net
def nnunet_plans(plan_norm: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    lo, hi = plan_norm["clip"]
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [96, 192, 192],
        "median_image_size_in_voxels": [333, 410, 410],
        "spacing": list(TARGET_ZYX),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {},
            "_kw_requires_import": [],
        },
        "batch_dice": True,
    }
    plans = {
        "dataset_name": "Dataset999_Bench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]],
        "original_median_shape_after_transp": [SHAPE_XYZ[2], SHAPE_XYZ[1], SHAPE_XYZ[0]],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "mean": plan_norm["mean"],
                "std": plan_norm["std"],
                "percentile_00_5": lo,
                "percentile_99_5": hi,
                "median": plan_norm["mean"],
                "min": lo,
                "max": hi,
            }
        },
    }
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: v for v, name in LABELS.items()}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    return plans, dataset_json


def run_nnunet(
    image_zyx: np.ndarray, label_zyx: np.ndarray, plan_norm: dict[str, Any], out: Path
) -> dict[str, Any]:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json = nnunet_plans(plan_norm)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    pre = DefaultPreprocessor(verbose=False)
    properties = {"spacing": [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]]}
    t0 = time.perf_counter()
    # what SimpleITKIO hands over: (c, z, y, x) float32 image and seg
    data, seg, props = pre.run_case_npy(
        image_zyx[None].astype(np.float32),
        label_zyx[None].astype(np.float32),
        properties,
        pm,
        cm,
        dataset_json,
    )
    t1 = time.perf_counter()
    # as DefaultPreprocessor.run_case_save
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    bs_d, cs_d = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    bs_s, cs_s = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    stem = str(out / "case_0000")
    nnUNetDatasetBlosc2.save_case(
        data, seg, props, stem, chunks=cs_d, blocks=bs_d, chunks_seg=cs_s, blocks_seg=bs_s
    )
    t2 = time.perf_counter()
    return {"data": data, "seg": seg, "preprocess_s": t1 - t0, "write_s": t2 - t1, "bytes": dir_bytes(out)}


# ------------------------------------------------------------------------------------ compare
def compare_resampling(
    image_zyx: np.ndarray,
    label_zyx: np.ndarray,
    nn_data: np.ndarray,
    nn_seg: np.ndarray,
    norm: dict[str, Any],
) -> dict[str, Any]:
    """Our resampler on nnU-Net's (uncropped) grid, against nnU-Net's output, in HU."""
    from multitalent.preprocess import resample_image, resample_label, resampled_shape, separate_axis

    lo, hi = norm["clip"]
    spacing = (SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0])
    shape = resampled_shape(image_zyx.shape, spacing, TARGET_ZYX)
    sep = separate_axis(spacing, TARGET_ZYX, anisotropy_threshold=3.0)
    clipped = np.clip(image_zyx, lo, hi)
    t0 = time.perf_counter()
    ours = resample_image(clipped, shape, order=3, separate_axis=sep)
    t1 = time.perf_counter()
    np.clip(ours, lo, hi, out=ours)
    theirs_hu = nn_data[0].astype(np.float64) * norm["std"] + norm["mean"]
    diff = np.abs(ours - theirs_hu)
    diff_int16 = np.abs(np.rint(ours) - theirs_hu)
    label_c = np.ascontiguousarray(label_zyx)
    t2 = time.perf_counter()
    lab = resample_label(label_c, shape, separate_axis=sep)
    t3 = time.perf_counter()
    return {
        "ours_uncropped_resample_image_s": t1 - t0,
        "ours_uncropped_resample_label_s": t3 - t2,
        "shape": list(shape),
        "separate_axis": sep,
        "nnunet_shape": list(nn_data.shape[1:]),
        "max_abs_hu": float(diff.max()),
        "mean_abs_hu": float(diff.mean()),
        "int16_max_abs_hu": float(diff_int16.max()),
        "int16_mean_abs_hu": float(diff_int16.mean()),
        # nnU-Net marks voxels outside its nonzero mask with -1 (here: body voxels of exactly 0 HU)
        "label_voxels_differing": int((lab != np.maximum(nn_seg[0], 0)).sum()),
        "nnunet_outside_mask_voxels": int((nn_seg[0] < 0).sum()),
        "label_voxels": int(lab.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours")
    parser.add_argument("--nnunet-repeats", type=int, default=2, help="runs of nnU-Net")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, str(tmp / var))
    from threadpoolctl import threadpool_limits

    t = time.perf_counter()
    image, label, affine = make_case()
    print(f"synthetic case {image.shape} made in {time.perf_counter() - t:.1f} s")
    image_zyx = image[::-1, ::-1, :].transpose(2, 1, 0)  # what SimpleITK reads: (z, y, x)
    label_zyx = label[::-1, ::-1, :].transpose(2, 1, 0)
    ours_runs, nn_runs = [], []
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for i in range(max(args.repeats, args.nnunet_repeats)):
                if i < args.repeats:
                    out = tmp / f"ours_{i}"
                    out.mkdir()
                    r = run_ours(image, label, affine, out)
                    ours_runs.append(r)
                    print(
                        f"ours    run {i}: preprocess {r['preprocess_s']:.2f} s, write {r['write_s']:.2f} s"
                    )
                if i < args.nnunet_repeats:
                    out = tmp / f"nnunet_{i}"
                    out.mkdir()
                    r = run_nnunet(image_zyx, label_zyx, ours_runs[0]["plan"].normalization.to_dict(), out)
                    nn_runs.append(r)
                    print(
                        f"nnU-Net run {i}: preprocess {r['preprocess_s']:.2f} s, write {r['write_s']:.2f} s"
                    )
            norm = ours_runs[0]["plan"].normalization.to_dict()
            cmp = compare_resampling(image_zyx, label_zyx, nn_runs[0]["data"], nn_runs[0]["seg"], norm)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
        totals = [r["preprocess_s"] + r["write_s"] for r in runs]
        return {
            "total_best_s": min(totals),
            "total_median_s": statistics.median(totals),
            "preprocess_best_s": min(r["preprocess_s"] for r in runs),
            "write_best_s": min(r["write_s"] for r in runs),
            "bytes": runs[0]["bytes"],
        }

    ours, nn = summary(ours_runs), summary(nn_runs)
    case = ours_runs[0]["case"]
    result = {
        "ours": ours,
        "nnunet": nn,
        "speedup_best": nn["total_best_s"] / ours["total_best_s"],
        "speedup_median": nn["total_median_s"] / ours["total_median_s"],
        "bytes_ratio": ours["bytes"] / nn["bytes"],
        "ours_shape": list(case.image_zyx.shape),
        "ours_crop_box_zyx": case.geometry["crop_box_zyx"],
        "comparison_on_nnunet_grid": cmp,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
