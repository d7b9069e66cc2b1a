"""Multiply-add count of one forward pass, computed on the meta device (no memory, no compute).

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts: convolutions (transposed included),
matrix products and attention; norms, activations and other element-wise work are left out. The paper's
"0.72 TFLOP per forward patch" for the U-Net matches this count's multiply-adds (``macs``), not ``2 * macs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class FlopCount:
    """Work of one forward pass of ``batch_size`` patches of ``patch_size_zyx``."""

    macs: int  # multiply-adds
    by_operator_macs: dict[str, int]
    patch_size_zyx: tuple[int, int, int]
    batch_size: int

    @property
    def flops(self) -> int:
        """Floating-point operations, two per multiply-add."""
        return 2 * self.macs


def count_forward_macs(
    net: nn.Module,
    *,
    patch_size_zyx: Sequence[int] | None = None,
    batch_size: int = 1,
    in_channels: int | None = None,
) -> FlopCount:
    """Count multiply-adds of ``net(x)`` for ``x`` of shape ``(batch_size, in_channels, *patch_size_zyx)``.

    ``patch_size_zyx`` and ``in_channels`` default to the network's own (a ``MultiTalentNet``). The network is
    run with meta copies of its parameters and buffers, so its weights are neither copied nor touched.
    """
    patch = tuple(int(p) for p in (patch_size_zyx or getattr(net, "patch_size_zyx", None) or ()))
    channels = int(in_channels or getattr(net, "in_channels", 0) or 0)
    if len(patch) != 3 or channels <= 0:
        raise ValueError(
            "count_forward_macs needs patch_size_zyx (3 sizes) and in_channels for a plain module"
        )
    # One name per tensor, and no tie-following: dna blocks reach the same conv module under two names, and
    # swapping its attribute twice would leave a meta tensor behind on restore.
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*net.named_parameters(), *net.named_buffers()]
    }
    x = torch.empty((batch_size, channels, *patch), device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        functional_call(net, meta_state, (x,), tie_weights=False)
    by_operator = {str(op): int(n) // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    return FlopCount(
        macs=int(counter.get_total_flops()) // 2,
        by_operator_macs=by_operator,
        patch_size_zyx=(patch[0], patch[1], patch[2]),
        batch_size=batch_size,
    )
