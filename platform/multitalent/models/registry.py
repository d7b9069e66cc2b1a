"""Architectures by name, and ``build_network``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from multitalent.models.backbones import (
    SIZES,
    Backbone,
    build_plain_unet,
    build_resenc_unet,
    build_swin_unetr,
)
from multitalent.models.network import MultiTalentNet
from multitalent.models.outputs import available_outputs
from multitalent.preprocess.plan import DEFAULT_SPACING_ZYX_MM

PAPER_PATCH_SIZE_ZYX = (96, 192, 192)
PAPER_SPACING_ZYX_MM = DEFAULT_SPACING_ZYX_MM  # the plan's default target spacing is the paper's


class BackboneBuilder(Protocol):
    """Builds a :class:`Backbone` (features highest resolution first) for a size name and a patch."""

    def __call__(
        self,
        *,
        size: str,
        in_channels: int,
        patch_size_zyx: Sequence[int],
        spacing_zyx_mm: Sequence[float],
        gradient_checkpointing: bool = False,
    ) -> Backbone: ...


_ARCHITECTURES: dict[str, BackboneBuilder] = {
    "unet": build_plain_unet,
    "resenc_unet": build_resenc_unet,
    "swin_unetr": build_swin_unetr,
}


def available_architectures() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def register_architecture(name: str, builder: BackboneBuilder) -> None:
    """Make ``builder`` available to ``build_network`` as ``arch=name``."""
    if name in _ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    _ARCHITECTURES[name] = builder


def build_network(
    arch: str,
    heads: Sequence[int],
    *,
    size: str = "paper",
    deep_supervision: bool = True,
    in_channels: int = 1,
    patch_size_zyx: Sequence[int] = PAPER_PATCH_SIZE_ZYX,
    spacing_zyx_mm: Sequence[float] = PAPER_SPACING_ZYX_MM,
    gradient_checkpointing: bool = False,
    output: str = "sigmoid_heads",
) -> MultiTalentNet:
    """Build a MultiTalent network.

    Args:
        arch: ``"unet"``, ``"resenc_unet"``, ``"swin_unetr"`` or a registered name.
        heads: classes per head group (dataset), e.g. ``catalog.classes_per_dataset()``.
        size: ``"paper"`` (the paper's configuration; for ``resenc_unet`` the reference's fixed topology),
            ``"tiny"`` (tests, CPU demo), or ``"planned"`` (``resenc_unet`` only: the topology planned from
            ``patch_size_zyx`` as for the U-Net, this platform's earlier ResEnc).
        deep_supervision: return logits at every decoder level (a list), else the full-resolution tensor.
        in_channels: image channels (1 for CT).
        patch_size_zyx: training patch; the CNN topology is planned from it (nnU-Net rule).
        spacing_zyx_mm: voxel spacing of the patch, used by the planner.
        gradient_checkpointing: SwinUNETR only (MONAI ``use_checkpoint``).
        output: what the channels mean (:mod:`multitalent.models.outputs`); recorded on the network
            (``build_kwargs``, ``describe``) so that inference converts them to per-class logits.

    Raises:
        ValueError: unknown arch or size, empty or non-positive heads, a patch the topology cannot divide,
            or gradient checkpointing asked of a CNN.
    """
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {available_architectures()}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    if len(heads) == 0 or any(int(n) <= 0 for n in heads):
        raise ValueError(f"heads must be positive class counts, one per dataset, got {list(heads)}")
    if in_channels <= 0:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if output not in available_outputs():
        raise ValueError(f"unknown output kind {output!r}; choose one of {available_outputs()}")
    backbone = _ARCHITECTURES[arch](
        size=size,
        in_channels=in_channels,
        patch_size_zyx=patch_size_zyx,
        spacing_zyx_mm=spacing_zyx_mm,
        gradient_checkpointing=gradient_checkpointing,
    )
    return MultiTalentNet(
        arch=arch,
        size=size,
        backbone=backbone,
        heads=[int(n) for n in heads],
        deep_supervision=deep_supervision,
        in_channels=in_channels,
        patch_size_zyx=patch_size_zyx,
        output=output,
    )
