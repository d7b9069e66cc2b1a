"""From class probabilities on the preprocessed grid back to the input file's voxel grid.

Undoes the converter's preprocessing (:func:`multitalent.preprocess.preprocess_image`) from its
geometry record: resample to the cropped grid at the input spacing (linear, order 0 along the
"separate" axis, as :func:`multitalent.preprocess.restore_probabilities`), uncrop (zero outside
the body box), undo the transpose and reorientation. Then threshold ``p > 0.5``.

Memory stays bounded whatever the number of classes: one class at a time, and only inside the box
of its voxels above the threshold (TotalSegmentator's trick). That is exact, not an approximation:
linear and nearest interpolation are convex combinations, so an output voxel none of whose source
voxels exceeds the threshold cannot exceed it either. The result equals thresholding the full
``restore_probabilities`` output, without ever holding a full-resolution float map.

Label maps use the dataset's raw numbering. A class is a region of raw values; classes are painted
from the largest region to the smallest, each with its most specific raw value (the one the fewest
of the dataset's classes contain), so a nested sub-region is written over its parent (liver tumour,
raw 2 of liver = {1, 2}, over liver, raw 1).

numpy only (torch tensors are accepted and read one class at a time).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multitalent.preprocess.orientation import from_canonical_zyx
from multitalent.preprocess.resample import axis_matrix, nearest_indices, separate_axis

THRESHOLD = 0.5


@dataclass(frozen=True)
class InverseGeometry:
    """The parts of a geometry record the way back needs (see ``preprocess_image``)."""

    after_zyx: tuple[int, int, int]  # preprocessed (resampled) shape
    crop_zyx: tuple[int, int, int]  # shape after crop, at the input spacing
    before_zyx: tuple[int, int, int]  # canonical shape before crop
    box_zyx: tuple[tuple[int, int], ...]  # crop box in the canonical grid (half-open)
    transform: np.ndarray  # stored axes -> RAS orientation transform
    separate_axis: int | None  # axis resampled with order 0 on the way back
    original_shape: tuple[int, int, int]

    @classmethod
    def from_record(cls, geometry: Mapping[str, Any]) -> InverseGeometry:
        try:
            after = [float(s) for s in geometry["spacing_after_zyx_mm"]]
            before = [float(s) for s in geometry["spacing_before_zyx_mm"]]
            threshold = float(geometry.get("anisotropy_threshold", 3.0))
            return cls(
                after_zyx=_three(geometry["shape_after_resample_zyx"]),
                crop_zyx=_three(geometry["shape_after_crop_zyx"]),
                before_zyx=_three(geometry["shape_before_crop_zyx"]),
                box_zyx=tuple((int(a), int(b)) for a, b in geometry["crop_box_zyx"]),
                transform=np.asarray(geometry["orientation_transform"], dtype=np.float64),
                separate_axis=separate_axis(after, before, anisotropy_threshold=threshold),
                original_shape=_three(geometry["original_shape"]),
            )
        except KeyError as e:
            raise ValueError(f"geometry record is missing {e.args[0]!r}") from None


def _three(v: Sequence[Any]) -> tuple[int, int, int]:
    return (int(v[0]), int(v[1]), int(v[2]))


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _box_above(p: np.ndarray, threshold: float) -> list[tuple[int, int]] | None:
    above = p > threshold
    if not above.any():
        return None
    box = []
    for axis in range(3):
        hit = np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return box


@dataclass(frozen=True)
class _AxisMap:
    """One axis of the way back restricted to a box: output rows ``[r0, r1)`` read source columns
    ``[c0, c1)`` through two taps each (``i0``, ``i1`` relative to ``c0``; weights ``w0``, ``w1``)."""

    r0: int
    r1: int
    c0: int
    c1: int
    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray | None  # None: order 0 / identity (take i0)
    w1: np.ndarray | None


def _axis_map(n_in: int, n_out: int, lo: int, hi: int, order0: bool) -> _AxisMap | None:
    if n_in == n_out:
        idx = np.arange(hi - lo)
        return _AxisMap(lo, hi, lo, hi, idx, idx, None, None)
    if order0:
        near = nearest_indices(n_in, n_out)
        r0, r1 = int(np.searchsorted(near, lo, "left")), int(np.searchsorted(near, hi, "left"))
        if r1 <= r0:
            return None
        idx = near[r0:r1] - lo
        return _AxisMap(r0, r1, lo, hi, idx, idx, None, None)
    m = axis_matrix(n_in, n_out, 1)
    nonzero = m != 0
    first = nonzero.argmax(axis=1)
    last = n_in - 1 - nonzero[:, ::-1].argmax(axis=1)  # inclusive
    # rows whose taps touch [lo, hi): supports are monotone in the row
    r0 = int(np.searchsorted(last, lo, "left"))
    r1 = int(np.searchsorted(first, hi, "left"))
    if r1 <= r0:
        return None
    c0, c1 = int(first[r0]), int(last[r1 - 1]) + 1
    rows = np.arange(r0, r1)
    i0, i1 = first[r0:r1], last[r0:r1]
    w0 = m[rows, i0].astype(np.float32)
    w1 = np.where(i1 != i0, m[rows, i1], 0.0).astype(np.float32)
    return _AxisMap(r0, r1, c0, c1, i0 - c0, i1 - c0, w0, w1)


def _apply(x: np.ndarray, amap: _AxisMap, axis: int) -> np.ndarray:
    a = np.take(x, amap.i0, axis=axis)
    if amap.w0 is None or amap.w1 is None:
        return a
    shape = [1, 1, 1]
    shape[axis] = -1
    b = np.take(x, amap.i1, axis=axis)
    a *= amap.w0.reshape(shape)
    b *= amap.w1.reshape(shape)
    a += b
    return a


def class_region(probs_kzyx: Any, k: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """Class ``k``'s probabilities as ``(origin_zyx, sub-volume)``: the part of the preprocessed grid a
    store kept for it (``probs_kzyx.region(k)``, zero outside), or the whole grid for an array."""
    region = getattr(probs_kzyx, "region", None)
    if region is not None:
        origin, values = region(k)
        return (int(origin[0]), int(origin[1]), int(origin[2])), values
    return (0, 0, 0), _as_numpy(probs_kzyx[k])


def _read_box(p: np.ndarray, origin: Sequence[int], box: Sequence[tuple[int, int]]) -> np.ndarray:
    """``box`` (preprocessed-grid coordinates) of a sub-volume at ``origin``, zero where it lies outside."""
    src = tuple(slice(max(lo - o, 0), max(min(hi - o, n), 0)) for (lo, hi), o, n in zip(box, origin, p.shape))
    piece = np.ascontiguousarray(p[src], dtype=np.float32)
    pads = [
        (s.start + o - lo, hi - (s.start + o) - m) for s, (lo, hi), o, m in zip(src, box, origin, piece.shape)
    ]
    if any(a or b for a, b in pads):
        piece = np.pad(piece, pads)
    return piece


def restore_class_box(
    prob_zyx: Any,
    geometry: InverseGeometry,
    *,
    threshold: float = THRESHOLD,
    origin_zyx: Sequence[int] = (0, 0, 0),
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """One class's mask on the canonical ``(z, y, x)`` grid before the crop, inside its box.

    Args:
        prob_zyx: the class's probabilities on the preprocessed grid (numpy or torch), or a part of
            it starting at ``origin_zyx`` (zero outside, see :func:`class_region`).
        geometry: the case's :class:`InverseGeometry`.
        threshold: foreground is ``p > threshold`` after resampling.

    Returns:
        ``(box, mask)``: slices into the canonical grid before the crop and a bool mask of that box;
        ``None`` when no voxel exceeds the threshold.
    """
    p = _as_numpy(prob_zyx)
    origin = [int(o) for o in origin_zyx]
    if any(o < 0 or o + n > m for o, n, m in zip(origin, p.shape, geometry.after_zyx)) or p.ndim != 3:
        raise ValueError(
            f"probabilities of shape {tuple(p.shape)} at {tuple(origin)} do not fit the preprocessed "
            f"shape {geometry.after_zyx}"
        )
    local = _box_above(p, threshold)
    if local is None:
        return None
    box = [(lo + o, hi + o) for (lo, hi), o in zip(local, origin)]
    maps = []
    for a in range(3):
        amap = _axis_map(
            geometry.after_zyx[a], geometry.crop_zyx[a], box[a][0], box[a][1], a == geometry.separate_axis
        )
        if amap is None:
            return None
        maps.append(amap)
    x = _read_box(p, origin, [(m.c0, m.c1) for m in maps])
    # shrinking axes first: later passes touch fewer voxels
    for a in sorted(range(3), key=lambda a: (maps[a].r1 - maps[a].r0) / max(maps[a].c1 - maps[a].c0, 1)):
        x = _apply(x, maps[a], a)
    mask = x > threshold
    offset = [lo for lo, _ in geometry.box_zyx]
    out_box = (
        slice(maps[0].r0 + offset[0], maps[0].r1 + offset[0]),
        slice(maps[1].r0 + offset[1], maps[1].r1 + offset[1]),
        slice(maps[2].r0 + offset[2], maps[2].r1 + offset[2]),
    )
    return out_box, mask


def to_input_order(volume_zyx: np.ndarray, geometry: InverseGeometry) -> np.ndarray:
    """A canonical ``(z, y, x)`` volume (before-crop shape) in the input file's voxel order, C-contiguous."""
    out = np.ascontiguousarray(from_canonical_zyx(volume_zyx, geometry.transform.tolist()))
    if out.shape != geometry.original_shape:
        raise AssertionError(f"restored shape {out.shape} != input shape {geometry.original_shape}")
    return out


def restore_mask(
    prob_zyx: Any,
    geometry: InverseGeometry,
    *,
    threshold: float = THRESHOLD,
    origin_zyx: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """One class's binary mask (uint8 0/1) in the input file's shape and voxel order (``prob_zyx`` and
    ``origin_zyx`` as in :func:`restore_class_box`)."""
    full = np.zeros(geometry.before_zyx, dtype=np.uint8)
    restored = restore_class_box(prob_zyx, geometry, threshold=threshold, origin_zyx=origin_zyx)
    if restored is not None:
        box, mask = restored
        full[box] = mask
    return to_input_order(full, geometry)


def paint_order(class_values: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(class index, raw value)`` in painting order: largest region first; each class paints the raw
    value of its region that the fewest classes contain (ties: the smallest value)."""
    count: dict[int, int] = {}
    for values in class_values:
        for v in set(values):
            count[v] = count.get(v, 0) + 1
    order = sorted(range(len(class_values)), key=lambda i: -len(set(class_values[i])))
    return [(i, min(set(class_values[i]), key=lambda v: (count[v], v))) for i in order]


@dataclass(frozen=True)
class LabelMapResult:
    """A dataset's label map in the input's voxel order, and the voxels each class got (before nesting)."""

    label: np.ndarray  # uint8, input shape
    voxels_per_class: list[int]


def restore_label_map(
    probs_kzyx: Any,
    class_values: Sequence[Sequence[int]],
    geometry: InverseGeometry,
    *,
    threshold: float = THRESHOLD,
) -> LabelMapResult:
    """A label map of one dataset's classes in its raw numbering, in the input's shape.

    Args:
        probs_kzyx: ``(K, z, y, x)`` probabilities of the classes, preprocessed grid (numpy or torch;
            read one class at a time).
        class_values: the raw values of each class's region (``ClassSpec.raw_values``), same order.
        geometry: the case's :class:`InverseGeometry`.
    """
    if len(class_values) != probs_kzyx.shape[0]:
        raise ValueError(f"{len(class_values)} classes but {probs_kzyx.shape[0]} probability channels")
    full = np.zeros(geometry.before_zyx, dtype=np.uint8)
    voxels = [0] * len(class_values)
    for k, value in paint_order(class_values):
        origin, values = class_region(probs_kzyx, k)
        restored = restore_class_box(values, geometry, threshold=threshold, origin_zyx=origin)
        if restored is None:
            continue
        box, mask = restored
        voxels[k] = int(mask.sum())
        full[box][mask] = value
    return LabelMapResult(to_input_order(full, geometry), voxels)


def iter_class_masks(
    probs_kzyx: Any, geometry: InverseGeometry, *, threshold: float = THRESHOLD
) -> Iterator[tuple[int, np.ndarray]]:
    """``(channel, uint8 mask in the input's shape)`` for each channel, one at a time."""
    for k in range(probs_kzyx.shape[0]):
        origin, values = class_region(probs_kzyx, k)
        yield k, restore_mask(values, geometry, threshold=threshold, origin_zyx=origin)
