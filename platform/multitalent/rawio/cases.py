"""What the raw layout readers hand to the converter: case paths, loaded arrays, and the error type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class CaseError(Exception):
    """A raw case that cannot be used; ``str(e) == f"{e.path}: {e.reason}"``.

    ``path`` is the offending file (or folder, or the file that should exist but does not).
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[CaseError], tuple[Path, str]]:
        # Keep (path, reason) when the error crosses a process boundary (Ray workers pickle it).
        return (CaseError, (self.path, self.reason))


@dataclass(frozen=True)
class RawCase:
    """One case as found on disk by :func:`multitalent.rawio.discover_cases`.

    ``label_path`` is ``None`` when the label file is missing (the loader reports it) and for the
    TotalSegmentator layout, whose labels are one binary mask per structure in ``structure_paths``
    (``None`` there when the ``segmentations`` folder is missing).
    """

    dataset_id: str
    case_id: str
    image_path: Path
    label_path: Path | None
    structure_paths: Mapping[str, Path] | None = None


@dataclass
class LoadedCase:
    """A validated raw case.

    ``image``: float32 HU, 3-D, voxel order as stored in the file (i, j, k); ``label``: uint8 raw
    values of the dataset, same shape; ``affine``: 4x4 float64 voxel -> RAS+ mm of the image.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)
