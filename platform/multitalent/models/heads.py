"""Per-dataset groups of sigmoid segmentation heads on one feature map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def init_head_conv(conv: nn.Conv3d) -> None:
    """He-normal weights (negative slope 1e-2) and zero bias: nnU-Net's init for its segmentation layers."""
    nn.init.kaiming_normal_(conv.weight, a=1e-2)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class HeadGroups(nn.Module):
    """One 1x1x1 conv per head group (dataset), outputs concatenated along channels.

    ``forward``: features ``(B, C, z, y, x)`` -> logits ``(B, K, z, y, x)`` with ``K = sum(group_sizes)``;
    channels of group ``g`` follow those of groups ``0 .. g-1``.

    Each group is its own conv, computed on its own, so appending a group never changes the outputs of the
    existing ones, bit for bit (a single fused conv with more output channels could pick another kernel).
    """

    def __init__(self, in_channels: int, group_sizes: Sequence[int]) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.in_channels = int(in_channels)
        self.groups = nn.ModuleList()
        for n_classes in group_sizes:
            self.add_group(n_classes)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(conv.out_channels for conv in self.groups if isinstance(conv, nn.Conv3d))

    @property
    def out_channels(self) -> int:
        return sum(self.group_sizes)

    def add_group(self, n_classes: int) -> int:
        """Append a freshly initialised conv with ``n_classes`` outputs; returns the group's index.

        The new conv is created on the device and dtype of the existing ones.
        """
        if int(n_classes) <= 0:
            raise ValueError(f"a head group needs at least one class, got {n_classes}")
        like = next(iter(self.groups.parameters()), None)
        conv = nn.Conv3d(self.in_channels, int(n_classes), kernel_size=1, bias=True)
        init_head_conv(conv)
        if like is not None:
            conv.to(device=like.device, dtype=like.dtype)
        self.groups.append(conv)
        return len(self.groups) - 1

    def forward(self, features_bczyx: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 0:
            raise RuntimeError("HeadGroups has no groups; add one with add_group(n_classes)")
        outputs = [conv(features_bczyx) for conv in self.groups]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, group_sizes={self.group_sizes}"
