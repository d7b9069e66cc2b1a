"""The partial-label loss of MultiTalent (paper Eq. 2).

Notation: ``x[b, k, v]`` logits, ``p = sigmoid(x)``, ``y[b, k, v]`` binary targets, ``a[b, k]`` whether
sample ``b``'s source dataset annotates global class ``k``, ``N_b`` voxels per sample, ``bce_bk`` =
``1/N_b sum_v bce(x[b,k,v], y[b,k,v])`` (the voxel mean of one sample). For each class ``k`` (sums over the
*global* batch: every rank's samples when ``reduce`` is an all-reduce):

    n_k     = sum_b a[b,k]                                       annotated samples of class k
    BCE_k   = 1/n_k * sum_b a[b,k] bce_bk                        reduction="mean" (default)
    BCE_k   =         sum_b a[b,k] bce_bk                        reduction="sum"
    tp_k    = sum_b a[b,k] sum_v p*y,  fp_k = sum_b a[b,k] sum_v p*(1-y),  fn_k = sum_b a[b,k] sum_v (1-p)*y
    Dice_k  = 2 tp_k / max(2 tp_k + fp_k + fn_k, eps)                     dice="batch" (default)
    Dice_k  = R_b a[b,k] * 2tp_bk / max(2tp_bk + fp_bk + fn_bk, eps)       dice="sample"
              (R = 1/n_k sum_b for reduction="mean", sum_b for reduction="sum")
    L       = sum_{k: n_k > 0} (BCE_k - Dice_k)

Three readings of Eq. 2, all expressible here (``docs/fidelity.md`` compares them):

- **paper, literal** -- ``reduction="sum", dice="batch"``: Eq. 2 with ``1/I`` the voxels of *one* image and
  ``sum_z`` over batch and voxels, so the BCE grows with the number of annotated samples of the batch
  while the batch Dice stays one ratio per class.
- **reference code** -- ``reduction="sum", dice="sample"``: ``BCEWithLogitsLoss()`` (a voxel mean) per
  annotated (sample, class), summed; per-sample Dice summed (its gather stacks rather than concatenates,
  so its "batch" Dice is per local batch slot). Exact on one process. Under DDP the reference sums over
  each rank's *local* batch and DDP averages the gradients, i.e. it optimises this sum divided by the
  world size, with Dice pooled per local slot across ranks; this module's ``sum`` is over the global
  batch, the same on 1 and on N processes.
- **this platform's default** -- ``reduction="mean", dice="batch"``: the BCE a voxel mean over every
  annotated voxel of the class (``I = n_k * N``), the Dice the paper's batch Dice; the BCE:Dice balance of
  a class does not depend on how many samples of the batch annotate it.

Classes are summed, not averaged, so the gradient reaching one head does not depend on how many other
classes its dataset (or the batch) has; gradient clipping absorbs the larger magnitude. A class with
``n_k = 0`` contributes exactly 0 to the loss and exactly 0 to the gradient.

A class annotated but absent (``sum y = 0`` over its annotated samples): ``tp = fn = 0``, so Dice = 0
and ``dDice/dp_v = (2 y_v D - 2 tp) / D^2 = 0`` for every voxel (``D = 2tp + fp + fn``; also 0 where the
``eps`` clamp is active): no Dice gradient, while BCE still pushes its false positives down. In batch mode
a sample without the class whose batch-mate has it *does* get a Dice gradient (``-2 tp / D^2`` per unit
of ``p``) -- that is what pooling the batch means. In sample mode such a sample has Dice 0 with no gradient
but still counts in ``n_k`` (as in the reference code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from multitalent.losses.label_targets import LabelTargets
from multitalent.losses.voxel_sums import DEFAULT_CHUNK_ELEMENTS, voxel_sums

Reduce = Callable[[Tensor], Tensor]
DiceMode = Literal["batch", "sample"]
Reduction = Literal["mean", "sum"]

# Rows of the per-class statistics handed to ``reduce`` (every row is a sum over samples, so summing
# it over ranks gives the statistics of the concatenated batch).
_ROWS = ("tp", "fp", "fn", "bce", "samples", "dice_sample", "tp_hard", "fp_hard", "fn_hard")
_ROW = {name: i for i, name in enumerate(_ROWS)}
_TARGET_DTYPES = (torch.bool, torch.uint8)


class PartialLabelLoss(nn.Module):
    """BCE + soft Dice per class, counted only where the sample's dataset annotates the class.

    Args:
        dice: ``"batch"`` (paper): tp/fp/fn are summed over all annotated samples of the (global) batch
            before the ratio. ``"sample"``: the reference code's variant, one Dice per annotated
            (sample, class), combined over the annotated samples of each class by ``reduction``.
        reduction: how the per-(sample, class) terms -- the BCE, and the Dice in ``"sample"`` mode --
            combine over a class's annotated samples: ``"mean"`` (default) or ``"sum"`` (the reference
            code, and Eq. 2 read with ``I`` = the voxels of one image). See the module docstring.
        eps: lower bound of the Dice denominator (no smoothing term, as in the reference code).
        hard_metrics: also count tp/fp/fn of the hard prediction ``p > 0.5`` (i.e. ``logit > 0``) for
            the metrics (three extra reductions, no gradient).
        chunk_elements: elements per chunk of the voxel pass (memory of its transients; no effect on
            the result beyond float rounding).

    Call: ``loss, metrics = loss_fn(logits_bkzyx, target_bkzyx, annotated_bk, reduce=None)``

    - ``logits_bkzyx``: float (B, K, *spatial), any number >= 1 of spatial axes. Half-precision logits
      are upcast to float32; float64 stays float64.
    - ``target_bkzyx``: same shape, values in {0, 1}; bool, uint8 or floating (see
      :func:`multitalent.losses.targets_from_labels`). Values are not checked (that would need a host
      sync). Or :class:`~multitalent.losses.LabelTargets` of that shape: the same values, made row by row
      for the annotated rows only (the trainer's objective).
    - ``annotated_bk``: bool (B, K), ``catalog.annotated_mask()[dataset_idx_b]``.
    - ``reduce``: applied once to the stacked per-class statistics ``(len(_ROWS), K)`` before any ratio.
      ``None`` (one process) is the identity. Under data parallelism pass a *differentiable* all-reduce
      sum (:func:`multitalent.losses.all_reduce_sum`); then every rank's loss equals the single-process
      loss of the concatenated global batch, and the gradient w.r.t. a rank's own logits is
      ``world_size`` times the single-process one, which DDP's/DeepSpeed's gradient averaging
      (division by ``world_size``) turns back into exactly the single-process parameter gradient.

    Returns ``(loss, metrics)``: ``loss`` a 0-d tensor; ``metrics`` detached tensors on the logits'
    device (no host sync), all global when ``reduce`` is an all-reduce:
    ``loss``, ``loss_k``, ``bce_k`` and ``dice_k`` (the terms in the loss: ``loss_k = bce_k - dice_k``;
    sums over samples under ``reduction="sum"``), ``bce_mean_k`` (BCE per annotated voxel),
    ``dice_batch_k``, ``dice_sample_k`` (mean per-sample Dice; both Dice values in [0, 1]),
    ``tp_k``/``fp_k``/``fn_k`` (soft), ``tp_hard_k``/``fp_hard_k``/``fn_hard_k``
    (if ``hard_metrics``), ``annotated_k`` (annotated samples per class), ``num_annotated_classes``.

    Raises:
        TypeError: wrong dtypes. ValueError: inconsistent shapes or devices, bad ``dice``,
            ``reduction`` or ``eps``.
    """

    def __init__(
        self,
        *,
        dice: DiceMode = "batch",
        reduction: Reduction = "mean",
        eps: float = 1e-7,
        hard_metrics: bool = True,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        if dice not in ("batch", "sample"):
            raise ValueError(f"PartialLabelLoss: dice must be 'batch' or 'sample', got {dice!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"PartialLabelLoss: reduction must be 'mean' or 'sum', got {reduction!r}")
        if not eps > 0:
            raise ValueError(f"PartialLabelLoss: eps must be > 0, got {eps}")
        self.dice = dice
        self.reduction = reduction
        self.eps = float(eps)
        self.hard_metrics = hard_metrics
        if chunk_elements < 1:
            raise ValueError(f"PartialLabelLoss: chunk_elements must be >= 1, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)

    def extra_repr(self) -> str:
        return (
            f"dice={self.dice!r}, reduction={self.reduction!r}, eps={self.eps}, "
            f"hard_metrics={self.hard_metrics}, "
            f"chunk_elements={self.chunk_elements}"
        )

    def forward(
        self,
        logits_bkzyx: Tensor,
        target_bkzyx: Tensor | LabelTargets,
        annotated_bk: Tensor,
        *,
        reduce: Reduce | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        _validate(logits_bkzyx, target_bkzyx, annotated_bk)
        stats_rk = self.statistics(logits_bkzyx, target_bkzyx, annotated_bk)
        if reduce is not None:
            reduced = reduce(stats_rk)
            if not isinstance(reduced, Tensor) or reduced.shape != stats_rk.shape:
                got = tuple(reduced.shape) if isinstance(reduced, Tensor) else type(reduced).__name__
                raise ValueError(
                    f"PartialLabelLoss: reduce must return a tensor of shape "
                    f"{tuple(stats_rk.shape)}, got {got}"
                )
            stats_rk = reduced
        return self.loss_from_statistics(stats_rk)

    def statistics(
        self, logits_bkzyx: Tensor, target_bkzyx: Tensor | LabelTargets, annotated_bk: Tensor
    ) -> Tensor:
        """Per-class sums over the local batch, ``(len(_ROWS), K)``, differentiable in rows tp..dice."""
        sums_bk3, aux_bk4 = voxel_sums(
            logits_bkzyx,
            target_bkzyx,
            annotated_bk,
            hard=self.hard_metrics,
            chunk_elements=self.chunk_elements,
        )
        tp_bk, sum_p_bk, bce_sum_bk = sums_bk3.unbind(-1)
        sum_y_bk, tp_hard_bk, pred_hard_bk, _ = aux_bk4.unbind(-1)
        voxels = float(logits_bkzyx[0, 0].numel())
        # 2tp + fp + fn == sum(p) + sum(y); computed this way it cannot drift below 2tp by rounding.
        dice_bk = 2 * tp_bk / (sum_p_bk + sum_y_bk).clamp_min(self.eps)
        a_bk = annotated_bk
        rows = [
            tp_bk,
            sum_p_bk - tp_bk,  # fp
            sum_y_bk - tp_bk,  # fn
            bce_sum_bk / voxels,  # per-sample voxel mean
            a_bk.to(tp_bk.dtype),
            dice_bk,
            tp_hard_bk,
            pred_hard_bk - tp_hard_bk,
            sum_y_bk - tp_hard_bk,
        ]
        if not self.hard_metrics:
            rows[-2:] = [tp_hard_bk, tp_hard_bk]  # zeros
        # Mask at the (b, k) level too, so nothing of a non-annotated (b, k) reaches the sums.
        zero = tp_bk.new_zeros(())
        return torch.stack([torch.where(a_bk, r, zero).sum(0) for r in rows])

    def loss_from_statistics(self, stats_rk: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and metrics from (already reduced) statistics ``(len(_ROWS), K)``."""
        tp, fp, fn = stats_rk[_ROW["tp"]], stats_rk[_ROW["fp"]], stats_rk[_ROW["fn"]]
        n_k = stats_rk[_ROW["samples"]]
        annotated_k = n_k > 0
        zero = stats_rk.new_zeros(())
        n_safe = n_k.clamp_min(1)

        bce_sum_k, dice_sample_sum_k = stats_rk[_ROW["bce"]], stats_rk[_ROW["dice_sample"]]
        bce_mean_k = torch.where(annotated_k, bce_sum_k / n_safe, zero)
        dice_batch_k = torch.where(annotated_k, 2 * tp / (2 * tp + fp + fn).clamp_min(self.eps), zero)
        dice_sample_k = torch.where(annotated_k, dice_sample_sum_k / n_safe, zero)
        if self.reduction == "mean":
            bce_k, dice_sample_term_k = bce_mean_k, dice_sample_k
        else:  # the sums are already 0 where n_k = 0 (masked per (b, k) in ``statistics``)
            bce_k, dice_sample_term_k = bce_sum_k, dice_sample_sum_k
        dice_k = dice_batch_k if self.dice == "batch" else dice_sample_term_k
        loss_k = bce_k - dice_k
        loss = loss_k.sum()

        metrics = {
            "loss": loss,
            "loss_k": loss_k,
            "bce_k": bce_k,
            "bce_mean_k": bce_mean_k,
            "dice_k": dice_k,
            "dice_batch_k": dice_batch_k,
            "dice_sample_k": dice_sample_k,
            "tp_k": tp,
            "fp_k": fp,
            "fn_k": fn,
            "annotated_k": n_k,
            "num_annotated_classes": annotated_k.sum(),
        }
        if self.hard_metrics:
            metrics |= {f"{r}_k": stats_rk[_ROW[r]] for r in ("tp_hard", "fp_hard", "fn_hard")}
        return loss, {k: v.detach() for k, v in metrics.items()}


def _validate(logits: Tensor, target: Tensor | LabelTargets, annotated: Tensor) -> None:
    where = "PartialLabelLoss"
    for name, t in (("logits_bkzyx", logits), ("target_bkzyx", target), ("annotated_bk", annotated)):
        if not isinstance(t, Tensor) and not (name == "target_bkzyx" and isinstance(t, LabelTargets)):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{where}: logits_bkzyx must be floating point, got {logits.dtype}")
    if logits.ndim < 3:
        raise ValueError(f"{where}: logits_bkzyx must be (B, K, *spatial), got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0 or logits[0, 0].numel() == 0:
        raise ValueError(f"{where}: logits_bkzyx has an empty axis: shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        hint = (
            " (a raw label map? build targets with multitalent.losses.targets_from_labels)"
            if len(target.shape) == logits.ndim - 1
            else ""
        )
        raise ValueError(
            f"{where}: target_bkzyx shape {tuple(target.shape)} != logits shape {tuple(logits.shape)}{hint}"
        )
    if isinstance(target, Tensor) and not (target.dtype in _TARGET_DTYPES or target.is_floating_point()):
        raise TypeError(
            f"{where}: target_bkzyx must be bool, uint8 or floating (binary per-class targets), "
            f"got {target.dtype}; raw label maps go through multitalent.losses.targets_from_labels"
        )
    if annotated.dtype != torch.bool:
        raise TypeError(f"{where}: annotated_bk must be bool, got {annotated.dtype}")
    if tuple(annotated.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"{where}: annotated_bk shape {tuple(annotated.shape)} != (B, K) = {tuple(logits.shape[:2])}"
        )
    if target.device != logits.device or annotated.device != logits.device:
        raise ValueError(
            f"{where}: tensors on different devices: logits {logits.device}, target {target.device}, "
            f"annotated {annotated.device}"
        )
