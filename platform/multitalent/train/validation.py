"""Validation during training: fixed foreground-centred patches of the fold's validation cases.

Each validation case contributes ``patches_per_case`` patches whose centres are drawn once from
``(seed, case index, patch index)``, so every validation pass scores the same voxels. Patches are split
over the ranks and every rank runs the same number of forward passes (padding with repeats it does not
count): under ZeRO-3 a forward pass is collective. The ranks' counts are summed with one all-reduce
and rank 0 reports per class/dataset/group Dice (:class:`multitalent.evaluation.DiceAccumulator`) and
renders one overlay PNG per dataset from that dataset's first validation patch (every rank runs those
forward passes too, for the same reason).

Validation reads the per-case Zarr stores of the collection (the converter always writes them), also
when training streams the WebDataset shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from multitalent.data.batch import Batch, collate
from multitalent.data.sampling import draw_center
from multitalent.evaluation import DiceAccumulator
from multitalent.evaluation.dice import tp_fp_fn
from multitalent.losses import targets_from_labels

Forward = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class ValItem:
    case_index: int
    center_zyx: tuple[int, int, int]


@dataclass
class ValidationOutcome:
    """Rank 0's result of one pass (other ranks get ``metrics = {}``)."""

    metrics: dict[str, float]
    overlays: dict[str, Any]  # dataset id -> PIL image


class Validator:
    """Validation patches of one rank and the pass over them."""

    def __init__(
        self,
        source: Any,
        *,
        seed: int,
        patches_per_case: int,
        rank: int,
        world_size: int,
        batch_size: int,
        overlays: bool,
    ) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size
        self.batch_size, self.want_overlays = batch_size, overlays
        self.catalog = source.catalog
        items: list[ValItem] = []
        for i in range(len(source.refs)):
            case = source.open_case(i)
            for j in range(patches_per_case):
                rng = np.random.default_rng(np.random.SeedSequence([seed, i, j]))
                draw = draw_center(
                    rng,
                    shape_zyx=case.image.shape,
                    patch_zyx=source.patch_zyx,
                    fg_locations=case.fg_locations,
                    classes_present=case.meta.get("classes_present"),
                    fg_fraction=1.0,
                )
                items.append(ValItem(i, draw.center_zyx))
        self.items = items
        per_rank = math.ceil(len(items) / world_size) if items else 0
        mine = items[rank::world_size]
        # Padding repeats (not counted) keep the number of collective forward passes equal on all ranks.
        self.mine = [(it, True) for it in mine] + [(items[0], False)] * (per_rank - len(mine))
        first: dict[str, ValItem] = {}
        for it in items:
            first.setdefault(source.refs[it.case_index][0], it)
        self.overlay_items = first

    def _batch(self, items: list[ValItem]) -> Batch:
        return collate(
            [self.source.read_sample(it.case_index, it.center_zyx) for it in items],
            annotated_dk=self.source.annotated_dk,
        )

    @torch.no_grad()
    def _predict(
        self, forward: Forward, batch: Batch, *, device: torch.device, dtype: torch.dtype, lut: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Batch]:
        batch = batch.to(device)
        out = forward(batch.image_bczyx.to(dtype))
        logits = out[0] if isinstance(out, list | tuple) else out
        pred_bkzyx = logits.float() > 0  # sigmoid > 0.5
        target_bkzyx = targets_from_labels(batch.label_bzyx, batch.dataset_idx_b, lut)
        return pred_bkzyx, target_bkzyx, batch

    def run(
        self,
        forward: Forward,
        *,
        device: torch.device,
        dtype: torch.dtype,
        lut: torch.Tensor,
        title: str,
    ) -> ValidationOutcome:
        """One pass on every rank (collective); metrics and overlays on rank 0."""
        import torch.distributed as dist

        acc = DiceAccumulator(self.catalog)
        for start in range(0, len(self.mine), self.batch_size):
            chunk = self.mine[start : start + self.batch_size]
            pred, target, batch = self._predict(
                forward, self._batch([it for it, _ in chunk]), device=device, dtype=dtype, lut=lut
            )
            tp, fp, fn = tp_fp_fn(pred, target)
            counted = torch.tensor([c for _, c in chunk], device=device)
            acc.update(tp, fp, fn, batch.annotated_bk & counted[:, None])
        state = acc.state_dict()
        if self.world_size > 1 and dist.is_initialized():
            names = ["tp_k", "fp_k", "fn_k", "seen_k", "case_dice_sum_k", "case_dice_n_k"]
            k = self.catalog.num_classes
            flat = np.concatenate([np.asarray(state[n], np.float64) for n in names] + [[state["rows"]]])
            t = torch.from_numpy(flat).to(device)
            dist.all_reduce(t)
            summed = t.cpu().numpy()
            state = {n: summed[i * k : (i + 1) * k] for i, n in enumerate(names)} | {"rows": int(summed[-1])}
            state["seen_k"] = state["seen_k"] > 0
        overlays = self._overlays(forward, device=device, dtype=dtype, lut=lut, title=title)
        if self.rank != 0:
            return ValidationOutcome({}, {})
        total = DiceAccumulator(self.catalog)
        total.merge(state)
        return ValidationOutcome(total.report().to_metrics("val"), overlays)

    def _overlays(
        self, forward: Forward, *, device: torch.device, dtype: torch.dtype, lut: torch.Tensor, title: str
    ) -> dict[str, Any]:
        if not self.want_overlays:
            return {}
        from multitalent.tracking import overlay_png

        pictures: dict[str, Any] = {}
        for dataset_id, item in self.overlay_items.items():
            pred, target, batch = self._predict(
                forward, self._batch([item]), device=device, dtype=dtype, lut=lut
            )
            if self.rank != 0:
                continue
            sl = self.catalog.class_slice(dataset_id)
            names = [c.name for c in self.catalog.dataset(dataset_id).classes]
            pictures[dataset_id] = overlay_png(
                batch.image_bczyx[0, 0].float().cpu(),
                pred[0, sl].cpu(),
                target[0, sl].cpu(),
                names,
                title=f"{dataset_id} / {batch.keys[0]}, {title}",
            )
        return pictures
