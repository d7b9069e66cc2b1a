"""U-Net topology from patch size and voxel spacing, the way nnU-Net's planner derives it.

Pure Python (no torch), so the plan can be printed and tested without building a network.

The rule (nnU-Net v2 ``get_pool_and_conv_props``, itself v1's ``get_pool_and_conv_props_v2``): keep
halving every axis whose feature map is still at least ``2 * min_feature_map_size`` voxels and whose current
spacing is within a factor 2 of the finest such axis; stop when no axis qualifies, or when only one would and
it is shorter than ``3 * min_feature_map_size``. An axis gets 3-wide kernels once its spacing is within a
factor 2 of the finest spacing (and keeps them); coarser axes get 1-wide kernels until then. The bottleneck
always uses 3-wide kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetTopology:
    """Per-stage strides and kernel sizes of a U-Net encoder, axes (z, y, x).

    ``strides_zyx[0]`` is the stem (always 1, 1, 1); stage ``s`` downsamples by ``strides_zyx[s]``.
    """

    strides_zyx: tuple[tuple[int, int, int], ...]
    kernel_sizes_zyx: tuple[tuple[int, int, int], ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides_zyx)

    @property
    def divisible_by_zyx(self) -> tuple[int, int, int]:
        """Input sizes must be multiples of this so every skip connection lines up."""
        return cumulative_stride(self.strides_zyx, len(self.strides_zyx) - 1)

    def bottleneck_size_zyx(self, patch_size_zyx: Sequence[int]) -> tuple[int, int, int]:
        div = self.divisible_by_zyx
        return (patch_size_zyx[0] // div[0], patch_size_zyx[1] // div[1], patch_size_zyx[2] // div[2])


def cumulative_stride(strides_zyx: Sequence[Sequence[int]], stage: int) -> tuple[int, int, int]:
    """Total downsampling from the input to the output of ``stage`` (0 = stem)."""
    total = [1, 1, 1]
    for stride in strides_zyx[: stage + 1]:
        total = [t * s for t, s in zip(total, stride)]
    return (total[0], total[1], total[2])


def plan_unet_topology(
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    *,
    min_feature_map_size: int = 4,
    max_pools: int | None = None,
) -> UNetTopology:
    """Plan strides and kernel sizes for ``patch_size_zyx`` voxels at ``spacing_zyx_mm``.

    Args:
        patch_size_zyx: training patch in voxels, (z, y, x).
        spacing_zyx_mm: voxel spacing of that patch, (z, y, x), in mm.
        min_feature_map_size: smallest edge of a bottleneck feature map (nnU-Net: 4).
        max_pools: cap on the number of downsampling steps (``None``: no cap). Tiny test networks use it.

    Raises:
        ValueError: a size or spacing is not positive, or does not have three entries.
    """
    if len(patch_size_zyx) != 3 or len(spacing_zyx_mm) != 3:
        raise ValueError(
            "patch_size_zyx and spacing_zyx_mm need 3 entries (z, y, x), "
            f"got {patch_size_zyx}, {spacing_zyx_mm}"
        )
    if any(int(s) <= 0 for s in patch_size_zyx) or any(float(s) <= 0 for s in spacing_zyx_mm):
        raise ValueError(f"patch size and spacing must be positive, got {patch_size_zyx}, {spacing_zyx_mm}")
    size = [int(s) for s in patch_size_zyx]
    spacing = [float(s) for s in spacing_zyx_mm]
    kernel = [1, 1, 1]
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    kernels: list[tuple[int, int, int]] = []

    while max_pools is None or len(strides) - 1 < max_pools:
        big_enough = [a for a in range(3) if size[a] >= 2 * min_feature_map_size]
        if not big_enough:
            break
        finest = min(spacing[a] for a in big_enough)
        axes = [a for a in big_enough if spacing[a] / finest < 2]
        # Halving a single axis alone only pays off while it stays well above the minimum.
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map_size:
            break
        finest_overall = min(spacing)
        for a in range(3):
            if spacing[a] / finest_overall < 2:
                kernel[a] = 3
        stride = [2 if a in axes else 1 for a in range(3)]
        for a in axes:
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append((stride[0], stride[1], stride[2]))
        kernels.append((kernel[0], kernel[1], kernel[2]))
    kernels.append((3, 3, 3))
    return UNetTopology(strides_zyx=tuple(strides), kernel_sizes_zyx=tuple(kernels))
