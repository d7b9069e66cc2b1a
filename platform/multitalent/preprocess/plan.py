"""The preprocessing plan (``plan.json``): everything that decides the bytes of a converted case.

Two conversions with equal ``Plan.sha256`` give identical preprocessed data for identical input.
:meth:`Plan.save` is the one writer of ``plan.json`` and :meth:`Plan.load` the one reader; the file
holds :meth:`Plan.to_json`'s canonical bytes, so its sha256 is :attr:`Plan.sha256`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multitalent.preprocess.stats import (
    MULTITALENT_CLIP,
    MULTITALENT_MEAN,
    MULTITALENT_STD,
    IntensityStats,
)

if TYPE_CHECKING:
    from multitalent.catalog import Catalog

PLAN_VERSION = 1
PLAN_FILE = "plan.json"  # the plan's name in a converted collection's root
# MultiTalent's target spacing (nnU-Net's 3d_fullres for its collection), (z, y, x) in mm.
DEFAULT_SPACING_ZYX_MM: tuple[float, float, float] = (1.5, 1.0, 1.0)
SOURCES = ("collection", "fixed")
_INT16 = (-32768, 32767)


class PlanError(ValueError):
    """An invalid or unreadable plan."""


@dataclass(frozen=True)
class Normalization:
    """CT normalisation: clip to ``clip`` (HU), then ``(x - mean) / std``.

    The preprocessed image is stored clipped, in HU; readers (the training sources, the preview,
    inference) apply :meth:`apply`.
    """

    clip: tuple[float, float]
    mean: float
    std: float
    source: str = "fixed"
    scheme: str = "ct"

    def __post_init__(self) -> None:
        lo, hi = self.clip
        if self.scheme != "ct":
            raise PlanError(f"normalization scheme must be 'ct', got {self.scheme!r}")
        if self.source not in SOURCES:
            raise PlanError(f"normalization source must be one of {SOURCES}, got {self.source!r}")
        if not all(math.isfinite(v) for v in (lo, hi, self.mean, self.std)):
            raise PlanError("normalization values must be finite")
        if not lo < hi:
            raise PlanError(f"clip range must have lo < hi, got {list(self.clip)}")
        if lo < _INT16[0] or hi > _INT16[1]:
            raise PlanError(f"clip range {list(self.clip)} does not fit int16 HU")
        if self.std <= 0:
            raise PlanError(f"std must be > 0, got {self.std}")

    @classmethod
    def from_stats(cls, stats: IntensityStats) -> Normalization:
        """Collection statistics: clip to the 0.5 / 99.5 percentiles, their mean and std."""
        return cls(
            clip=(stats.percentile_00_5, stats.percentile_99_5),
            mean=stats.mean,
            std=stats.std,
            source="collection",
        )

    @classmethod
    def multitalent(cls) -> Normalization:
        """The values of MultiTalent's 13-dataset collection (clip [-927, 275], 63.44 +- 175.48)."""
        return cls(clip=MULTITALENT_CLIP, mean=MULTITALENT_MEAN, std=MULTITALENT_STD, source="fixed")

    def apply(self, image_hu: np.ndarray) -> np.ndarray:
        """Normalised float32 copy of ``image_hu`` (any shape, any numeric dtype):
        ``(clip(x, lo, hi) - mean) / std``, computed in float32."""
        x = np.array(image_hu, dtype=np.float32)  # always a copy, so the in-place steps below are safe
        np.clip(x, self.clip[0], self.clip[1], out=x)
        x -= np.float32(self.mean)
        # times the float32 reciprocal, as the training data has always been normalised (not x / std,
        # which differs in the last bit)
        x *= np.float32(1.0 / self.std)
        return x

    def apply_torch(self, image_hu: Any) -> Any:
        """:meth:`apply` for a torch tensor of HU (int16 patches shipped to the GPU), on its device:
        float32, the same arithmetic, so equal bit for bit to :meth:`apply`."""
        import torch

        x = image_hu.to(torch.float32)
        x = x.clamp_(float(np.float32(self.clip[0])), float(np.float32(self.clip[1])))
        x -= float(np.float32(self.mean))
        x *= float(np.float32(1.0 / self.std))
        return x

    @property
    def hu_pad(self) -> int:
        """An int16 HU at or below the lower clip: the padding of a patch shipped unnormalised, which
        :meth:`apply` turns into :attr:`air` exactly."""
        return max(math.floor(self.clip[0]), _INT16[0])

    @property
    def air(self) -> float:
        """The normalised value of the lower clip (air): what lies outside a body-cropped case."""
        return float(self.apply(np.array([self.clip[0]], dtype=np.float32))[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "clip": [float(self.clip[0]), float(self.clip[1])],
            "mean": float(self.mean),
            "std": float(self.std),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        clip = d["clip"]
        if len(clip) != 2:
            raise PlanError(f"normalization clip must be [lo, hi], got {clip}")
        return cls(
            clip=(float(clip[0]), float(clip[1])),
            mean=float(d["mean"]),
            std=float(d["std"]),
            source=str(d["source"]),
            scheme=str(d.get("scheme", "ct")),
        )


@dataclass(frozen=True)
class Plan:
    """Preprocessing plan of one catalog (label space) and collection."""

    catalog_name: str
    catalog_hash: str
    classes: tuple[str, ...]
    normalization: Normalization
    target_spacing_zyx_mm: tuple[float, float, float] = DEFAULT_SPACING_ZYX_MM
    anisotropy_threshold: float = 3.0
    image_dtype: str = "int16"
    fg_locations_per_class: int = 10_000
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version {self.version} is not supported (expected {PLAN_VERSION})")
        if len(self.target_spacing_zyx_mm) != 3 or not all(
            math.isfinite(s) and s > 0 for s in self.target_spacing_zyx_mm
        ):
            raise PlanError(f"target spacing must be 3 positive mm values, got {self.target_spacing_zyx_mm}")
        if not self.anisotropy_threshold > 1:
            raise PlanError(f"anisotropy threshold must be > 1, got {self.anisotropy_threshold}")
        if self.image_dtype != "int16":
            raise PlanError(f"image dtype must be 'int16', got {self.image_dtype!r}")
        if self.fg_locations_per_class < 1:
            raise PlanError(f"fg_locations_per_class must be >= 1, got {self.fg_locations_per_class}")

    @classmethod
    def for_catalog(
        cls,
        catalog: Catalog,
        *,
        normalization: Normalization | None = None,
        target_spacing_zyx_mm: Sequence[float] = DEFAULT_SPACING_ZYX_MM,
        fg_locations_per_class: int = 10_000,
    ) -> Plan:
        """A plan for ``catalog``; normalisation defaults to MultiTalent's fixed values."""
        return cls(
            catalog_name=catalog.name,
            catalog_hash=catalog.hash,
            classes=tuple(c.key for c in catalog.classes),
            normalization=normalization or Normalization.multitalent(),
            target_spacing_zyx_mm=(
                float(target_spacing_zyx_mm[0]),
                float(target_spacing_zyx_mm[1]),
                float(target_spacing_zyx_mm[2]),
            ),
            fg_locations_per_class=int(fg_locations_per_class),
        )

    # --------------------------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "catalog": {"name": self.catalog_name, "hash": self.catalog_hash, "classes": list(self.classes)},
            "target_spacing_zyx_mm": [float(s) for s in self.target_spacing_zyx_mm],
            "normalization": self.normalization.to_dict(),
            "anisotropy_threshold": float(self.anisotropy_threshold),
            "image_dtype": self.image_dtype,
            "fg_locations_per_class": int(self.fg_locations_per_class),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        try:
            spacing = [float(s) for s in d["target_spacing_zyx_mm"]]
            if len(spacing) != 3:
                raise PlanError(f"target_spacing_zyx_mm must have 3 values, got {spacing}")
            return cls(
                version=int(d["version"]),
                catalog_name=str(d["catalog"]["name"]),
                catalog_hash=str(d["catalog"]["hash"]),
                classes=tuple(str(c) for c in d["catalog"]["classes"]),
                target_spacing_zyx_mm=(spacing[0], spacing[1], spacing[2]),
                normalization=Normalization.from_dict(d["normalization"]),
                anisotropy_threshold=float(d["anisotropy_threshold"]),
                image_dtype=str(d["image_dtype"]),
                fg_locations_per_class=int(d["fg_locations_per_class"]),
            )
        except KeyError as e:
            raise PlanError(f"plan is missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"plan has a malformed value: {e}") from None

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, compact): the bytes that :attr:`sha256` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise PlanError("plan JSON must be an object")
        return cls.from_dict(d)

    @property
    def sha256(self) -> str:
        """sha256 (hex) of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` (by convention ``<collection>/plan.json``, see :data:`PLAN_FILE`).

        The file holds :meth:`to_json`'s canonical bytes. It is written to a hidden ``.tmp-*``
        sibling, synced, then renamed over ``path``: readers see the old plan or the new one, never
        a partial file (the converter's cleanup removes ``.tmp-*`` leftovers of a killed run).
        """
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)  # atomic (same folder, POSIX rename)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`.

        Raises:
            PlanError: naming ``path``, when it is missing, unreadable, not JSON or not a valid plan.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"{path}: cannot read plan: {e.strerror}") from None
        try:
            return cls.from_json(text)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None
