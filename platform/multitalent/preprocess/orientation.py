"""Canonical orientation: RAS+ voxel axes (``nibabel.orientations``), then ``(z, y, x)``.

After :func:`to_canonical_zyx`, axis 0 runs inferior -> superior, axis 1 posterior -> anterior and
axis 2 left -> right (of the patient). Only flips and axis permutations are applied (no
interpolation), so the way back (:func:`from_canonical_zyx`) is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel import orientations as nio

_RAS = nio.axcodes2ornt(("R", "A", "S"))
# RAS voxel axes (i, j, k) = (x, y, z) -> (z, y, x)
ZYX_FROM_RAS = (2, 1, 0)


def check_affine(affine: np.ndarray) -> np.ndarray:
    """A finite, invertible 4x4 float64 affine, or ValueError saying what is wrong."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("affine has non-finite entries")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError("affine is singular (zero voxel size or collinear axes)")
    return a


def orientation_to_ras(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform ``(3, 2)`` [axis, flip] taking the stored voxel axes to RAS+."""
    return nio.ornt_transform(nio.io_orientation(check_affine(affine)), _RAS)


def axcodes(affine: np.ndarray) -> str:
    """The closest axis codes of the stored voxel axes, e.g. ``"LPS"``."""
    return "".join(str(c) for c in nio.aff2axcodes(check_affine(affine)))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) of each voxel axis of an affine: the norms of its first three columns."""
    a = check_affine(affine)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def to_canonical_zyx(
    volume: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient a stored ``(i, j, k)`` volume to canonical ``(z, y, x)``.

    Returns:
        ``volume_zyx`` (a view where possible), the affine of the canonical ``(z, y, x)`` voxel grid
        (maps ``[z, y, x, 1]`` to scanner mm), and ``spacing_zyx_mm``.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    transform = orientation_to_ras(affine)
    ras = nio.apply_orientation(volume, transform)
    affine_ras = check_affine(affine) @ nio.inv_ornt_aff(transform, volume.shape)
    volume_zyx = ras.transpose(ZYX_FROM_RAS)
    perm = np.zeros((4, 4))
    for dst, src in enumerate(ZYX_FROM_RAS):
        perm[src, dst] = 1.0
    perm[3, 3] = 1.0
    affine_zyx = affine_ras @ perm
    sz, sy, sx = voxel_spacing(affine_zyx)
    return volume_zyx, affine_zyx, (float(sz), float(sy), float(sx))


def from_canonical_zyx(volume_zyx: np.ndarray, transform: Sequence[Sequence[float]]) -> np.ndarray:
    """Undo :func:`to_canonical_zyx`: ``(z, y, x)`` back to the stored ``(i, j, k)`` voxel order.

    Args:
        volume_zyx: array whose last three axes are canonical ``(z, y, x)``; leading axes
            (e.g. channels) are kept.
        transform: the orientation transform returned by :func:`orientation_to_ras` for the
            original affine.
    """
    if volume_zyx.ndim < 3:
        raise ValueError(f"expected at least 3 axes, got shape {volume_zyx.shape}")
    lead = volume_zyx.ndim - 3
    ras = np.moveaxis(volume_zyx, range(lead, lead + 3), [lead + a for a in ZYX_FROM_RAS])
    forward = np.asarray(transform, dtype=np.float64)
    # forward maps stored axis i to RAS axis forward[i, 0] with flip forward[i, 1]; invert it
    inverse = np.zeros_like(forward)
    for i, (axis, flip) in enumerate(forward):
        inverse[int(axis)] = (i, flip)
    moved = np.moveaxis(ras, range(lead, lead + 3), range(3))
    stored = nio.apply_orientation(moved, inverse)
    return np.moveaxis(stored, range(3), range(lead, lead + 3))
