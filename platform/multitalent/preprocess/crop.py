"""Crop to the scanned body and back.

nnU-Net crops to the bounding box of ``image != 0``. In CT, air is about -1000 HU, so that box is
almost always the whole image and the crop does nothing. Here the box is that of the voxels
**above the plan's lower clip bound** (everything the clipped image can distinguish from air),
united with the box of the label's foreground so that no labelled voxel is ever cropped away.
Outside that box the clipped image is constant (the lower bound), so nothing is lost: a reader
that pads crops with the lower clip value sees the same image, minus cubic ringing at the box edge
and isolated single voxels above the bound (noise in the air), which are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _box_of(volume_zyx: np.ndarray, threshold: float, *, pairs: bool) -> list[tuple[int, int]] | None:
    """Box of ``volume > threshold`` in one pass: per z slice, OR-ed into a (y, x) footprint.

    With ``pairs``, a voxel counts only when its x neighbour is above the threshold too, so that
    isolated noise voxels in the air (a few per CT at -1000 +- 15 HU) do not stretch the box.
    """
    nz, ny, nx = volume_zyx.shape
    pairs = pairs and nx > 1
    footprint_yx = np.zeros((ny, nx - 1 if pairs else nx), dtype=bool)
    z_hit = np.zeros(nz, dtype=bool)
    for z in range(nz):
        above = volume_zyx[z] > threshold
        if pairs:
            above = above[:, 1:] & above[:, :-1]
        if above.any():
            z_hit[z] = True
            footprint_yx |= above
    zs = np.flatnonzero(z_hit)
    if zs.size == 0:
        return None
    ys = np.flatnonzero(footprint_yx.any(axis=1))
    xs = np.flatnonzero(footprint_yx.any(axis=0))
    # a pair starting at x covers voxels x and x + 1
    return [
        (int(zs[0]), int(zs[-1]) + 1),
        (int(ys[0]), int(ys[-1]) + 1),
        (int(xs[0]), int(xs[-1]) + 1 + pairs),
    ]


def body_box(image_zyx: np.ndarray, label_zyx: np.ndarray | None, *, air_threshold: float) -> Box:
    """Bounding box ``((z0, z1), (y0, y1), (x0, x1))`` (half-open) to crop to.

    The box of ``image > air_threshold`` (ignoring voxels without an x neighbour above the
    threshold), united with the box of ``label != 0`` when a label is given. When neither has any
    voxel, the whole volume.
    """
    shape = image_zyx.shape
    box = _box_of(image_zyx, air_threshold, pairs=True)
    if label_zyx is not None:
        if label_zyx.shape != shape:
            raise ValueError(f"label shape {label_zyx.shape} != image shape {shape}")
        label_box = _box_of(label_zyx, 0, pairs=False)
        if label_box is not None:
            box = (
                label_box
                if box is None
                else [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(box, label_box)]
            )
    if box is None:
        box = [(0, n) for n in shape]
    return (box[0], box[1], box[2])


def crop(volume_zyx: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """A view of the last three axes of ``volume_zyx`` inside ``box``."""
    lead = (slice(None),) * (volume_zyx.ndim - 3)
    return volume_zyx[(*lead, *(slice(int(lo), int(hi)) for lo, hi in box))]


def uncrop(
    cropped: np.ndarray, box: Sequence[Sequence[int]], shape_zyx: Sequence[int], *, fill: float = 0
) -> np.ndarray:
    """Place ``cropped`` (last three axes) into a new array of spatial shape ``shape_zyx``."""
    expected = tuple(int(hi) - int(lo) for lo, hi in box)
    if tuple(cropped.shape[-3:]) != expected:
        raise ValueError(f"cropped shape {cropped.shape[-3:]} does not match crop box {expected}")
    out = np.full((*cropped.shape[:-3], *(int(n) for n in shape_zyx)), fill, dtype=cropped.dtype)
    crop(out, box)[...] = cropped
    return out
