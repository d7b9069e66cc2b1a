"""One training step's math, shared by the distributed trainer, the CPU demo and the GPU benchmark.

It knows nothing of Ray or DeepSpeed: the caller owns the optimiser step and passes the reduction
that makes the batch Dice global under data parallelism (:func:`multitalent.losses.all_reduce_sum`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multitalent.catalog import Catalog
from multitalent.data.augment import AugmentConfig, augment_batch
from multitalent.losses import (
    DeepSupervisionLoss,
    PartialLabelLoss,
    deep_supervision_weights,
    downsample_labels,
    targets_from_labels,
)

Reduce = Callable[[Tensor], Tensor]


@dataclass
class StepInputs:
    """A batch on the training device: image (B, 1, z, y, x) float32, raw labels (B, z, y, x)."""

    image_bczyx: Tensor
    label_bzyx: Tensor
    dataset_idx_b: Tensor
    annotated_bk: Tensor


class MultiTalentObjective(nn.Module):
    """Targets from raw labels (a gather through the catalog's region table), deep supervision,
    and the partial-label loss. ``forward(net, inputs, reduce=None) -> (loss, metrics)``."""

    def __init__(
        self, catalog: Catalog, *, n_levels: int, dice: str = "batch", reduction: str = "mean"
    ) -> None:
        """``dice`` (``batch``/``sample``) and ``reduction`` (``mean``/``sum``): see
        :class:`~multitalent.losses.PartialLabelLoss` for the three readings of the paper's Eq. 2."""
        super().__init__()
        self.region_lut: Tensor
        self.register_buffer("region_lut", torch.as_tensor(catalog.region_lut()), persistent=False)
        weights = deep_supervision_weights(n_levels) if n_levels > 1 else [1.0]
        loss = PartialLabelLoss(dice=dice, reduction=reduction)  # type: ignore[arg-type]
        self.loss = DeepSupervisionLoss(loss, weights)

    def forward(
        self, net: nn.Module, inputs: StepInputs, *, reduce: Reduce | None = None
    ) -> tuple[Tensor, dict]:
        outputs = net(inputs.image_bczyx)
        levels = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        # bf16 logits (DeepSpeed bf16 engines) would lose the loss's small Dice/BCE differences.
        levels = [o.float() for o in levels]
        labels = downsample_labels(inputs.label_bzyx, [o.shape[2:] for o in levels])
        lut = self.region_lut
        targets = [targets_from_labels(lab, inputs.dataset_idx_b, lut) for lab in labels]
        return self.loss(levels, targets, inputs.annotated_bk, reduce=reduce)


def augment_inputs(
    inputs: StepInputs,
    *,
    config: AugmentConfig,
    generator: torch.Generator,
    out_shape_zyx: tuple[int, int, int] | None = None,
) -> StepInputs:
    """Augment on the inputs' device (GPU inside the step, or CPU in the loader)."""
    image, label = augment_batch(
        inputs.image_bczyx,
        inputs.label_bzyx,
        config=config,
        generator=generator,
        out_shape_zyx=out_shape_zyx,
        dataset_idx_b=inputs.dataset_idx_b,
    )
    return StepInputs(image, label, inputs.dataset_idx_b, inputs.annotated_bk)
