"""The name of a scan's case, from its file path: how ``predict`` names its output folders and how
``evaluate`` finds the prediction of a raw ground-truth case."""

from __future__ import annotations

import re
from pathlib import Path

NIFTI_ENDINGS = (".nii.gz", ".nii")
# Layouts whose image file name is the same in every case folder (KiTS19, TotalSegmentator).
GENERIC_IMAGE_NAMES = ("imaging", "ct", "image")
_CHANNEL = re.compile(r"^(?P<case>.+)_0000$")


def nifti_stem(path: Path) -> str | None:
    """The file name without ``.nii.gz``/``.nii``; ``None`` for other files and hidden files."""
    name = Path(path).name
    if name.startswith("."):
        return None
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def case_name(image_path: Path) -> str:
    """``liver_3.nii.gz`` -> ``liver_3``; ``spleen_1_0000.nii.gz`` -> ``spleen_1`` (nnU-Net channel
    suffix); ``case_00002/imaging.nii.gz`` and ``s0001/ct.nii.gz`` -> the folder's name."""
    path = Path(image_path)
    stem = nifti_stem(path)
    if stem is None:
        raise ValueError(f"{path}: not a NIfTI file name (.nii.gz or .nii)")
    if stem in GENERIC_IMAGE_NAMES and path.parent.name:
        return path.parent.name
    m = _CHANNEL.match(stem)
    return m.group("case") if m else stem


def find_scans(folder: Path) -> list[Path]:
    """The scans of a folder: its NIfTI files, and ``<case>/{imaging,ct,image}.nii[.gz]`` one level
    down (KiTS19 / TotalSegmentator folders), sorted by case name."""
    folder = Path(folder)
    scans = [p for p in folder.iterdir() if p.is_file() and nifti_stem(p) is not None]
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            scans += [
                sub / f"{n}{e}"
                for n in GENERIC_IMAGE_NAMES
                for e in NIFTI_ENDINGS
                if (sub / f"{n}{e}").is_file()
            ]
    return sorted(scans, key=lambda p: (case_name(p), str(p)))
