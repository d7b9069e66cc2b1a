"""Separable resampling of 3-D volumes: cubic B-spline images, per-label linear label maps.

Every axis is resampled on its own by a 1-D linear operator, an ``(n_out, n_in)`` matrix that is
applied as a few dense, banded matrix products (BLAS) instead of a per-voxel 3-D interpolation.
Tensor-product splines are separable, so the result equals the 3-D interpolation of
``scipy.ndimage.zoom(order=3, mode="nearest", grid_mode=True)``, which is what nnU-Net (through
``skimage.transform.resize(order=3, mode="edge")``) uses, up to float32 rounding.

Geometry (nnU-Net's, "align corners = False"): output voxel ``i`` of an axis resized from ``n_in``
to ``n_out`` samples the input at ``p = (i + 0.5) * n_in / n_out - 0.5``; beyond the edges the
input is extended by its edge value.

* images: order 3 (cubic B-spline interpolation, with the exact prefilter of the edge-extended
  signal, truncated where its weights fall below 1e-9);
* label maps: each label's indicator is interpolated linearly (only inside that label's bounding
  box) and every output voxel takes the label with the largest score, background included; exact
  ties (within 1e-5) go to the nearest-neighbour label when it is among the tied ones, otherwise to
  the smallest tied label (batchgenerators' ``seg_tiebreak="nearest"``, used by nnU-Net v2);
* the "separate z" rule: when the spacing anisotropy (max/min) of the source or target spacing
  exceeds the threshold, the one low-resolution axis is resampled with order 0 (nearest), the
  others as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Weights below this are dropped from the cubic operator: they are powers of the B-spline pole
# (0.268) far from the sample and would otherwise become float32 denormals (very slow in BLAS).
_WEIGHT_TOL = 1e-9
# Edge samples added on each side before the spline prefilter; the prefilter's memory decays as
# 0.268**k, so 24 samples are far below float32 precision.
_EDGE_PAD = 24
# Score differences below this count as ties when choosing a label.
_TIE_EPS = 1e-5
# Output rows per dense block of a banded operator: large enough for BLAS to be efficient,
# small enough that few zero weights are multiplied.
_ROWS_PER_BLOCK = {1: 16, 3: 64}

Shape3 = tuple[int, int, int]


# --------------------------------------------------------------------------------------- shapes
def resampled_shape(
    shape: Sequence[int], spacing_from: Sequence[float], spacing_to: Sequence[float]
) -> tuple[int, ...]:
    """nnU-Net's output shape: ``round(n * spacing_from / spacing_to)`` per axis (at least 1)."""
    if not (len(shape) == len(spacing_from) == len(spacing_to)):
        raise ValueError(f"shape {shape}, spacings {spacing_from} and {spacing_to} differ in length")
    if min(spacing_from) <= 0 or min(spacing_to) <= 0:
        raise ValueError(f"spacings must be positive, got {spacing_from} -> {spacing_to}")
    return tuple(max(1, round(n * a / b)) for n, a, b in zip(shape, spacing_from, spacing_to))


def separate_axis(
    spacing_from: Sequence[float], spacing_to: Sequence[float], *, anisotropy_threshold: float = 3.0
) -> int | None:
    """The axis to resample with order 0 (nnU-Net's "separate z"), or None.

    The source spacing is checked first, then the target: when ``max / min`` exceeds the
    threshold, the single axis with the largest spacing is the low-resolution one. When two or
    three axes share the largest spacing there is no single such axis and None is returned.
    """
    for spacing in (spacing_from, spacing_to):
        s = np.asarray(spacing, dtype=np.float64)
        if s.max() / s.min() > anisotropy_threshold:
            lowres = np.flatnonzero(s == s.max())
            return int(lowres[0]) if len(lowres) == 1 else None
    return None


# ------------------------------------------------------------------------------ 1-D operators
def _sample_positions(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


@lru_cache(maxsize=64)
def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Order-0 source index of each output sample (rounds half up, like ``map_coordinates``)."""
    idx = np.floor(_sample_positions(n_in, n_out) + 0.5).astype(np.intp)
    np.clip(idx, 0, n_in - 1, out=idx)
    idx.setflags(write=False)
    return idx


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    p = np.clip(_sample_positions(n_in, n_out), 0, n_in - 1)
    i0 = np.minimum(np.floor(p).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    t = p - i0
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    m[rows, i0] += 1.0 - t
    m[rows, i1] += t
    return m


def _bspline3(d: np.ndarray) -> np.ndarray:
    d = np.abs(d)
    return np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Cubic B-spline interpolation of the edge-extended signal, as an ``(n_out, n_in)`` matrix."""
    from scipy import linalg  # lazy: readers import this package for the plan only

    n_ext = n_in + 2 * _EDGE_PAD
    # edge extension: extended sample e is input sample clip(e - pad)
    extend = np.zeros((n_ext, n_in))
    extend[np.arange(n_ext), np.clip(np.arange(n_ext) - _EDGE_PAD, 0, n_in - 1)] = 1.0
    # interpolation condition (c[i-1] + 4 c[i] + c[i+1]) / 6 = f[i], mirror-symmetric ends
    bands = np.zeros((3, n_ext))
    bands[0, 1:] = 1 / 6
    bands[1, :] = 4 / 6
    bands[2, :-1] = 1 / 6
    bands[0, 1] = 2 / 6
    bands[2, -2] = 2 / 6
    coeffs = linalg.solve_banded((1, 1), bands, extend)  # (n_ext, n_in)
    p = _sample_positions(n_in, n_out) + _EDGE_PAD
    f = np.floor(p).astype(np.intp)
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        m += _bspline3(p - (f + k))[:, None] * coeffs[np.clip(f + k, 0, n_ext - 1)]
    m[np.abs(m) < _WEIGHT_TOL] = 0.0
    return m


@lru_cache(maxsize=32)
def _matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    if order == 1:
        m = _linear_matrix(n_in, n_out)
    elif order == 3:
        m = _cubic_matrix(n_in, n_out)
    else:
        raise ValueError(f"interpolation order must be 1 or 3 (0 is done by indexing), got {order}")
    m.setflags(write=False)
    return m


def axis_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """The ``(n_out, n_in)`` float64 interpolation matrix of one axis (order 1 or 3)."""
    return _matrix(n_in, n_out, order)


@dataclass(frozen=True)
class _Banded:
    """A 1-D operator stored as dense blocks ``(r0, r1, c0, c1, weights (r1-r0, c1-c0))``."""

    n_in: int
    n_out: int
    blocks: tuple[tuple[int, int, int, int, np.ndarray], ...]

    @classmethod
    def from_matrix(cls, m: np.ndarray, rows_per_block: int) -> _Banded:
        n_out, n_in = m.shape
        nonzero = m != 0
        has = nonzero.any(axis=1)
        first = np.where(has, nonzero.argmax(axis=1), n_in)
        last = np.where(has, n_in - nonzero[:, ::-1].argmax(axis=1), 0)
        blocks = []
        for r0 in range(0, n_out, rows_per_block):
            r1 = min(r0 + rows_per_block, n_out)
            c0, c1 = int(first[r0:r1].min()), int(last[r0:r1].max())
            if c1 <= c0:
                c0, c1 = 0, 1
            blocks.append((r0, r1, c0, c1, np.ascontiguousarray(m[r0:r1, c0:c1], dtype=np.float32)))
        return cls(n_in, n_out, tuple(blocks))

    def apply(self, x: np.ndarray, axis: int) -> np.ndarray:
        """Apply along ``axis`` of a float32 array; returns a new C-contiguous float32 array."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[axis] != self.n_in:
            raise ValueError(f"axis {axis} has {x.shape[axis]} samples, operator expects {self.n_in}")
        outer = int(np.prod(x.shape[:axis], dtype=np.int64))
        inner = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
        out_shape = (*x.shape[:axis], self.n_out, *x.shape[axis + 1 :])
        out = np.empty(out_shape, dtype=np.float32)
        if inner == 1:  # last axis: rows of x times the block's transpose
            x2, o2 = x.reshape(outer, self.n_in), out.reshape(outer, self.n_out)
            for r0, r1, c0, c1, w in self.blocks:
                np.matmul(x2[:, c0:c1], w.T, out=o2[:, r0:r1])
        elif outer == 1:  # first axis: one product per block
            x2, o2 = x.reshape(self.n_in, inner), out.reshape(self.n_out, inner)
            for r0, r1, c0, c1, w in self.blocks:
                np.matmul(w, x2[c0:c1], out=o2[r0:r1])
        else:  # middle axis: a batch of products over the outer index
            x3, o3 = x.reshape(outer, self.n_in, inner), out.reshape(outer, self.n_out, inner)
            for r0, r1, c0, c1, w in self.blocks:
                np.matmul(w, x3[:, c0:c1], out=o3[:, r0:r1])
        return out


@lru_cache(maxsize=32)
def _banded(n_in: int, n_out: int, order: int) -> _Banded:
    return _Banded.from_matrix(_matrix(n_in, n_out, order), _ROWS_PER_BLOCK[order])


def _check_3d(name: str, x: np.ndarray, out_shape: Sequence[int]) -> Shape3:
    if x.ndim != 3:
        raise ValueError(f"{name} must be 3-D, got shape {x.shape}")
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise ValueError(f"output shape must be 3 positive sizes, got {tuple(out_shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} is empty: shape {x.shape}")
    return (int(out_shape[0]), int(out_shape[1]), int(out_shape[2]))


def _axis_order(shape_in: Sequence[int], shape_out: Sequence[int]) -> list[int]:
    """Axes that change size, shrinking ones first so later passes touch fewer voxels."""
    changing = [a for a in range(len(shape_in)) if shape_in[a] != shape_out[a]]
    return sorted(changing, key=lambda a: shape_out[a] / shape_in[a])


# ------------------------------------------------------------------------------------ images
def resample_image(
    image: np.ndarray,
    out_shape: Sequence[int],
    *,
    order: int = 3,
    separate_axis: int | None = None,
) -> np.ndarray:
    """Resample a 3-D image to ``out_shape`` (float32).

    Args:
        image: 3-D array (any real dtype; computed in float32).
        out_shape: target size of each axis.
        order: 3 (cubic B-spline) or 1 (linear) for the in-plane axes.
        separate_axis: axis resampled with order 0 (see :func:`separate_axis`), or None.

    Returns:
        A new C-contiguous float32 array of ``out_shape``; a float32 copy when nothing changes.
    """
    target = _check_3d("image", image, out_shape)
    x = np.ascontiguousarray(image, dtype=np.float32)
    axes = _axis_order(x.shape, target)
    if not axes:
        return x.copy() if x is image else x
    for axis in axes:
        if axis == separate_axis:
            x = np.take(x, nearest_indices(x.shape[axis], target[axis]), axis=axis)
        else:
            x = _banded(x.shape[axis], target[axis], order).apply(x, axis)
    return x


# -------------------------------------------------------------------------------- label maps
def label_boxes(label: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box (slices) of every label value > 0 present in ``label`` (one pass)."""
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label map must have an integer dtype, got {label.dtype}")
    from scipy import ndimage

    objects = ndimage.find_objects(label)
    return {v: box for v, box in enumerate(objects, start=1) if box is not None}


def resample_label(
    label: np.ndarray,
    out_shape: Sequence[int],
    *,
    separate_axis: int | None = None,
    boxes: dict[int, tuple[slice, ...]] | None = None,
) -> np.ndarray:
    """Resample a 3-D label map (non-negative integers) to ``out_shape``, same dtype.

    Per-label linear interpolation and argmax as described in the module docstring; the identity
    (``out_shape == label.shape``) returns an exact copy. Cost scales with the labels' bounding
    boxes, not with the volume. ``boxes`` (from :func:`label_boxes` of this very array) saves a
    pass when the caller has them already.
    """
    target = _check_3d("label", label, out_shape)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label map must have an integer dtype, got {label.dtype}")
    if label.shape == target:
        return label.copy()
    if label.size and label.min() < 0:
        raise ValueError("label map has negative values")
    ax = separate_axis
    if ax is not None and label.shape[ax] != target[ax]:
        # order 0 along one axis commutes with the linear in-plane part: do it where it is cheaper
        idx = nearest_indices(label.shape[ax], target[ax])
        if target[ax] < label.shape[ax]:
            return _resample_label_linear(np.take(label, idx, axis=ax), target, None)
        partial = list(target)
        partial[ax] = label.shape[ax]
        inplane = _resample_label_linear(label, (partial[0], partial[1], partial[2]), boxes)
        return np.take(inplane, idx, axis=ax)
    return _resample_label_linear(label, target, boxes)


def _row_support(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nonzero = m != 0
    first = nonzero.argmax(axis=1)
    last = m.shape[1] - nonzero[:, ::-1].argmax(axis=1)
    return first, last


@lru_cache(maxsize=32)
def _linear_support(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output row of the linear operator: (first, last) source column, and its two taps."""
    m = _matrix(n_in, n_out, 1)
    first, last = _row_support(m)
    rows = np.arange(n_out)
    i0 = first
    i1 = np.maximum(last - 1, first)
    w0 = m[rows, i0]
    w1 = np.where(i1 != i0, m[rows, i1], 0.0)
    return first, last, np.stack([i0, i1]), np.stack([w0, w1])


def _rows_touching(first: np.ndarray, last: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Output rows whose support overlaps source columns ``[lo, hi)`` (supports are monotone)."""
    r0 = int(np.searchsorted(last, lo, side="right"))
    r1 = int(np.searchsorted(first, hi, side="left"))
    return r0, r1


def _resample_label_linear(
    label: np.ndarray, target: Shape3, boxes: dict[int, tuple[slice, ...]] | None
) -> np.ndarray:
    shape = label.shape
    if shape == target:
        return label.copy()
    out = np.zeros(target, dtype=label.dtype)
    if boxes is None:
        boxes = label_boxes(label)
    if not boxes:
        return out
    order = _axis_order(shape, target)
    supports = [_linear_support(shape[a], target[a]) if shape[a] != target[a] else None for a in range(3)]

    # per label: output box, source box and the per-axis sub-operators
    jobs = []
    for v, box in sorted(boxes.items()):
        rows, cols = [], []
        for a in range(3):
            lo, hi = box[a].start, box[a].stop
            sup = supports[a]
            if sup is None:
                rows.append((lo, hi))
                cols.append((lo, hi))
                continue
            first, last = sup[0], sup[1]
            r0, r1 = _rows_touching(first, last, lo, hi)
            if r1 <= r0:
                break
            rows.append((r0, r1))
            cols.append((int(first[r0]), int(last[r1 - 1])))
        else:
            jobs.append((v, rows, cols))
    if not jobs:
        return out
    union = [(min(j[1][a][0] for j in jobs), max(j[1][a][1] for j in jobs)) for a in range(3)]
    u_shape = tuple(hi - lo for lo, hi in union)
    best = np.zeros(u_shape, dtype=np.float32)
    best_label = np.zeros(u_shape, dtype=label.dtype)
    fg_sum = np.zeros(u_shape, dtype=np.float32)
    tied = np.zeros(u_shape, dtype=bool)

    for v, rows, cols in jobs:
        src = tuple(slice(c0, c1) for c0, c1 in cols)
        score = (label[src] == v).astype(np.float32)
        for a in order:
            r0, r1 = rows[a]
            c0, c1 = cols[a]
            m = _matrix(shape[a], target[a], 1)[r0:r1, c0:c1]
            score = _Banded.from_matrix(m, _ROWS_PER_BLOCK[1]).apply(score, a)
        region = tuple(slice(r0 - u0, r1 - u0) for (r0, r1), (u0, _) in zip(rows, union))
        b = best[region]
        better = score > b + _TIE_EPS
        tie = ~better & (score >= b - _TIE_EPS) & (score > _TIE_EPS)
        np.copyto(b, score, where=better)
        np.copyto(best_label[region], v, where=better, casting="unsafe")
        t = tied[region]
        t &= ~better
        t |= tie
        fg_sum[region] += score

    background = 1.0 - fg_sum
    result = best_label
    bg_wins = background > best + _TIE_EPS
    bg_tie = ~bg_wins & (background >= best - _TIE_EPS)
    result[bg_wins] = 0
    tie_voxels = np.nonzero((tied & ~bg_wins) | bg_tie)
    if len(tie_voxels[0]):
        top = np.maximum(best, background)[tie_voxels]
        lowest = np.where(bg_tie[tie_voxels], 0, best_label[tie_voxels])
        global_idx = [tie_voxels[a] + union[a][0] for a in range(3)]
        nearest, nearest_score = _nearest_label_and_score(label, target, global_idx, supports)
        result[tie_voxels] = np.where(nearest_score >= top - _TIE_EPS, nearest, lowest)
    out[tuple(slice(lo, hi) for lo, hi in union)] = result
    return out


def _nearest_label_and_score(
    label: np.ndarray,
    target: Shape3,
    idx: list[np.ndarray],
    supports: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None],
) -> tuple[np.ndarray, np.ndarray]:
    """At output voxels ``idx``: the nearest-neighbour label and its linear score."""
    near = [
        nearest_indices(label.shape[a], target[a])[idx[a]] if label.shape[a] != target[a] else idx[a]
        for a in range(3)
    ]
    nearest = label[near[0], near[1], near[2]]
    taps = []
    for a in range(3):
        sup = supports[a]
        if sup is None:
            taps.append([(idx[a], np.ones(len(idx[a])))])
        else:
            taps.append([(sup[2][k][idx[a]], sup[3][k][idx[a]]) for k in range(2)])
    score = np.zeros(len(idx[0]))
    for iz, wz in taps[0]:
        for iy, wy in taps[1]:
            for ix, wx in taps[2]:
                score += wz * wy * wx * (label[iz, iy, ix] == nearest)
    return nearest, score
