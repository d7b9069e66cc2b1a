"""A batch's per-class targets kept as raw labels and the catalog's region table, expanded row by row.

The dense targets ``(B, K, *spatial)`` of a multi-dataset batch are mostly rows the loss never reads: a
sample's dataset annotates a few of the K classes (10-28 % of the (sample, class) rows with the 13
datasets). :class:`LabelTargets` makes a row only when the loss's voxel pass reaches it, one chunk at a
time and directly in the compute dtype, so the dense tensor of each deep-supervision level (bool, 0.38 GB
at the paper's patch and batch with 47 classes; 3.5x that with TotalSegmentator's 117 more) is never
built and the gather runs for the annotated rows only. The rows equal :func:`targets_from_labels`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from multitalent.losses.targets import check_label_inputs


@dataclass(frozen=True)
class LabelTargets:
    """Targets ``target[b, k, v] = region_lut[dataset_idx[b], label[b, v], k]``, made on demand.

    Build with :meth:`make`. ``annotated_r`` is the host copy of the (B*K,) annotated flags when the
    caller has one (read once per batch and shared by every deep-supervision level, so the loss does
    not read the device's mask once per level); None lets the loss read it.
    """

    lut_bkv: Tensor  # bool (B, K, V): each sample's slice of the region table, classes first
    index_bn: Tensor  # int32 (B, N): raw label values, flattened
    spatial: tuple[int, ...]
    annotated_r: tuple[bool, ...] | None = None

    @classmethod
    def make(
        cls,
        label_bzyx: Tensor,
        dataset_idx_b: Tensor,
        region_lut_dvk: Tensor,
        *,
        annotated_r: tuple[bool, ...] | None = None,
    ) -> LabelTargets:
        """Arguments as for :func:`targets_from_labels` (``region_lut_dvk`` a bool tensor on the labels'
        device); ``annotated_r`` the flattened ``annotated_bk`` on the host, if at hand."""
        lut = check_label_inputs(label_bzyx, dataset_idx_b, region_lut_dvk, where="LabelTargets")
        b = label_bzyx.shape[0]
        lut_bkv = lut[dataset_idx_b.to(device=lut.device, dtype=torch.long)].transpose(1, 2).contiguous()
        rows = b * lut.shape[2]
        if annotated_r is not None and len(annotated_r) != rows:
            raise ValueError(f"LabelTargets: annotated_r has {len(annotated_r)} flags, need B*K = {rows}")
        index = label_bzyx.reshape(b, -1).to(torch.int32)
        return cls(lut_bkv, index, tuple(int(s) for s in label_bzyx.shape[1:]), annotated_r)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.lut_bkv.shape[:2], *self.spatial))

    @property
    def device(self) -> torch.device:
        return self.lut_bkv.device

    def rows(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        """Rows ``[start, end)`` of the flattened ``(B*K, N)`` targets, in ``dtype``; a range may span
        samples, or be empty."""
        if end <= start:
            return self.lut_bkv.new_zeros((0, self.index_bn.shape[1]), dtype=dtype)
        k = self.lut_bkv.shape[1]
        parts = []
        for b in range(start // k, (end - 1) // k + 1):
            k0, k1 = max(start - b * k, 0), min(end - b * k, k)
            parts.append(self.lut_bkv[b, k0:k1].to(dtype).index_select(1, self.index_bn[b]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def to_saved(self) -> tuple[tuple[Tensor, ...], Any]:
        """Its tensors and the rest, for autograd's ``save_for_backward`` (see :meth:`from_saved`)."""
        return (self.lut_bkv, self.index_bn), (self.spatial, self.annotated_r)

    @classmethod
    def from_saved(cls, tensors: Sequence[Tensor], meta: Any) -> LabelTargets:
        spatial, annotated_r = meta
        return cls(tensors[0], tensors[1], spatial, annotated_r)

    def dense(self) -> Tensor:
        """The full bool ``(B, K, *spatial)`` tensor (tests, metrics)."""
        b, k = self.lut_bkv.shape[:2]
        return self.rows(0, b * k, torch.bool).reshape(self.shape)
