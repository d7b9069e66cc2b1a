"""Deep supervision: one loss per decoder resolution, weighted 1/2^i, the lowest resolution weighted 0."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduce = Callable[[Tensor], Tensor]
LevelLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def deep_supervision_weights(n_levels: int) -> list[float]:
    """Weights of the ``n_levels`` outputs, level 0 = highest resolution.

    ``w_i ∝ 1/2^i``, the lowest resolution (``i = n_levels - 1``) weighted 0, normalised to sum 1
    (nnU-Net's scheme): 5 levels -> ``[8/15, 4/15, 2/15, 1/15, 0]``. One level (no deep supervision)
    -> ``[1.0]``.
    """
    if not isinstance(n_levels, int) or n_levels < 1:
        raise ValueError(f"deep_supervision_weights: n_levels must be an int >= 1, got {n_levels!r}")
    if n_levels == 1:
        return [1.0]
    raw = [1.0 / 2**i for i in range(n_levels - 1)] + [0.0]
    total = sum(raw)
    return [w / total for w in raw]


def downsample_targets(target_bkzyx: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Targets at each deep-supervision resolution, by nearest-neighbour interpolation.

    nnU-Net downsamples segmentations for deep supervision with nearest-neighbour interpolation
    (order 0, no anti-aliasing); for binary per-class targets this keeps them binary and is what the
    reference did. Mode ``nearest-exact`` picks, for each output voxel, the input voxel nearest to its
    centre (for a factor 2 this is one fixed voxel of each 2x2x2 block).

    Nearest-neighbour picking commutes with the per-voxel LUT gather, so downsampling the raw
    ``label_bzyx`` and calling :func:`targets_from_labels` per level gives the same targets at a K-th
    of the cost: ``downsample_targets(t, s)[i] == targets_from_labels(downsample_labels(label, s)[i], ...)``.

    Args:
        target_bkzyx: (B, K, *spatial) bool, uint8 or floating; also accepts (B, *spatial) label maps
            via :func:`downsample_labels`.
        shapes: the spatial shape of each level (e.g. ``[o.shape[2:] for o in outputs]``).

    Returns:
        One tensor per shape, same dtype as the input; a level whose shape equals the input's is the
        input itself (no copy).
    """
    if target_bkzyx.ndim < 3:
        raise ValueError(
            f"downsample_targets: target must be (B, K, *spatial), got shape {tuple(target_bkzyx.shape)}"
        )
    return _resize_nearest(target_bkzyx, shapes, channel_axis=True, where="downsample_targets")


def downsample_labels(label_bzyx: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Raw label maps (B, *spatial) at each shape, nearest-neighbour (see :func:`downsample_targets`)."""
    if label_bzyx.ndim < 2:
        raise ValueError(
            f"downsample_labels: label must be (B, *spatial), got shape {tuple(label_bzyx.shape)}"
        )
    return _resize_nearest(label_bzyx, shapes, channel_axis=False, where="downsample_labels")


def _resize_nearest(
    t: Tensor, shapes: Sequence[Sequence[int]], *, channel_axis: bool, where: str
) -> list[Tensor]:
    n_spatial = t.ndim - (2 if channel_axis else 1)
    spatial = tuple(t.shape[-n_spatial:])
    out: list[Tensor] = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if len(shape) != n_spatial or any(s < 1 for s in shape):
            raise ValueError(f"{where}: level shape {shape} does not fit spatial shape {spatial}")
        if shape == spatial:
            out.append(t)
            continue
        # interpolate() takes (B, C, *spatial) and no bool; uint8 is supported for nearest modes.
        x = t if channel_axis else t.unsqueeze(1)
        work = x.to(torch.uint8) if x.dtype == torch.bool else x
        small = F.interpolate(work, size=shape, mode="nearest-exact")
        small = small.to(t.dtype)
        out.append(small if channel_axis else small.squeeze(1))
    return out


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a per-level loss over the decoder outputs.

    Args:
        loss: the per-level loss, called as ``loss(logits, target, annotated_bk, reduce=reduce)`` and
            returning ``(loss, metrics)`` (e.g. :class:`PartialLabelLoss`).
        weights: one weight per level, level 0 = highest resolution (see
            :func:`deep_supervision_weights`).
        skip_zero_weight: skip levels of weight 0. Off by default: a skipped level leaves its head
            without a gradient, which DDP (without ``find_unused_parameters``) rejects; evaluated with
            weight 0 it adds exactly 0 to the loss and to every gradient, for one tiny extra reduction.

    Call: ``loss, metrics = ds(logits_levels, targets, annotated_bk, reduce=None)`` with
    ``logits_levels`` one (B, K, *spatial_i) tensor per level and ``targets`` either one target per
    level or the full-resolution target (B, K, *spatial_0), downsampled here with
    :func:`downsample_targets`.

    Returns the weighted loss and the metrics of level 0 (the highest resolution), with ``loss`` the
    weighted total and ``loss_level{i}`` each level's unweighted loss (detached).
    """

    def __init__(self, loss: LevelLoss, weights: Sequence[float], *, skip_zero_weight: bool = False) -> None:
        super().__init__()
        weights = [float(w) for w in weights]
        if not weights:
            raise ValueError("DeepSupervisionLoss: weights is empty")
        if any(not w >= 0 for w in weights):
            raise ValueError(f"DeepSupervisionLoss: weights must be finite and >= 0, got {weights}")
        if weights[0] == 0:
            raise ValueError(
                f"DeepSupervisionLoss: the highest resolution must have weight > 0, got {weights}"
            )
        self.loss = loss
        self.weights = weights
        self.skip_zero_weight = skip_zero_weight

    def extra_repr(self) -> str:
        return f"weights={[round(w, 6) for w in self.weights]}, skip_zero_weight={self.skip_zero_weight}"

    def forward(
        self,
        logits_levels: Sequence[Tensor],
        targets: Tensor | Sequence[Tensor],
        annotated_bk: Tensor,
        *,
        reduce: Reduce | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(logits_levels, Tensor):
            raise TypeError("DeepSupervisionLoss: logits_levels must be a sequence of tensors, one per level")
        if len(logits_levels) != len(self.weights):
            raise ValueError(
                f"DeepSupervisionLoss: {len(logits_levels)} outputs but {len(self.weights)} weights"
            )
        if isinstance(targets, Tensor):
            targets = downsample_targets(targets, [o.shape[2:] for o in logits_levels])
        if len(targets) != len(logits_levels):
            raise ValueError(f"DeepSupervisionLoss: {len(logits_levels)} outputs but {len(targets)} targets")

        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for i, (w, logits, target) in enumerate(zip(self.weights, logits_levels, targets)):
            if w == 0 and self.skip_zero_weight:
                continue
            level_loss, level_metrics = self.loss(logits, target, annotated_bk, reduce=reduce)
            if i == 0:
                metrics = dict(level_metrics)
            metrics[f"loss_level{i}"] = level_loss.detach()
            total = w * level_loss if total is None else total + w * level_loss
        assert total is not None  # level 0 has weight > 0
        metrics["loss"] = total.detach()
        return total, metrics
