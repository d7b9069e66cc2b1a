"""The naive baseline's loss: softmax cross-entropy + soft Dice over merged labels (nnU-Net's ``DC_and_CE``).

The labels are those of :func:`multitalent.catalog.merge.merge_by_name`: each sample's raw label map
goes through its dataset's row of ``lut_dv`` (:func:`merged_targets_from_labels`), so a structure its
dataset does not annotate is background there, and every channel is supervised on every sample (there
is no partial-label mask; that is the point of the baseline).

Notation: ``z[b, c, v]`` logits over ``C`` channels (channel 0 background), ``p = softmax_c(z)``,
``y[b, c, v]`` the one-hot target, ``N`` voxels in the (global) batch. As nnU-Net v2 with
``do_bg=False``, ``smooth=1e-5`` and weights 1:

    CE      = -1/N sum_{b,v} log p[b, t(b,v), v]
    Dice_c  = (2 tp_c + s) / max(sum p_c + sum y_c + s, 1e-8),  tp_c = sum p_c y_c  (dice="batch": sums
              over the global batch; dice="sample": per sample, then the mean over samples)
    L       = CE - mean_{c >= 1} Dice_c

Under data parallelism ``reduce`` (a differentiable all-reduce sum, :func:`all_reduce_sum`) sums the
per-class statistics and the CE sums over the ranks before any ratio, as in
:class:`~multitalent.losses.PartialLabelLoss`: every rank's loss is that of the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduce = Callable[[Tensor], Tensor]
DiceMode = Literal["batch", "sample"]


def merged_targets_from_labels(
    label_bzyx: Tensor, dataset_idx_b: Tensor, lut_dv: Tensor | np.ndarray
) -> Tensor:
    """``target[b, ...] = lut_dv[dataset_idx_b[b], label_bzyx[b, ...]]``: int64 merged labels.

    Args:
        label_bzyx: (B, *spatial) raw label values of each sample's own dataset (any integer dtype).
        dataset_idx_b: (B,) index of each sample's dataset in the catalog.
        lut_dv: :attr:`MergedLabelSpace.lut_dv` (datasets, raw values), integer.

    Raises:
        TypeError / ValueError: wrong dtypes or shapes.
    """
    where = "merged_targets_from_labels"
    lut = torch.as_tensor(lut_dv, device=label_bzyx.device)
    if lut.ndim != 2 or lut.is_floating_point() or lut.dtype == torch.bool:
        raise ValueError(
            f"{where}: lut_dv must be an integer (datasets, values) table, got {lut.dtype} {tuple(lut.shape)}"
        )
    if label_bzyx.is_floating_point() or label_bzyx.dtype == torch.bool or label_bzyx.ndim < 2:
        raise TypeError(
            f"{where}: label_bzyx must be (B, *spatial) integer raw labels, got {label_bzyx.dtype} "
            f"{tuple(label_bzyx.shape)}"
        )
    b = label_bzyx.shape[0]
    if tuple(dataset_idx_b.shape) != (b,) or dataset_idx_b.is_floating_point():
        raise ValueError(
            f"{where}: dataset_idx_b must be (B,) = ({b},) integers, got {tuple(dataset_idx_b.shape)}"
        )
    rows = lut.to(torch.long)[dataset_idx_b.to(device=lut.device, dtype=torch.long)]  # (B, V)
    flat = label_bzyx.reshape(b, -1).to(torch.long)
    return torch.gather(rows, 1, flat).reshape(label_bzyx.shape)


class MergedSoftmaxLoss(nn.Module):
    """Softmax CE + soft Dice over foreground channels (see the module docstring).

    Call: ``loss, metrics = loss_fn(logits_bczyx, target_bzyx, annotated_bk=None, reduce=None)``;
    ``target_bzyx`` int64 merged labels in ``[0, C)``; ``annotated_bk`` is accepted for the deep-
    supervision wrapper's signature and ignored (every channel is supervised everywhere).
    Metrics (detached): ``loss``, ``ce``, ``dice_mean`` (foreground mean), ``dice_c`` (every channel),
    ``tp_c``, ``fp_c``, ``fn_c`` (soft, batch sums).
    """

    def __init__(self, *, dice: DiceMode = "batch", smooth: float = 1e-5) -> None:
        super().__init__()
        if dice not in ("batch", "sample"):
            raise ValueError(f"MergedSoftmaxLoss: dice must be 'batch' or 'sample', got {dice!r}")
        if not smooth >= 0:
            raise ValueError(f"MergedSoftmaxLoss: smooth must be >= 0, got {smooth}")
        self.dice = dice
        self.smooth = float(smooth)

    def extra_repr(self) -> str:
        return f"dice={self.dice!r}, smooth={self.smooth}"

    def forward(
        self,
        logits_bczyx: Tensor,
        target_bzyx: Tensor,
        annotated_bk: Tensor | None = None,
        *,
        reduce: Reduce | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not logits_bczyx.is_floating_point() or logits_bczyx.ndim < 3:
            raise TypeError(
                f"MergedSoftmaxLoss: logits must be floating (B, C, *spatial), got {logits_bczyx.dtype} "
                f"{tuple(logits_bczyx.shape)}"
            )
        b, c = logits_bczyx.shape[:2]
        if c < 2:
            raise ValueError(f"MergedSoftmaxLoss: needs background and >= 1 label channel, got C = {c}")
        if tuple(target_bzyx.shape) != (b, *logits_bczyx.shape[2:]) or target_bzyx.is_floating_point():
            raise ValueError(
                f"MergedSoftmaxLoss: target must be integer labels of shape {(b, *logits_bczyx.shape[2:])}, "
                f"got {target_bzyx.dtype} {tuple(target_bzyx.shape)}"
            )
        z = logits_bczyx.double() if logits_bczyx.dtype == torch.float64 else logits_bczyx.float()
        target = target_bzyx.to(torch.long)
        logp = F.log_softmax(z, dim=1)
        p = logp.exp()
        y = F.one_hot(target, c).movedim(-1, 1).to(p.dtype)
        spatial = tuple(range(2, z.ndim))
        tp_bc = (p * y).sum(spatial)
        sum_p_bc = p.sum(spatial)
        sum_y_bc = y.sum(spatial)
        dice_bc = (2 * tp_bc + self.smooth) / (sum_p_bc + sum_y_bc + self.smooth).clamp_min(1e-8)
        ce_sum = -logp.gather(1, target.unsqueeze(1)).sum()
        counts = torch.stack([ce_sum, ce_sum.new_tensor(float(target.numel())), ce_sum.new_tensor(float(b))])
        stats = torch.cat([tp_bc.sum(0), sum_p_bc.sum(0), sum_y_bc.sum(0), dice_bc.sum(0), counts])
        if reduce is not None:
            reduced = reduce(stats)
            if not isinstance(reduced, Tensor) or reduced.shape != stats.shape:
                raise ValueError(
                    f"MergedSoftmaxLoss: reduce must return a tensor of shape {tuple(stats.shape)}"
                )
            stats = reduced
        tp, sum_p, sum_y, dice_sample_sum = stats[: 4 * c].reshape(4, c)
        ce_total, voxels, samples = stats[4 * c :]
        if self.dice == "batch":
            dice_c = (2 * tp + self.smooth) / (sum_p + sum_y + self.smooth).clamp_min(1e-8)
        else:
            dice_c = dice_sample_sum / samples
        ce = ce_total / voxels
        dice_mean = dice_c[1:].mean()
        loss = ce - dice_mean
        metrics = {
            "loss": loss,
            "ce": ce,
            "dice_mean": dice_mean,
            "dice_c": dice_c,
            "tp_c": tp,
            "fp_c": sum_p - tp,
            "fn_c": sum_y - tp,
        }
        return loss, {k: v.detach() for k, v in metrics.items()}
