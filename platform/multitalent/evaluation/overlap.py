"""Dice and HD95 of one binary mask pair, with explicit rules for empty masks.

HD95 is MONAI's ``compute_hausdorff_distance(percentile=95, directed=False, spacing=...)``: the 95th
percentile of the distances from each surface voxel of the prediction to the reference surface, the
same from the reference to the prediction, and the larger of the two ("percentile per direction, then
max"; medpy pools both directions first, DeepMind's surface-distance weights by surface area). Distances
are in mm, along each voxel axis scaled by its own spacing (anisotropic grids are exact).

Empty masks (MONAI returns NaN or inf there, and a mean silently drops the case):

* both empty: Dice 1, HD95 undefined (``nan``, left out of HD95 means); status ``both_empty``;
* one empty: Dice 0, HD95 = the worst case, the diagonal of the image's extent in mm; status
  ``pred_empty`` (a missed structure) or ``gt_empty`` (a false alarm).

Every case counts in the Dice means; the statuses are counted in the reports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HD_PERCENTILE = 95.0
HD95_DEFINITION = (
    "HD95: MONAI compute_hausdorff_distance(percentile=95, directed=False) in mm with the voxel spacing: "
    "95th percentile of surface distances per direction, then the larger direction"
)
EMPTY_RULES = (
    "both masks empty: Dice 1, HD95 not defined (left out of HD95 means); "
    "one mask empty: Dice 0, HD95 = the image diagonal in mm (worst case)"
)
STATUSES = ("scored", "both_empty", "pred_empty", "gt_empty")


@dataclass(frozen=True)
class Overlap:
    """Dice and HD95 of one (case, class); voxel counts; which empty-mask rule applied."""

    dice: float
    hd95_mm: float  # nan when both masks are empty
    tp: int
    fp: int
    fn: int
    status: str  # one of STATUSES


def worst_case_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """The diagonal of the image's extent: no two voxels are further apart."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm))))


def _union_box(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    union = a | b
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(i for i in range(union.ndim) if i != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + 1 + margin))
    return tuple(box)


def hd95_mm(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """MONAI's symmetric 95th-percentile Hausdorff distance of two non-empty masks, in mm."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    box = _union_box(pred, gt)  # surfaces and distances are unchanged by a crop with a margin
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt[box]))[None, None]
    with warnings.catch_warnings():  # MONAI's own deprecated argument, passed inside MONAI
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            p, g, include_background=True, percentile=HD_PERCENTILE, spacing=[float(s) for s in spacing_mm]
        )
    return float(hd[0, 0])


def overlap(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float]) -> Overlap:
    """Dice and HD95 of binary masks of one grid (voxel spacing per axis, in the arrays' axis order)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {gt.shape}")
    if len(spacing_mm) != pred.ndim:
        raise ValueError(f"{len(spacing_mm)} spacings for a {pred.ndim}-D mask")
    pred, gt = pred.astype(bool, copy=False), gt.astype(bool, copy=False)
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    fp, fn = n_pred - tp, n_gt - tp
    if n_pred == 0 and n_gt == 0:
        return Overlap(1.0, math.nan, 0, 0, 0, "both_empty")
    if n_pred == 0 or n_gt == 0:
        status = "pred_empty" if n_pred == 0 else "gt_empty"
        return Overlap(0.0, worst_case_mm(pred.shape, spacing_mm), tp, fp, fn, status)
    return Overlap(2 * tp / (n_pred + n_gt), hd95_mm(pred, gt, spacing_mm), tp, fp, fn, "scored")
