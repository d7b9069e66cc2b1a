"""The training batch and its collation.

Images are stored as int16 HU; readers turn them into ``(clip(x, lo, hi) - mean) / std`` float32 with
the plan's :class:`~multitalent.preprocess.plan.Normalization`. Labels stay raw uint8 values of each
sample's own dataset; targets are built on the device via ``Catalog.region_lut()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from multitalent.data.augment_params import AugmentConfig, AugmentParams
    from multitalent.preprocess.plan import Normalization


@dataclass
class PatchSample:
    """One patch before collation.

    ``image_czyx`` float32 normalised (C = 1; int16 HU when read for normalising on the device),
    ``label_zyx`` uint8 raw values, ``center_zyx`` in the
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


@dataclass
class DrawnBatch:
    """A batch read after its augmentation parameters were drawn, not yet augmented.

    ``params`` covers the whole batch (B samples, batch order). ``wide`` holds the samples that rotate or
    scale (``params.reads_beyond_patch_b``), read enlarged; ``narrow`` the others, read at the output
    patch (either is None when empty); ``dataset_idx_b``, ``annotated_bk`` and ``keys`` are in batch
    order. A group's image is int16 HU, normalised by :meth:`augment` with ``normalization``, or float32
    already normalised. :meth:`augment` turns it into the augmented :class:`Batch` where it lies: in
    the CPU loader, or on the GPU in the step, which then receives int16 for about half the voxels of an
    all-enlarged batch (a quarter of its bytes) and normalises them itself.
    """

    wide: Batch | None
    narrow: Batch | None
    params: AugmentParams
    dataset_idx_b: torch.Tensor
    annotated_bk: torch.Tensor
    keys: list[str]
    normalization: Normalization | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: Any, non_blocking: bool = True) -> DrawnBatch:
        """The groups on ``device``; the parameters stay on the CPU, where the transforms read them."""
        return replace(
            self,
            wide=None if self.wide is None else self.wide.to(device, non_blocking),
            narrow=None if self.narrow is None else self.narrow.to(device, non_blocking),
            dataset_idx_b=self.dataset_idx_b.to(device, non_blocking=non_blocking),
            annotated_bk=self.annotated_bk.to(device, non_blocking=non_blocking),
            keys=list(self.keys),
        )

    def pin_memory(self) -> DrawnBatch:
        return replace(
            self,
            wide=None if self.wide is None else self.wide.pin_memory(),
            narrow=None if self.narrow is None else self.narrow.pin_memory(),
            keys=list(self.keys),
        )

    def augment(self, config: AugmentConfig, out_shape_zyx: tuple[int, int, int]) -> Batch:
        """The augmented batch, equal to :func:`~multitalent.data.augment.augment_batch` with these
        parameters on the batch read enlarged (:func:`~multitalent.data.augment.augment_split`)."""
        from multitalent.data.augment import augment_split

        image, label = augment_split(
            None if self.wide is None else (self._normalized(self.wide.image_bczyx), self.wide.label_bzyx),
            None
            if self.narrow is None
            else (self._normalized(self.narrow.image_bczyx), self.narrow.label_bzyx),
            self.params,
            config=config,
            out_shape_zyx=out_shape_zyx,
            dataset_idx_b=self.dataset_idx_b,
        )
        return Batch(image, label, self.dataset_idx_b, self.annotated_bk, list(self.keys))

    def _normalized(self, image: torch.Tensor) -> torch.Tensor:
        if image.is_floating_point():
            return image
        if self.normalization is None:
            raise ValueError(f"DrawnBatch: {image.dtype} images without a normalization to apply")
        return self.normalization.apply_torch(image)


def collate(samples: Sequence[PatchSample], *, annotated_dk: np.ndarray) -> Batch:
    """Stack patch samples into a :class:`Batch` (float32 images, or int16 HU ones read unnormalised).

    ``annotated_dk`` is ``catalog.annotated_mask()`` (D datasets × K global classes).
    """
    import torch

    if not samples:
        raise ValueError("collate: no samples")
    shapes = {s.image_czyx.shape for s in samples} | {(1, *s.label_zyx.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: patches differ in shape {sorted(shapes)}")
    dataset_idx = np.array([s.dataset_idx for s in samples], dtype=np.int64)
    images = np.stack([s.image_czyx for s in samples])
    return Batch(
        image_bczyx=torch.from_numpy(
            images if images.dtype == np.int16 else images.astype(np.float32, copy=False)
        ),
        label_bzyx=torch.from_numpy(np.stack([s.label_zyx for s in samples]).astype(np.uint8, copy=False)),
        dataset_idx_b=torch.from_numpy(dataset_idx),
        annotated_bk=torch.from_numpy(np.ascontiguousarray(annotated_dk[dataset_idx])),
        keys=[s.key for s in samples],
    )
