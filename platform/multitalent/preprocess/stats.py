"""CT intensity statistics of a whole collection, as nnU-Net's dataset fingerprint computes them.

Two ways to collect each case's foreground (label > 0) intensities; the statistics are then the same:
the 0.5 / 50 / 99.5 percentiles (numpy's linear interpolation), the mean and the (population) standard
deviation of the concatenation over all cases, unclipped (:meth:`IntensityStats.from_samples`).
MultiTalent does this over the whole collection, all datasets together.

- :func:`foreground_intensity_every_nth` -- nnU-Net **v1** (``DatasetAnalyzer._get_voxels_in_foreground``):
  every 10th foreground voxel in C order, ``image[label > 0][::10]``, so a case counts in proportion
  to its foreground volume. This is the rule that produced the reference's (and the paper's)
  ``MULTITALENT_*`` values below.
- :func:`foreground_intensity_sample` -- nnU-Net **v2** (``DatasetFingerprintExtractor``): a fixed
  number of foreground voxels per case drawn *with replacement*, so every case counts equally.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# MultiTalent's 13-dataset collection (reference implementation's plans).
MULTITALENT_CLIP = (-927.0, 275.0)
MULTITALENT_MEAN = 63.44
MULTITALENT_STD = 175.48


def seed_from_key(key: str) -> int:
    """A 64-bit seed from a string key (first 8 bytes of its sha256), stable across runs."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def foreground_intensity_sample(
    image: np.ndarray, label: np.ndarray, *, n: int = 10_000, seed: int | str = 1234
) -> np.ndarray:
    """``n`` intensities of voxels with ``label > 0``, drawn with replacement (float32 ``(n,)``).

    Args:
        image: image of any shape (HU).
        label: label map of the same shape.
        n: number of draws.
        seed: int, or a string key (e.g. ``"dataset/case"``) hashed into one.

    Returns:
        ``(n,)`` float32, or ``(0,)`` when the label has no foreground.
    """
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} != label shape {label.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    values = np.asarray(image)[np.asarray(label) > 0]
    if values.size == 0:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(seed_from_key(seed) if isinstance(seed, str) else seed)
    return values[rng.integers(0, values.size, size=n)].astype(np.float32)


def foreground_intensity_every_nth(image: np.ndarray, label: np.ndarray, *, step: int = 10) -> np.ndarray:
    """Every ``step``-th foreground voxel (``label > 0``) in C order: ``image[label > 0][::step]``.

    nnU-Net v1's rule (``step=10``); it ran on the cropped case at its original spacing, and cropping to
    a bounding box keeps the C order of the voxels inside it, so the uncropped case gives the same
    voxels when its foreground lies inside the crop box. Deterministic: no seed.

    Returns:
        ``(ceil(m / step),)`` in the image's dtype for ``m`` foreground voxels; ``(0,)`` without foreground.

    Raises:
        ValueError: shapes differ, or ``step < 1``.
    """
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} != label shape {label.shape}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return np.asarray(image)[np.asarray(label) > 0][::step]


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics (HU) of a collection."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def from_samples(cls, samples: Iterable[np.ndarray]) -> IntensityStats:
        """Statistics of the concatenated per-case samples (empty samples are skipped)."""
        parts = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
        values = np.concatenate([p for p in parts if p.size] or [np.zeros(0)])
        if values.size == 0:
            raise ValueError("no foreground samples: every case has an empty label")
        if not np.all(np.isfinite(values)):
            raise ValueError("foreground samples contain NaN or Inf")
        p005, p50, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        return cls(
            mean=float(values.mean()),
            std=float(values.std()),
            percentile_00_5=float(p005),
            percentile_99_5=float(p995),
            median=float(p50),
            min=float(values.min()),
            max=float(values.max()),
            n=int(values.size),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IntensityStats:
        return cls(
            mean=float(d["mean"]),
            std=float(d["std"]),
            percentile_00_5=float(d["percentile_00_5"]),
            percentile_99_5=float(d["percentile_99_5"]),
            median=float(d["median"]),
            min=float(d["min"]),
            max=float(d["max"]),
            n=int(d["n"]),
        )
