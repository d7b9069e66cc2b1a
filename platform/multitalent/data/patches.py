"""Patch boxes and patch reads with padding.

Convention: a patch of size ``p`` centred at ``c`` covers voxels ``[c - p // 2, c - p // 2 + p)`` on
each axis (for even ``p`` the centre is the first voxel of the upper half). Parts of the patch outside
the volume are padded.

:func:`read_patch` slices the array once with the in-volume box, so a Zarr array decodes only the
chunks the patch touches; numpy arrays and memory maps work the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """``source`` slices of the volume and ``dest`` slices of the patch holding the same voxels.

    When the patch does not intersect the volume, every slice is empty.
    """

    source: tuple[slice, slice, slice]
    dest: tuple[slice, slice, slice]

    @property
    def is_empty(self) -> bool:
        return any(s.stop <= s.start for s in self.source)


def crop_box(center_zyx: Sequence[int], patch_zyx: Sequence[int], shape_zyx: Sequence[int]) -> CropBox:
    """The in-volume part of the patch centred at ``center_zyx``, and where it lands in the patch."""
    if not len(center_zyx) == len(patch_zyx) == len(shape_zyx):
        raise ValueError(f"center {center_zyx}, patch {patch_zyx}, shape {shape_zyx}: dimensions differ")
    src: list[slice] = []
    dst: list[slice] = []
    for c, p, s in zip(center_zyx, patch_zyx, shape_zyx):
        lo = int(c) - int(p) // 2
        hi = lo + int(p)
        a, b = max(lo, 0), min(hi, int(s))
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    if any(s.stop <= s.start for s in src):  # no overlap on some axis: the patch is all padding
        empty = (slice(0, 0), slice(0, 0), slice(0, 0))
        return CropBox(empty, empty)
    return CropBox((src[0], src[1], src[2]), (dst[0], dst[1], dst[2]))


def read_patch(
    array: Any,
    center_zyx: Sequence[int],
    patch_zyx: Sequence[int],
    *,
    pad_value: float = 0,
    dtype: Any = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Read a ``patch_zyx`` patch of a 3-D array-like (numpy, memmap, zarr), padding outside it.

    ``transform`` (e.g. intensity normalisation) is applied to the read voxels only, so the padding
    keeps ``pad_value`` exactly. The result has ``dtype`` (default: the array's, or the transform's).
    """
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != 3:
        raise ValueError(f"read_patch expects a 3-D array, got shape {shape}")
    box = crop_box(center_zyx, patch_zyx, shape)
    region = None
    if not box.is_empty:
        region = np.asarray(array[box.source])
        if transform is not None:
            region = transform(region)
    out_dtype = (
        np.dtype(dtype) if dtype is not None else (region.dtype if region is not None else array.dtype)
    )
    patch = tuple(int(p) for p in patch_zyx)
    if region is not None and region.shape == patch:  # nothing to pad: skip the extra copy
        fresh = transform is not None or not isinstance(array, np.ndarray)  # else region views the input
        return region.astype(out_dtype, copy=not fresh)
    out = np.full(patch, pad_value, dtype=out_dtype)
    if region is not None:
        out[box.dest] = region
    return out
