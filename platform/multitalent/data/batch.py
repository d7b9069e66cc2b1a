"""The training batch, its collation, and the intensity normalisation applied by the readers.

Images are stored as int16 HU; readers turn them into ``(clip(x, lo, hi) - mean) / std`` float32 with
the values of ``plan.json``'s ``normalization``. Labels stay raw uint8 values of each sample's own
dataset; targets are built on the device via ``Catalog.region_lut()``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Normalization:
    """CT normalisation ``(clip(x, lo, hi) - mean) / std``."""

    clip_lo: float
    clip_hi: float
    mean: float
    std: float

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"normalization std must be > 0, got {self.std}")
        if not self.clip_lo <= self.clip_hi:
            raise ValueError(f"normalization clip [{self.clip_lo}, {self.clip_hi}] is not ordered")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Float32 normalised copy of ``image`` (any shape, any numeric dtype)."""
        x = image.astype(np.float32)  # always a copy, so the in-place steps below are safe
        np.clip(x, self.clip_lo, self.clip_hi, out=x)
        x -= np.float32(self.mean)
        x *= np.float32(1.0 / self.std)
        return x

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], *, where: str = "plan") -> Normalization:
        try:
            lo, hi = d["clip"]
            return cls(float(lo), float(hi), float(d["mean"]), float(d["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid 'normalization' {dict(d)!r} ({e})") from None

    @classmethod
    def from_plan(cls, plan: Any) -> Normalization:
        """From a plan: a ``Normalization``, a path to ``plan.json``, a plan dict, or an object with a
        ``normalization`` attribute (dict or object with ``clip``/``mean``/``std``) or ``to_dict()``."""
        if isinstance(plan, Normalization):
            return plan
        where = "plan"
        if isinstance(plan, str | Path):
            where = str(plan)
            try:
                plan = json.loads(Path(plan).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: cannot read plan ({e})") from None
        if isinstance(plan, Mapping):
            if "normalization" not in plan:
                raise ValueError(f"{where}: no 'normalization' entry")
            norm = plan["normalization"]
        elif hasattr(plan, "normalization"):
            norm = plan.normalization
        elif hasattr(plan, "to_dict"):
            return cls.from_plan(plan.to_dict())
        else:
            raise TypeError(f"cannot take a normalisation from {type(plan).__name__}")
        if not isinstance(norm, Mapping):
            norm = {k: getattr(norm, k) for k in ("clip", "mean", "std") if hasattr(norm, k)}
        return cls.from_mapping(norm, where=where)


@dataclass
class PatchSample:
    """One patch before collation.

    ``image_czyx`` float32 normalised (C = 1), ``label_zyx`` uint8 raw values, ``center_zyx`` in the
    stored (preprocessed) volume, ``fg_class`` the local class the patch was forced onto or -1.
    """

    image_czyx: np.ndarray
    label_zyx: np.ndarray
    dataset_idx: int
    key: str
    center_zyx: tuple[int, int, int]
    fg_class: int = -1


@dataclass
class Batch:
    """A training batch (see docs/contracts.md, "Batches").

    image_bczyx: float32 normalised; label_bzyx: uint8 raw label map of each sample's own dataset;
    dataset_idx_b: int64 index into ``catalog.datasets``; annotated_bk: bool,
    ``catalog.annotated_mask()[dataset_idx_b]``; keys: ``<dataset_id>__<case_id>`` per sample.
    """

    image_bczyx: torch.Tensor
    label_bzyx: torch.Tensor
    dataset_idx_b: torch.Tensor
    annotated_bk: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: Any, non_blocking: bool = True) -> Batch:
        return Batch(
            image_bczyx=self.image_bczyx.to(device, non_blocking=non_blocking),
            label_bzyx=self.label_bzyx.to(device, non_blocking=non_blocking),
            dataset_idx_b=self.dataset_idx_b.to(device, non_blocking=non_blocking),
            annotated_bk=self.annotated_bk.to(device, non_blocking=non_blocking),
            keys=list(self.keys),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies; torch's DataLoader calls this when ``pin_memory=True``."""
        return Batch(
            image_bczyx=self.image_bczyx.pin_memory(),
            label_bzyx=self.label_bzyx.pin_memory(),
            dataset_idx_b=self.dataset_idx_b.pin_memory(),
            annotated_bk=self.annotated_bk.pin_memory(),
            keys=list(self.keys),
        )


def collate(samples: Sequence[PatchSample], *, annotated_dk: np.ndarray) -> Batch:
    """Stack patch samples into a :class:`Batch`.

    ``annotated_dk`` is ``catalog.annotated_mask()`` (D datasets × K global classes).
    """
    import torch

    if not samples:
        raise ValueError("collate: no samples")
    shapes = {s.image_czyx.shape for s in samples} | {(1, *s.label_zyx.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: patches differ in shape {sorted(shapes)}")
    dataset_idx = np.array([s.dataset_idx for s in samples], dtype=np.int64)
    return Batch(
        image_bczyx=torch.from_numpy(
            np.stack([s.image_czyx for s in samples]).astype(np.float32, copy=False)
        ),
        label_bzyx=torch.from_numpy(np.stack([s.label_zyx for s in samples]).astype(np.uint8, copy=False)),
        dataset_idx_b=torch.from_numpy(dataset_idx),
        annotated_bk=torch.from_numpy(np.ascontiguousarray(annotated_dk[dataset_idx])),
        keys=[s.key for s in samples],
    )
