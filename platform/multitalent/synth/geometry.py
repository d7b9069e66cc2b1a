"""Scan grids: voxel shape and affine from an orientation code, spacing and a world field of view."""

from __future__ import annotations

import numpy as np

# Orientation letter -> (world axis, direction); RAS+ world as in NIfTI.
_AXIS_OF_CODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def grid_affine(
    *,
    axcodes: str,
    spacing_xyz_mm: tuple[float, float, float],
    lo_xyz_mm: tuple[float, float, float],
    hi_xyz_mm: tuple[float, float, float],
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Voxel grid covering the world box ``[lo, hi]`` with voxel axes along ``axcodes``.

    ``axcodes`` names, for voxel axes i, j, k, the world direction each increases towards, as
    ``nibabel.aff2axcodes`` reports it: "RAS", "LPS" (DICOM-like: x and y flipped), "IPL"
    (KiTS19-like: slices first). Returns ``(shape_ijk, affine)``, the affine mapping voxel centres to
    RAS+ mm.
    """
    codes = axcodes.upper()
    if len(codes) != 3 or sorted(_AXIS_OF_CODE[c][0] for c in codes) != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} must name each of the x (R/L), y (A/P), z (S/I) axes once")
    affine = np.eye(4)
    shape = [0, 0, 0]
    for voxel_axis, code in enumerate(codes):
        world_axis, direction = _AXIS_OF_CODE[code]
        spacing = float(spacing_xyz_mm[world_axis])
        n = max(1, round((hi_xyz_mm[world_axis] - lo_xyz_mm[world_axis]) / spacing))
        shape[voxel_axis] = n
        affine[:3, voxel_axis] = 0.0
        affine[world_axis, voxel_axis] = direction * spacing
        first = lo_xyz_mm[world_axis] + 0.5 * spacing
        affine[world_axis, 3] = first if direction > 0 else first + (n - 1) * spacing
    return (shape[0], shape[1], shape[2]), affine


def world_coordinates(shape_ijk: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World mm of every voxel centre: float64 array (3, I, J, K)."""
    ijk = np.indices(shape_ijk, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return xyz.reshape((3, *shape_ijk))
