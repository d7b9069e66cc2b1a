"""One case: canonical orientation -> crop -> resample -> clip/round to int16 HU, and back.

Order of operations (as nnU-Net: transpose, crop, normalise, resample): reorient to ``(z, y, x)``,
crop to the body box (:mod:`multitalent.preprocess.crop`), clip to the plan's HU range, resample
(image cubic, labels per-label linear, separate z past the anisotropy threshold), clip again
(cubic overshoot) and round to int16. The geometry record keeps what is needed to map results
back onto the original voxel grid (:func:`restore_label`, :func:`restore_probabilities`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from multitalent.preprocess.crop import body_box, crop, uncrop
from multitalent.preprocess.locations import sample_class_locations
from multitalent.preprocess.orientation import (
    axcodes,
    check_affine,
    from_canonical_zyx,
    orientation_to_ras,
    to_canonical_zyx,
)
from multitalent.preprocess.plan import Plan
from multitalent.preprocess.resample import (
    label_boxes,
    nearest_indices,
    resample_image,
    resample_label,
    resampled_shape,
    separate_axis,
)

if TYPE_CHECKING:
    from multitalent.catalog import DatasetSpec

GEOMETRY_VERSION = 1


class PreprocessError(ValueError):
    """A case that cannot be preprocessed; the message names the case and the reason."""


@dataclass
class PreprocessedCase:
    """A case on the plan's grid (see ``docs/contracts.md``)."""

    image_zyx: np.ndarray  # int16 HU, clipped to the plan's range
    label_zyx: np.ndarray  # uint8 raw label values
    fg_locations: np.ndarray  # int32 (N, 4) [local_class, z, y, x]
    spacing_zyx_mm: tuple[float, float, float]
    geometry: dict[str, Any]  # JSON-able, see preprocess_image
    classes_present: list[int]  # local class indices with >= 1 voxel
    labels_present: list[int] = field(default_factory=list)  # raw label values > 0 present


class _LoadedLike(Protocol):
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


# ---------------------------------------------------------------------------------- forward
def preprocess_image(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    plan: Plan,
    label: np.ndarray | None = None,
    label_values: Collection[int] | None = None,
    name: str = "case",
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Bring a stored ``(i, j, k)`` image (and optionally its label map) onto the plan's grid.

    Args:
        image: 3-D HU image as stored in the file (any real dtype).
        affine: its 4x4 voxel-to-world affine.
        plan: the preprocessing plan.
        label: optional label map of the same shape (integer raw values); it also enlarges the
            crop box so that no labelled voxel is cropped.
        label_values: when given, the label values > 0 allowed in ``label``; others raise.
        name: used in error messages (e.g. ``"dataset/case"``).

    Returns:
        ``image_zyx`` int16 HU, ``label_zyx`` uint8 (or None), and the geometry record: a JSON-able
        dict with ``original_shape``, ``original_affine``, ``original_axcodes``,
        ``orientation_transform`` (stored axes -> RAS), ``shape_before_crop_zyx``,
        ``crop_box_zyx`` (half-open), ``shape_after_crop_zyx``, ``spacing_before_zyx_mm``,
        ``spacing_after_zyx_mm``, ``shape_after_resample_zyx``, ``separate_axis``,
        ``anisotropy_threshold`` and ``affine_zyx`` (voxel ``[z, y, x, 1]`` of the result -> mm).
    """
    try:
        affine = check_affine(affine)
    except ValueError as e:
        raise PreprocessError(f"{name}: {e}") from None
    if image.ndim != 3:
        raise PreprocessError(f"{name}: image must be 3-D, got shape {image.shape}")
    if min(image.shape) < 1:
        raise PreprocessError(f"{name}: image is empty, shape {image.shape}")
    if label is not None:
        if label.shape != image.shape:
            raise PreprocessError(f"{name}: label shape {label.shape} != image shape {image.shape}")
        if not np.issubdtype(label.dtype, np.integer):
            raise PreprocessError(f"{name}: label map must be integer, got dtype {label.dtype}")

    lo, hi = plan.normalization.clip
    image_zyx, affine_zyx, spacing_before = to_canonical_zyx(image, affine)
    label_zyx = to_canonical_zyx(label, affine)[0] if label is not None else None
    if _x_not_fastest(image_zyx):
        # every later pass walks (y, x) planes; one reordering copy is cheaper than strided passes
        image_zyx = _c_order_copy(image_zyx)
        label_zyx = None if label_zyx is None else _c_order_copy(label_zyx)
    box = body_box(image_zyx, label_zyx, air_threshold=lo)
    cropped = crop(image_zyx, box)
    shape_crop = cropped.shape
    x = np.empty(shape_crop, dtype=np.float32)
    np.clip(cropped, lo, hi, out=x, casting="unsafe")
    if np.isnan(x.max()):
        raise PreprocessError(f"{name}: image has NaN voxels")

    target = tuple(float(s) for s in plan.target_spacing_zyx_mm)
    new_shape = resampled_shape(shape_crop, spacing_before, target)
    sep = separate_axis(spacing_before, target, anisotropy_threshold=plan.anisotropy_threshold)
    # an order-0 axis that grows is resampled last, on int16 (half the bytes of float32)
    grow_last = sep is not None and new_shape[sep] > shape_crop[sep]
    first_shape = list(new_shape)
    if grow_last:
        assert sep is not None
        first_shape[sep] = shape_crop[sep]
    x = resample_image(x, first_shape, order=3, separate_axis=sep)
    np.clip(x, lo, hi, out=x)
    np.rint(x, out=x)
    image_out = x.astype(np.int16)
    del x
    if grow_last:
        assert sep is not None
        image_out = np.take(image_out, nearest_indices(shape_crop[sep], new_shape[sep]), axis=sep)

    label_out = None
    if label_zyx is not None:
        label_crop = np.ascontiguousarray(crop(label_zyx, box))
        boxes = label_boxes(label_crop)  # the crop keeps every labelled voxel
        if label_values is not None:
            unknown = sorted(set(boxes) - {int(v) for v in label_values})
            if unknown:
                raise PreprocessError(
                    f"{name}: label values {unknown} are not declared (declared: {sorted(label_values)})"
                )
        label_out = resample_label(label_crop, new_shape, separate_axis=sep, boxes=boxes)

    geometry = {
        "version": GEOMETRY_VERSION,
        "original_shape": [int(n) for n in image.shape],
        "original_affine": affine.tolist(),
        "original_axcodes": axcodes(affine),
        "orientation_transform": orientation_to_ras(affine).tolist(),
        "shape_before_crop_zyx": [int(n) for n in image_zyx.shape],
        "crop_box_zyx": [[int(a), int(b)] for a, b in box],
        "shape_after_crop_zyx": [int(n) for n in shape_crop],
        "spacing_before_zyx_mm": [float(s) for s in spacing_before],
        "spacing_after_zyx_mm": list(target),
        "shape_after_resample_zyx": [int(n) for n in new_shape],
        "separate_axis": sep,
        "anisotropy_threshold": float(plan.anisotropy_threshold),
        "affine_zyx": _resampled_affine(affine_zyx, box, shape_crop, new_shape).tolist(),
    }
    return image_out, label_out, geometry


def _x_not_fastest(volume_zyx: np.ndarray) -> bool:
    strides = np.abs(volume_zyx.strides)
    return bool(strides[2] != strides.min() or strides[0] != strides.max())


def _c_order_copy(volume_zyx: np.ndarray, tile: int = 64) -> np.ndarray:
    """C-ordered copy in cache-sized tiles (a plain copy of a transposed view is ~1.6x slower)."""
    out = np.empty(volume_zyx.shape, dtype=volume_zyx.dtype)
    nz, ny, nx = volume_zyx.shape
    for z in range(0, nz, 16):
        for y in range(0, ny, tile):
            for x in range(0, nx, tile):
                out[z : z + 16, y : y + tile, x : x + tile] = volume_zyx[
                    z : z + 16, y : y + tile, x : x + tile
                ]
    return out


def _resampled_affine(
    affine_zyx: np.ndarray, box: Sequence[Sequence[int]], shape_crop: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
    """Affine of the output grid: output voxel i samples cropped voxel (i + 0.5) * n_in/n_out - 0.5."""
    scale = np.array([n_in / n_out for n_in, n_out in zip(shape_crop, new_shape)])
    to_crop = np.eye(4)
    to_crop[:3, :3] = np.diag(scale)
    to_crop[:3, 3] = 0.5 * scale - 0.5 + np.array([b[0] for b in box])
    return affine_zyx @ to_crop


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    *,
    plan: Plan,
    dataset: DatasetSpec,
    seed_key: str,
) -> PreprocessedCase:
    """Preprocess one training case (see :func:`preprocess_image` for the image and geometry).

    Args:
        image: 3-D HU image, voxel order as stored ``(i, j, k)``.
        label: label map of the same shape, raw values declared by ``dataset``.
        affine: 4x4 affine of the image.
        plan: the preprocessing plan.
        dataset: the case's dataset; its classes (regions of raw values) index ``fg_locations``.
        seed_key: identifies the case, e.g. ``"dataset/case"``; seeds the location sample and
            names the case in errors.
    """
    label_u8 = _checked_label(label, seed_key)
    image_zyx, label_zyx, geometry = preprocess_image(
        image, affine, plan=plan, label=label_u8, label_values=list(dataset.labels), name=seed_key
    )
    assert label_zyx is not None
    fg, present, values = sample_class_locations(
        label_zyx,
        [c.raw_values for c in dataset.classes],
        per_class=plan.fg_locations_per_class,
        seed_key=seed_key,
    )
    sz, sy, sx = geometry["spacing_after_zyx_mm"]
    return PreprocessedCase(
        image_zyx=image_zyx,
        label_zyx=label_zyx,
        fg_locations=fg,
        spacing_zyx_mm=(float(sz), float(sy), float(sx)),
        geometry=geometry,
        classes_present=present,
        labels_present=values,
    )


def preprocess_loaded(
    loaded: _LoadedLike, *, plan: Plan, dataset: DatasetSpec, case_id: str
) -> PreprocessedCase:
    """:func:`preprocess_case` of a ``rawio.LoadedCase``, seeded by ``"<dataset id>/<case id>"``."""
    return preprocess_case(
        loaded.image,
        loaded.label,
        loaded.affine,
        plan=plan,
        dataset=dataset,
        seed_key=f"{dataset.id}/{case_id}",
    )


def _checked_label(label: np.ndarray, name: str) -> np.ndarray:
    """uint8 label map; values outside 0..255 raise (declared values are checked after the crop)."""
    if not np.issubdtype(label.dtype, np.integer):
        raise PreprocessError(f"{name}: label map must be integer, got dtype {label.dtype}")
    if label.dtype == np.uint8:
        return label
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi > 255:
        raise PreprocessError(f"{name}: label values must lie in 0..255, found {lo}..{hi}")
    return label.astype(np.uint8)


# ----------------------------------------------------------------------------------- inverse
def _geometry_fields(geometry: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {
            "after": tuple(int(n) for n in geometry["shape_after_resample_zyx"]),
            "crop_shape": tuple(int(n) for n in geometry["shape_after_crop_zyx"]),
            "before": tuple(int(n) for n in geometry["shape_before_crop_zyx"]),
            "box": [tuple(int(v) for v in b) for b in geometry["crop_box_zyx"]],
            "transform": geometry["orientation_transform"],
            "spacing_before": [float(s) for s in geometry["spacing_before_zyx_mm"]],
            "spacing_after": [float(s) for s in geometry["spacing_after_zyx_mm"]],
            "threshold": float(geometry.get("anisotropy_threshold", 3.0)),
        }
    except KeyError as e:
        raise PreprocessError(f"geometry record is missing {e.args[0]!r}") from None


def restore_label(label_zyx: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """Map a label map on the preprocessed grid back to the original stored ``(i, j, k)`` grid.

    Inverse resampling (per-label linear, separate z as decided for the way back), zero padding of
    the crop, then the inverse transpose and reorientation. Exact when no resampling took place.
    Returns a new C-contiguous array of the original shape and the input's dtype.
    """
    g = _geometry_fields(geometry)
    if tuple(label_zyx.shape) != g["after"]:
        raise PreprocessError(f"label shape {label_zyx.shape} != preprocessed shape {g['after']}")
    sep = separate_axis(g["spacing_after"], g["spacing_before"], anisotropy_threshold=g["threshold"])
    cropped = resample_label(label_zyx, g["crop_shape"], separate_axis=sep)
    full = uncrop(cropped, g["box"], g["before"], fill=0)
    return np.ascontiguousarray(from_canonical_zyx(full, g["transform"]))


def restore_probabilities(prob_czyx: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """Map per-class probabilities ``(C, z, y, x)`` back to the original grid, float32 ``(C, i, j, k)``.

    Linear interpolation (order 0 along the separate axis), as nnU-Net resamples probabilities;
    zero outside the crop box.
    """
    g = _geometry_fields(geometry)
    if prob_czyx.ndim != 4 or tuple(prob_czyx.shape[1:]) != g["after"]:
        raise PreprocessError(f"probabilities shape {prob_czyx.shape} != (C, *{g['after']})")
    sep = separate_axis(g["spacing_after"], g["spacing_before"], anisotropy_threshold=g["threshold"])
    cropped = np.stack([resample_image(p, g["crop_shape"], order=1, separate_axis=sep) for p in prob_czyx])
    full = uncrop(cropped, g["box"], g["before"], fill=0.0)
    return np.ascontiguousarray(from_canonical_zyx(full, g["transform"]))
