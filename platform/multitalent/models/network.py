"""MultiTalentNet: a shared backbone, per-dataset groups of sigmoid heads at every deep-supervision level."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from multitalent.models.backbones import Backbone
from multitalent.models.heads import HeadGroups


class MultiTalentNet(nn.Module):
    """Backbone + head groups; returns logits (the sigmoid belongs to the loss and to inference).

    ``output`` names what the channels mean (:mod:`multitalent.models.outputs`): ``sigmoid_heads``, one
    channel per (dataset, class); ``merged_softmax``, one group of softmax channels over merged labels.

    ``forward(x_bczyx)`` with ``x_bczyx`` float ``(B, in_channels, z, y, x)``, each spatial size a multiple of
    ``divisible_by_zyx``, returns:

    - ``deep_supervision`` on: a list of ``(B, K, z / s_z, y / s_y, x / s_x)`` logits, one per level, highest
      resolution first, ``(s_z, s_y, s_x) = ds_strides_zyx[level]``;
    - off: the full-resolution ``(B, K, z, y, x)`` logits alone.

    ``K = num_classes = sum(head_groups)``; the channels of head group ``g`` are ``group_slices[g]``.
    State dict keys: ``backbone.*`` (shared) and ``heads.<level>.groups.<group>.*``.
    """

    def __init__(
        self,
        *,
        arch: str,
        size: str,
        backbone: Backbone,
        heads: Sequence[int],
        deep_supervision: bool,
        in_channels: int,
        patch_size_zyx: Sequence[int],
        output: str = "sigmoid_heads",
    ) -> None:
        super().__init__()
        if len(heads) == 0:
            raise ValueError(f"{arch}: heads must list the number of classes of at least one dataset")
        self.arch = arch
        self.size = size
        # what the channels mean (multitalent.models.outputs): recorded so inference reads them right
        self.output = output
        self.in_channels = int(in_channels)
        self.patch_size_zyx = tuple(int(p) for p in patch_size_zyx)
        self.feature_channels = backbone.feature_channels
        self.ds_strides_zyx = backbone.ds_strides_zyx
        self.divisible_by_zyx = backbone.divisible_by_zyx
        self.backbone_config = dict(backbone.config)
        self.backbone = backbone.module
        self.heads = nn.ModuleList(HeadGroups(c, heads) for c in backbone.feature_channels)
        self._deep_supervision = bool(deep_supervision)

    # -- head groups -----------------------------------------------------------------------------------------
    @property
    def head_groups(self) -> tuple[int, ...]:
        """Classes per head group (dataset), in output-channel order."""
        return self._level_heads(0).group_sizes

    @property
    def num_classes(self) -> int:
        return sum(self.head_groups)

    @property
    def group_slices(self) -> tuple[slice, ...]:
        """Output-channel range of each head group."""
        slices, start = [], 0
        for n in self.head_groups:
            slices.append(slice(start, start + n))
            start += n
        return tuple(slices)

    def add_head_group(self, n_classes: int) -> int:
        """Append a new dataset's heads (one fresh 1x1x1 conv per level); returns the group index.

        Outputs of the existing groups stay bit-identical: each group's conv runs on its own.
        """
        indices = {heads.add_group(n_classes) for heads in self._all_level_heads()}
        (index,) = indices
        return index

    def _level_heads(self, level: int) -> HeadGroups:
        heads = self.heads[level]
        assert isinstance(heads, HeadGroups)
        return heads

    def _all_level_heads(self) -> list[HeadGroups]:
        return [self._level_heads(i) for i in range(len(self.heads))]

    # -- deep supervision ------------------------------------------------------------------------------------
    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, on: bool) -> None:
        self._deep_supervision = bool(on)

    @property
    def ds_levels(self) -> int:
        """Number of outputs with deep supervision on (1 for SwinUNETR)."""
        return len(self.feature_channels)

    # -- parameters for fine-tuning --------------------------------------------------------------------------
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.heads.parameters()

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Shared weights only, keys relative to the backbone (load with ``load_backbone_state_dict``)."""
        return dict(self.backbone.state_dict())

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Load pretrained shared weights; the heads keep their (fresh) values."""
        self.backbone.load_state_dict(state_dict, strict=strict)

    # -- forward ---------------------------------------------------------------------------------------------
    def _check_input(self, x_bczyx: torch.Tensor) -> None:
        if x_bczyx.ndim != 5 or x_bczyx.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch}: expected input (B, {self.in_channels}, z, y, x), got {tuple(x_bczyx.shape)}"
            )
        spatial = tuple(int(s) for s in x_bczyx.shape[2:])
        if any(s % d for s, d in zip(spatial, self.divisible_by_zyx)):
            raise ValueError(
                f"{self.arch}: spatial size {spatial} must be a multiple of {self.divisible_by_zyx} "
                "on every axis"
            )

    def forward(self, x_bczyx: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        self._check_input(x_bczyx)
        features = self.backbone(x_bczyx)
        if isinstance(features, torch.Tensor):
            features = [features]
        if len(features) != len(self.heads):
            raise RuntimeError(
                f"{self.arch}: backbone gave {len(features)} levels, expected {len(self.heads)}"
            )
        if not self._deep_supervision:
            return self.heads[0](features[0])
        return [heads(f) for heads, f in zip(self.heads, features)]

    # -- description -----------------------------------------------------------------------------------------
    def build_kwargs(self) -> dict[str, Any]:
        """Arguments of ``build_network`` that rebuild this network (current head groups included)."""
        return {
            "arch": self.arch,
            "heads": list(self.head_groups),
            "size": self.size,
            "deep_supervision": self._deep_supervision,
            "in_channels": self.in_channels,
            "patch_size_zyx": list(self.patch_size_zyx),
            "spacing_zyx_mm": list(self.backbone_config["spacing_zyx_mm"]),
            "gradient_checkpointing": bool(self.backbone_config.get("gradient_checkpointing", False)),
            "output": self.output,
        }

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: architecture, parameter counts, deep-supervision levels, topology."""
        n_backbone = sum(p.numel() for p in self.backbone_parameters())
        n_heads = sum(p.numel() for p in self.head_parameters())
        return {
            "arch": self.arch,
            "size": self.size,
            "parameters": {"total": n_backbone + n_heads, "backbone": n_backbone, "heads": n_heads},
            "num_classes": self.num_classes,
            "head_groups": list(self.head_groups),
            "output": self.output,
            "deep_supervision": self._deep_supervision,
            "ds_levels": self.ds_levels,
            "ds_strides_zyx": [list(s) for s in self.ds_strides_zyx],
            "feature_channels": list(self.feature_channels),
            "in_channels": self.in_channels,
            "patch_size_zyx": list(self.patch_size_zyx),
            "divisible_by_zyx": list(self.divisible_by_zyx),
            "backbone": self.backbone_config,
        }
