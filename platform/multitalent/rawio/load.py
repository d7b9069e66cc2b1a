"""Validated loading of one raw case: image, label map, geometry checks."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np

from multitalent.catalog.model import DatasetSpec
from multitalent.rawio.cases import CaseError, LoadedCase, RawCase
from multitalent.rawio.layouts import expected_label_path
from multitalent.rawio.nifti import read_volume

_MAX_LISTED = 12


def _nonfinite_reason(array: np.ndarray, what: str) -> str | None:
    if not np.issubdtype(array.dtype, np.floating):
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    n_nan = int(np.isnan(array).sum())
    n_inf = int(array.size - finite.sum()) - n_nan
    return f"{what} has non-finite voxels: {n_nan} NaN, {n_inf} Inf"


def _corner_shift_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance in mm between where the two affines put the corner voxels of ``shape``."""
    corners = np.array([[*c, 1.0] for c in product(*[(0, n - 1) for n in shape[:3]])]).T
    return float(np.linalg.norm((affine_a - affine_b) @ corners, axis=0).max())


def _check_geometry(
    path: Path,
    *,
    shape: tuple[int, ...],
    affine: np.ndarray,
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
    image_path: Path,
    atol_mm: float,
) -> None:
    if shape != image_shape:
        raise CaseError(path, f"shape mismatch: {shape} here, {image_shape} in image {image_path.name}")
    shift = _corner_shift_mm(affine, image_affine, shape)
    if not shift <= atol_mm:
        raise CaseError(
            path,
            f"affine mismatch with image {image_path.name}: corners differ by {shift:.4g} mm "
            f"(tolerance {atol_mm:g} mm)",
        )


def _to_label_values(array: np.ndarray, path: Path, dataset: DatasetSpec) -> np.ndarray:
    """Validate raw label values and return them as uint8."""
    reason = _nonfinite_reason(array, "label")
    if reason:
        raise CaseError(path, reason)
    if np.issubdtype(array.dtype, np.floating):
        fractional = array[array != np.round(array)]
        if fractional.size:
            shown = np.unique(fractional)[:_MAX_LISTED].tolist()
            raise CaseError(path, f"label has non-integer values, e.g. {shown}")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise CaseError(path, f"label has unsupported voxel type {array.dtype}")
    bad: set[int] = set()
    if array.dtype in (np.uint8, np.bool_):
        label = array.astype(np.uint8, copy=False)
    else:
        in_range = (array >= 0) & (array <= 255)
        if not in_range.all():
            bad.update(np.unique(array[~in_range]).astype(np.int64).tolist())
        label = np.where(in_range, array, 0).astype(np.uint8)
    # One byte-wide gather instead of a histogram: bincount would widen a large volume to int64.
    undeclared = np.ones(256, dtype=bool)
    undeclared[[0, *dataset.labels]] = False
    flagged = undeclared[label]
    if flagged.any():
        bad.update(np.unique(label[flagged]).tolist())
    if not bad:
        return label
    ordered = sorted(bad)
    shown = ordered[:_MAX_LISTED]
    more = f" and {len(ordered) - _MAX_LISTED} more" if len(ordered) > _MAX_LISTED else ""
    raise CaseError(
        path,
        f"label values {shown}{more} are not declared in catalog dataset {dataset.id!r} "
        f"(declared: {sorted(dataset.labels)})",
    )


def _nonzero_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the non-zero voxels of a 3-D array, from max-reductions over contiguous
    memory (no index arrays, no copies): the slowest-varying axis first, then within that slab."""
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        box = _nonzero_box(mask.T)  # nibabel's arrays are Fortran-ordered: the transpose is C-ordered
        return None if box is None else box[::-1]
    a = mask.reshape(mask.shape[0], -1).max(axis=1) if mask.flags.c_contiguous else mask.max(axis=(1, 2))
    first = np.flatnonzero(a)
    if first.size == 0:
        return None
    s0 = slice(int(first[0]), int(first[-1]) + 1)
    slab = mask[s0]
    second = np.flatnonzero(slab.max(axis=(0, 2)))
    s1 = slice(int(second[0]), int(second[-1]) + 1)
    third = np.flatnonzero(slab[:, s1].max(axis=(0, 1)))
    return s0, s1, slice(int(third[0]), int(third[-1]) + 1)


def _paint_mask(label: np.ndarray, mask: np.ndarray, value: int, *, path: Path, name: str) -> None:
    """``label[mask == 1] = value`` for a binary mask, checked to be binary.

    Integer masks (TotalSegmentator's are uint8) are checked with two reductions and painted inside
    their non-zero bounding box only: a structure covers a small part of the volume, and full-volume
    boolean masks per structure dominated loading (117 structures, 79 M voxels each). Other dtypes take
    the general path.
    """
    if np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_:
        if mask.size and (int(mask.max()) > 1 or int(mask.min()) < 0):
            values = np.unique(mask[(mask != 0) & (mask != 1)])[:_MAX_LISTED].tolist()
            raise CaseError(path, f"mask {name!r} is not binary: has values {values} besides 0 and 1")
        box = _nonzero_box(mask)
        if box is not None:
            inside = mask[box].astype(np.bool_, copy=False)
            np.copyto(label[box], np.uint8(value), where=inside)
        return
    reason = _nonfinite_reason(mask, f"mask {name!r}")
    if reason:
        raise CaseError(path, reason)
    ones = mask == 1
    if not (ones | (mask == 0)).all():
        values = np.unique(mask[~ones & (mask != 0)])[:_MAX_LISTED].tolist()
        raise CaseError(path, f"mask {name!r} is not binary: has values {values} besides 0 and 1")
    label[ones] = value


def _structure_label_map(
    case: RawCase,
    dataset: DatasetSpec,
    *,
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
    warnings: list[str],
    atol_mm: float,
) -> np.ndarray:
    value_of = {name: value for value, name in dataset.labels.items()}
    structures = case.structure_paths
    if not structures:
        where = expected_label_path(case, dataset)
        raise CaseError(
            where, "missing label: no structure masks" if where.is_dir() else "missing label folder"
        )
    unknown = sorted(set(structures) - set(value_of))
    if unknown:
        path = structures[unknown[0]]
        raise CaseError(
            path,
            f"structure(s) {unknown} not declared in catalog dataset {dataset.id!r}",
        )
    absent = sorted(set(value_of) - set(structures))
    if absent:
        shown = ", ".join(absent[:_MAX_LISTED]) + (" ..." if len(absent) > _MAX_LISTED else "")
        warnings.append(f"{len(absent)} catalog structure(s) have no mask file (left as background): {shown}")
    label = np.zeros(image_shape, dtype=np.uint8)
    # Ascending raw value, so where masks overlap the structure with the larger value wins.
    for name in sorted(structures, key=lambda n: value_of[n]):
        path = structures[name]
        mask, affine = read_volume(path, what=f"mask {name!r}", writeable=False)
        _check_geometry(
            path,
            shape=mask.shape,
            affine=affine,
            image_shape=image_shape,
            image_affine=image_affine,
            image_path=case.image_path,
            atol_mm=atol_mm,
        )
        _paint_mask(label, mask, value_of[name], path=path, name=name)
    return label


def load_case(case: RawCase, dataset: DatasetSpec, *, affine_atol_mm: float = 1e-3) -> LoadedCase:
    """Read and validate one raw case.

    For the TotalSegmentator layout the label map is built from the per-structure binary masks:
    voxel value ``v`` is the structure named ``dataset.labels[v]``; where masks overlap, the
    structure with the **larger** raw value wins. A mask file whose structure is not in the catalog
    is an error; catalog structures without a mask file stay background (with a warning).

    Returns:
        LoadedCase with ``image`` float32 (i, j, k) in HU, ``label`` uint8 of the same shape.

    Raises:
        CaseError: naming the offending file, for a missing / truncated / non-NIfTI file, a 4-D
            image, NaN/Inf voxels, an image/label shape or affine mismatch beyond
            ``affine_atol_mm`` (largest corner displacement, mm), or label values that the catalog
            does not declare (listed). An all-zero label is not an error: it adds a warning.
    """
    warnings: list[str] = []
    raw_image, affine = read_volume(case.image_path, what="image")
    try:
        image = raw_image.astype(np.float32)
    except (TypeError, ValueError):
        raise CaseError(case.image_path, f"image has unsupported voxel type {raw_image.dtype}") from None
    reason = _nonfinite_reason(raw_image, "image") or _nonfinite_reason(image, "image (as float32)")
    if reason:
        raise CaseError(case.image_path, reason)
    del raw_image

    if dataset.layout == "totalsegmentator":
        label = _structure_label_map(
            case,
            dataset,
            image_shape=image.shape,
            image_affine=affine,
            warnings=warnings,
            atol_mm=affine_atol_mm,
        )
    else:
        label_path = case.label_path or expected_label_path(case, dataset)
        if case.label_path is None or not label_path.is_file():
            raise CaseError(label_path, f"missing label file for case {case.case_id!r}")
        raw_label, label_affine = read_volume(label_path, what="label")
        _check_geometry(
            label_path,
            shape=raw_label.shape,
            affine=label_affine,
            image_shape=image.shape,
            image_affine=affine,
            image_path=case.image_path,
            atol_mm=affine_atol_mm,
        )
        label = _to_label_values(raw_label, label_path, dataset)

    if not label.any():
        warnings.append(f"all-zero label: case {case.case_id!r} has no foreground voxels")
    return LoadedCase(image=image, label=label, affine=affine, warnings=warnings)
