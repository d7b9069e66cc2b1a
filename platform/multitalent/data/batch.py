"""The training batch and its collation.

Images are stored as int16 HU; readers turn them into ``(clip(x, lo, hi) - mean) / std`` float32 with
the plan's :class:`~multitalent.preprocess.plan.Normalization`. Labels stay raw uint8 values of each
sample's own dataset; targets are built on the device via ``Catalog.region_lut()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


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
