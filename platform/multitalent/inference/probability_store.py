"""Class probabilities of a whole scan, kept per class only where they are not ~0.

The sliding window hands over finished z-slabs ``(K, dz, y, x)`` (:func:`~multitalent.inference.
sliding_window.stitch`). Holding all of them densely costs ``K * z * y * x`` floats: 33 GB for 164
classes on a 300 × 410 × 410 preprocessed CT in float32. A trained network's class is ~0 outside its
structure, so each slab of each class is kept as float16 inside the box of its voxels above ``floor``
(zero elsewhere), and a class is made dense (float32, one class at a time) only when it is exported.

Exactness: the export reads a class's probabilities and thresholds them after linear resampling, so
a value below ``floor`` read as 0 moves an output voxel by less than ``floor``; float16 rounds a value
near 0.5 by at most 2.4e-4. Only output voxels that close to the threshold can change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

FLOOR = 1e-3


@dataclass
class _Block:
    z0: int
    box: tuple[slice, slice, slice]  # within the volume
    values: np.ndarray  # float16, the box's shape


@dataclass
class SparseProbabilities:
    """``(K, z, y, x)`` probabilities stored per class as float16 boxes; ``store[k]`` is class ``k``
    as a dense float32 numpy volume, ``store.select(channels)`` a view of some classes."""

    shape: tuple[int, int, int, int]
    floor: float = FLOOR
    _blocks: list[list[_Block]] = field(default_factory=list)
    _channels: list[int] | None = None

    @classmethod
    def empty(cls, k: int, shape_zyx: Sequence[int], *, floor: float = FLOOR) -> SparseProbabilities:
        z, y, x = (int(n) for n in shape_zyx)
        return cls(shape=(int(k), z, y, x), floor=floor, _blocks=[[] for _ in range(int(k))])

    def add_slab(self, z0: int, sums_kzyx: torch.Tensor, weights_zyx: torch.Tensor) -> None:
        """Keep rows ``[z0, z0 + dz)`` of every class, ``sums / weights`` (a sink for ``stitch``).

        Class by class: the working memory is one class's slab, not all of them."""
        if self._channels is not None:
            raise TypeError("add_slab on a channel view")
        k, dz, y, x = sums_kzyx.shape
        if k != self.shape[0] or (y, x) != self.shape[2:] or z0 < 0 or z0 + dz > self.shape[1]:
            raise ValueError(f"slab {tuple(sums_kzyx.shape)} at z {z0} does not fit {self.shape}")
        weights = weights_zyx.float()
        for c in range(k):
            p = sums_kzyx[c].float() / weights
            above = p > self.floor
            if not bool(above.any()):
                continue
            along_yx = above.any(dim=2)  # (dz, y)
            zs = along_yx.any(dim=1).nonzero().flatten()
            ys = along_yx.any(dim=0).nonzero().flatten()
            xs = above.any(dim=1).any(dim=0).nonzero().flatten()
            box = (
                slice(int(zs[0]), int(zs[-1]) + 1),
                slice(int(ys[0]), int(ys[-1]) + 1),
                slice(int(xs[0]), int(xs[-1]) + 1),
            )
            values = p[box].to("cpu").half().numpy()
            volume_box = (slice(box[0].start + z0, box[0].stop + z0), box[1], box[2])
            self._blocks[c].append(_Block(z0, volume_box, values))

    def select(self, channels: Sequence[int]) -> SparseProbabilities:
        """A view of the classes ``channels`` (in that order)."""
        base = self._channels or list(range(self.shape[0]))
        chosen = [base[int(c)] for c in channels]
        return SparseProbabilities(
            shape=(len(chosen), *self.shape[1:]), floor=self.floor, _blocks=self._blocks, _channels=chosen
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k: int) -> np.ndarray:
        """Class ``k`` as a dense float32 ``(z, y, x)`` volume (zero where nothing was kept)."""
        if not -self.shape[0] <= int(k) < self.shape[0]:
            raise IndexError(f"class {k} of {self.shape[0]}")
        c = (self._channels or list(range(self.shape[0])))[int(k)]
        out = np.zeros(self.shape[1:], dtype=np.float32)
        for block in self._blocks[c]:
            out[block.box] = block.values
        return out

    def region(self, k: int) -> tuple[tuple[int, int, int], np.ndarray]:
        """Class ``k`` as ``(origin_zyx, float32 sub-volume)`` over the union of its kept boxes (zero
        elsewhere): what the export reads, without a full-volume array per class."""
        if not -self.shape[0] <= int(k) < self.shape[0]:
            raise IndexError(f"class {k} of {self.shape[0]}")
        blocks = self._blocks[(self._channels or list(range(self.shape[0])))[int(k)]]
        if not blocks:
            return (0, 0, 0), np.zeros((0, 0, 0), dtype=np.float32)
        lo = [min(b.box[a].start for b in blocks) for a in range(3)]
        hi = [max(b.box[a].stop for b in blocks) for a in range(3)]
        out = np.zeros([h - low for low, h in zip(lo, hi)], dtype=np.float32)
        for b in blocks:
            out[tuple(slice(s.start - low, s.stop - low) for s, low in zip(b.box, lo))] = b.values
        return (lo[0], lo[1], lo[2]), out

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept boxes (all classes, also through a view)."""
        return sum(b.values.nbytes for blocks in self._blocks for b in blocks)

    def dense(self) -> np.ndarray:
        """All classes as one float32 ``(K, z, y, x)`` array (tests and small volumes only)."""
        return np.stack([self[k] for k in range(self.shape[0])])
