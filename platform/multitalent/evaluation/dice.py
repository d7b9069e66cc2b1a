"""Validation Dice over the global label space, only where classes are annotated.

Counts (tp, fp, fn) per global class arrive per case or per batch from the validation loop and
are summed here; the reported Dice is nnU-Net's "pseudo Dice": ``2 tp / (2 tp + fp + fn)`` of
the sums over the whole validation set (``method="global"``). The mean of per-case Dice
(``method="per_case"``) is kept alongside at no extra cost; it is exact only when each row
handed to :meth:`DiceAccumulator.update` is one case.

A class enters the report only when at least one validation row annotated it *and* its
denominator is non-zero (reference or prediction non-empty somewhere): a class the validation
set never annotates is absent, not 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from multitalent.arrays import as_numpy as _as_numpy
from multitalent.catalog.model import GROUPS
from multitalent.metric_names import metric_key

if TYPE_CHECKING:
    from multitalent.catalog import Catalog

DiceMethod = Literal["global", "per_case"]


def as_numpy(x: Any, *, dtype: Any = np.float64) -> np.ndarray:
    """:func:`multitalent.arrays.as_numpy`, float64 unless told otherwise (counts and sums)."""
    return _as_numpy(x, dtype=dtype)


def tp_fp_fn(pred_bk_spatial: Any, target_bk_spatial: Any) -> tuple[Any, Any, Any]:
    """Per-(sample, class) counts ``(B, K)`` from binary masks ``(B, K, *spatial)``.

    Works on numpy arrays and torch tensors alike and keeps torch results on their device,
    so the reduction happens where the masks are (the GPU) and only ``B*K`` numbers move.
    Non-boolean inputs are binarised with ``> 0.5`` (probabilities or 0/1 values).
    """
    pred, target = pred_bk_spatial, target_bk_spatial
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"tp_fp_fn: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim < 3:
        raise ValueError(f"tp_fp_fn: masks must be (B, K, *spatial), got shape {tuple(pred.shape)}")
    pred = pred if _is_bool(pred) else pred > 0.5
    target = target if _is_bool(target) else target > 0.5
    axes = tuple(range(2, pred.ndim))
    tp = (pred & target).sum(axis=axes)
    fp = (pred & ~target).sum(axis=axes)
    fn = (~pred & target).sum(axis=axes)
    return tp, fp, fn


def _is_bool(x: Any) -> bool:
    return str(x.dtype) in ("bool", "torch.bool")


@dataclass(frozen=True)
class DiceReport:
    """Dice of one validation pass.

    ``per_class`` keys are ``"<dataset_id>:<class name>"`` (``GlobalClass.key``); averages are
    plain means over the evaluated classes they cover, ``None`` when they cover none.
    """

    method: DiceMethod
    per_class: dict[str, float]
    per_dataset: dict[str, float]
    class_average: float | None
    dataset_average: float | None
    groups: dict[str, float]
    num_rows: int
    empty_classes: tuple[str, ...] = field(default=())  # annotated, but 0/0 (nothing to score)

    def to_metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat MLflow metric names.

        ``<prefix>/dice/<dataset>/<class>``, ``<prefix>/dice_dataset/<dataset>`` and
        ``<prefix>/dice_mean/{class,dataset,difficult,cancer}``; every name passes through
        :func:`multitalent.metric_names.metric_key` (no colons, spaces become ``_``).
        """
        out: dict[str, float] = {}

        def put(name: str, value: float) -> None:
            key = metric_key(name)
            if key in out:
                raise ValueError(f"DiceReport.to_metrics: two metrics map to the name {key!r}")
            out[key] = value

        for cls_key, value in self.per_class.items():
            dataset_id, _, class_name = cls_key.partition(":")
            put(f"{prefix}/dice/{dataset_id}/{class_name.replace('/', '_')}", value)
        for dataset_id, value in self.per_dataset.items():
            put(f"{prefix}/dice_dataset/{dataset_id}", value)
        if self.class_average is not None:
            put(f"{prefix}/dice_mean/class", self.class_average)
        if self.dataset_average is not None:
            put(f"{prefix}/dice_mean/dataset", self.dataset_average)
        for group, value in self.groups.items():
            put(f"{prefix}/dice_mean/{group}", value)
        return out


class DiceAccumulator:
    """Sums per-class tp/fp/fn of annotated classes over a validation pass.

    ``update`` takes arrays of shape ``(K,)`` (one case or one pre-summed batch) or ``(B, K)``
    (B cases), ``K = catalog.num_classes``; ``annotated_k`` is boolean or a count (``> 0`` means
    annotated). Unannotated entries contribute nothing, so a case of dataset A never scores the
    heads of dataset B.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._keys = [c.key for c in catalog.classes]
        self.reset()

    def reset(self) -> None:
        """Forget all counts (start of a validation pass)."""
        k = self.catalog.num_classes
        self._tp_k = np.zeros(k)
        self._fp_k = np.zeros(k)
        self._fn_k = np.zeros(k)
        self._seen_k = np.zeros(k, dtype=bool)
        self._case_dice_sum_k = np.zeros(k)
        self._case_dice_n_k = np.zeros(k, dtype=np.int64)
        self._rows = 0

    def update(self, tp_k: Any, fp_k: Any, fn_k: Any, annotated_k: Any) -> None:
        """Add counts of one case ``(K,)`` or of B cases ``(B, K)`` (numpy or torch)."""
        tp, fp, fn = as_numpy(tp_k), as_numpy(fp_k), as_numpy(fn_k)
        annotated = as_numpy(annotated_k) > 0
        k = self.catalog.num_classes
        shapes = {tuple(a.shape) for a in (tp, fp, fn, annotated)}
        if len(shapes) != 1:
            raise ValueError(f"DiceAccumulator.update: tp/fp/fn/annotated shapes differ: {sorted(shapes)}")
        if tp.ndim not in (1, 2) or tp.shape[-1] != k:
            raise ValueError(
                f"DiceAccumulator.update: expected shape (K,) or (B, K) with K={k} "
                f"(catalog {self.catalog.name!r}), got {tuple(tp.shape)}"
            )
        tp, fp, fn, annotated = (np.atleast_2d(a) for a in (tp, fp, fn, annotated))
        self._tp_k += np.where(annotated, tp, 0).sum(0)
        self._fp_k += np.where(annotated, fp, 0).sum(0)
        self._fn_k += np.where(annotated, fn, 0).sum(0)
        self._seen_k |= annotated.any(0)
        # Per-case Dice follows nnU-Net's convention: empty reference and empty prediction is
        # undefined (skipped), not 1.
        denom = 2 * tp + fp + fn
        scored = annotated & (denom > 0)
        case_dice = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=scored)
        self._case_dice_sum_k += case_dice.sum(0)
        self._case_dice_n_k += scored.sum(0)
        self._rows += tp.shape[0]

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays, e.g. to all-reduce across ranks before ``report`` or to checkpoint."""
        return {
            "tp_k": self._tp_k.copy(),
            "fp_k": self._fp_k.copy(),
            "fn_k": self._fn_k.copy(),
            "seen_k": self._seen_k.copy(),
            "case_dice_sum_k": self._case_dice_sum_k.copy(),
            "case_dice_n_k": self._case_dice_n_k.copy(),
            "rows": self._rows,
        }

    def merge(self, state: Mapping[str, Any]) -> None:
        """Add another accumulator's ``state_dict`` (e.g. from another rank)."""
        k = self.catalog.num_classes
        for name in ("tp_k", "fp_k", "fn_k", "seen_k", "case_dice_sum_k", "case_dice_n_k"):
            if as_numpy(state[name]).shape != (k,):
                raise ValueError(
                    f"DiceAccumulator.merge: {name} has shape {np.shape(state[name])}, want ({k},)"
                )
        self._tp_k += as_numpy(state["tp_k"])
        self._fp_k += as_numpy(state["fp_k"])
        self._fn_k += as_numpy(state["fn_k"])
        self._seen_k |= as_numpy(state["seen_k"], dtype=bool)
        self._case_dice_sum_k += as_numpy(state["case_dice_sum_k"])
        self._case_dice_n_k += as_numpy(state["case_dice_n_k"], dtype=np.int64)
        self._rows += int(state["rows"])

    def dice_k(self, method: DiceMethod = "global") -> np.ndarray:
        """Dice per global class ``(K,)``, NaN where not evaluated."""
        if method == "global":
            denom = 2 * self._tp_k + self._fp_k + self._fn_k
            ok = self._seen_k & (denom > 0)
            return np.where(ok, 2 * self._tp_k / np.where(ok, denom, 1), np.nan)
        if method == "per_case":
            n = self._case_dice_n_k
            return np.where(n > 0, self._case_dice_sum_k / np.maximum(n, 1), np.nan)
        raise ValueError(f"DiceAccumulator: method must be 'global' or 'per_case', got {method!r}")

    def report(self, method: DiceMethod = "global") -> DiceReport:
        dice_k = self.dice_k(method)
        evaluated = ~np.isnan(dice_k)
        per_class = {self._keys[i]: float(dice_k[i]) for i in np.flatnonzero(evaluated)}
        per_dataset: dict[str, float] = {}
        for d in self.catalog.datasets:
            sl = self.catalog.class_slice(d.id)
            values = dice_k[sl][evaluated[sl]]
            if values.size:
                per_dataset[d.id] = float(values.mean())
        groups: dict[str, float] = {}
        for group in GROUPS:
            members = [i for i in self.catalog.group_members(group) if evaluated[i]]
            if members:
                groups[group] = float(dice_k[members].mean())
        empty = tuple(self._keys[i] for i in np.flatnonzero(self._seen_k & ~evaluated))
        return DiceReport(
            method=method,
            per_class=per_class,
            per_dataset=per_dataset,
            class_average=float(dice_k[evaluated].mean()) if evaluated.any() else None,
            dataset_average=float(np.mean(list(per_dataset.values()))) if per_dataset else None,
            groups=groups,
            num_rows=self._rows,
            empty_classes=empty,
        )
