"""One training step's math, shared by the distributed trainer, the CPU demo and the GPU benchmark.

It knows nothing of Ray or DeepSpeed: the caller owns the optimiser step and passes the reduction
that makes the batch Dice global under data parallelism (:func:`multitalent.losses.all_reduce_sum`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from multitalent.catalog import Catalog
from multitalent.data.augment import AugmentConfig, augment_batch
from multitalent.losses import (
    DeepSupervisionLoss,
    LabelTargets,
    MergedSoftmaxLoss,
    PartialLabelLoss,
    deep_supervision_weights,
    downsample_labels,
    merged_targets_from_labels,
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
        self,
        catalog: Catalog,
        *,
        n_levels: int,
        dice: str = "batch",
        reduction: str = "mean",
        dense_targets: bool = False,
        upcast_logits: bool = False,
    ) -> None:
        """``dice`` (``batch``/``sample``) and ``reduction`` (``mean``/``sum``): see
        :class:`~multitalent.losses.PartialLabelLoss` for the three readings of the paper's Eq. 2.
        For benchmarks (bench/gpu_levers.py), the former ways, with the same loss and gradients:
        ``dense_targets`` builds every level's full (B, K, ...) targets first, as before the loss made the
        annotated rows itself; ``upcast_logits`` copies all the logits to float32 first, as before the
        loss upcast the rows it visits."""
        super().__init__()
        self.dense_targets, self.upcast_logits = dense_targets, upcast_logits
        self.region_lut: Tensor
        self.register_buffer("region_lut", torch.as_tensor(catalog.region_lut()), persistent=False)
        weights = deep_supervision_weights(n_levels) if n_levels > 1 else [1.0]
        loss = PartialLabelLoss(dice=dice, reduction=reduction)  # type: ignore[arg-type]
        self.loss = DeepSupervisionLoss(loss, weights)

    def forward(
        self, net: nn.Module, inputs: StepInputs, *, reduce: Reduce | None = None
    ) -> tuple[Tensor, dict]:
        # The annotated flags, read to the host once for every level and before the forward is queued (a
        # read after it would wait for the whole forward); not under compile (a graph break).
        compiling = torch.compiler.is_compiling()
        flags = None if compiling else tuple(inputs.annotated_bk.reshape(-1).tolist())
        # bf16 logits stay bf16 here: the loss upcasts the rows it visits, chunk by chunk (the same values as
        # upcasting everything first, without a float32 copy of every head's logits: 1.5 GB at 47 heads).
        levels, labels = _levels_and_labels(net, inputs, upcast=self.upcast_logits)
        if self.dense_targets:
            dense = [targets_from_labels(lab, inputs.dataset_idx_b, self.region_lut) for lab in labels]
            return self.loss(levels, dense, inputs.annotated_bk, reduce=reduce)
        # Targets stay labels + region table: the loss makes the annotated rows only, chunk by chunk.
        targets = [
            LabelTargets.make(lab, inputs.dataset_idx_b, self.region_lut, annotated_r=flags) for lab in labels
        ]
        return self.loss(levels, targets, inputs.annotated_bk, reduce=reduce)


def _levels_and_labels(
    net: nn.Module, inputs: StepInputs, *, upcast: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """The network's output levels, as float32 with ``upcast`` (a loss computed in bf16 would lose its small
    Dice/BCE differences; pass False to a loss that upcasts itself), and the raw label map downsampled to
    each level's shape."""
    outputs = net(inputs.image_bczyx)
    levels = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    if upcast:
        levels = [o.float() for o in levels]
    return levels, downsample_labels(inputs.label_bzyx, [o.shape[2:] for o in levels])


class MergedSoftmaxObjective(nn.Module):
    """The naive baseline (``architecture.output: merged_softmax``): raw labels -> merged labels through
    the catalog's naive merge (:func:`multitalent.catalog.merge.merge_by_name`; classes of one name
    merged, unannotated structures background), deep supervision, softmax CE + Dice
    (:class:`~multitalent.losses.MergedSoftmaxLoss`). Same call as :class:`MultiTalentObjective`."""

    def __init__(self, catalog: Catalog, *, n_levels: int, dice: str = "batch") -> None:
        from multitalent.catalog.merge import merge_by_name

        super().__init__()
        self.merged = merge_by_name(catalog)
        self.lut_dv: Tensor
        self.register_buffer("lut_dv", torch.as_tensor(self.merged.lut_dv), persistent=False)
        weights = deep_supervision_weights(n_levels) if n_levels > 1 else [1.0]
        self.loss = DeepSupervisionLoss(MergedSoftmaxLoss(dice=dice), weights)  # type: ignore[arg-type]

    def forward(
        self, net: nn.Module, inputs: StepInputs, *, reduce: Reduce | None = None
    ) -> tuple[Tensor, dict]:
        levels, labels = _levels_and_labels(net, inputs)
        targets = [merged_targets_from_labels(lab, inputs.dataset_idx_b, self.lut_dv) for lab in labels]
        return self.loss(levels, targets, inputs.annotated_bk, reduce=reduce)


class ObjectiveBuilder(Protocol):
    """Builds the objective of an output kind: ``(catalog, n_levels=, dice=, reduction=) -> module``
    whose ``forward(net, inputs, reduce=None)`` returns ``(loss, metrics)``."""

    def __call__(self, catalog: Catalog, *, n_levels: int, dice: str, reduction: str) -> nn.Module: ...


def _partial_label(catalog: Catalog, *, n_levels: int, dice: str, reduction: str) -> nn.Module:
    return MultiTalentObjective(catalog, n_levels=n_levels, dice=dice, reduction=reduction)


def _merged_softmax(catalog: Catalog, *, n_levels: int, dice: str, reduction: str) -> nn.Module:
    return MergedSoftmaxObjective(catalog, n_levels=n_levels, dice=dice)  # no partial labels to reduce


# The objective of each output kind (multitalent.models.outputs registers the kinds themselves).
_OBJECTIVES: dict[str, ObjectiveBuilder] = {
    "sigmoid_heads": _partial_label,
    "merged_softmax": _merged_softmax,
}


def register_objective(output: str, builder: ObjectiveBuilder) -> None:
    """Train models of output kind ``output`` (registered in :mod:`multitalent.models.outputs`) with
    ``builder``'s objective."""
    from multitalent.models.outputs import output_kind

    output_kind(output)  # raises for an unregistered kind
    if output in _OBJECTIVES:
        raise ValueError(f"output kind {output!r} already has an objective")
    _OBJECTIVES[output] = builder


def build_objective(output: str, catalog: Catalog, *, n_levels: int, dice: str, reduction: str) -> nn.Module:
    """The training objective of output kind ``output`` (``architecture.output`` of the job)."""
    if output not in _OBJECTIVES:
        raise ValueError(f"no training objective for output kind {output!r}; known: {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[output](catalog, n_levels=n_levels, dice=dice, reduction=reduction)


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
