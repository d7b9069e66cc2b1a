"""Writing cases in the raw layouts that :mod:`multitalent.rawio` reads, with their metadata files."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from multitalent.catalog.model import DatasetSpec
from multitalent.rawio.cases import RawCase

META_COLUMNS = ("image_id", "age", "gender", "institute", "study_type", "split")


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, *, dtype: DTypeLike) -> None:
    """Save ``array`` (voxel order i, j, k, ...) as NIfTI-1 with ``affine`` as sform and qform.

    Integer dtypes are rounded first. nibabel (>= 5) writes ``.nii.gz`` with a zero gzip mtime, so
    the bytes depend only on the data.
    """
    import nibabel as nib

    data = np.asarray(array)
    if np.issubdtype(np.dtype(dtype), np.integer) and np.issubdtype(data.dtype, np.floating):
        info = np.iinfo(np.dtype(dtype))
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def uses_channel_naming(dataset_root: Path) -> bool:
    """Whether an existing ``imagesTr`` names CT files ``<case>_0000.nii.gz`` (nnU-Net v1 style)."""
    images = [p.name for p in (dataset_root / "imagesTr").glob("*.nii.gz")] if dataset_root.is_dir() else []
    return bool(images) and all(re.match(r".+_\d{4}\.nii\.gz$", n) for n in images)


def _json_write(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _register_case(dataset_root: Path, dataset: DatasetSpec, *, case_id: str, split: str) -> None:
    """Add the case to the layout's metadata file (created on first use)."""
    if dataset.layout == "msd":
        path = dataset_root / "dataset.json"
        data = json.loads(path.read_text()) if path.is_file() else None
        if data is None:
            data = {
                "name": dataset.name,
                "description": f"phantom dataset {dataset.id}",
                "tensorImageSize": "3D",
                "modality": {"0": "CT"},
                "labels": {"0": "background", **{str(v): n for v, n in sorted(dataset.labels.items())}},
                "numTraining": 0,
                "numTest": 0,
                "training": [],
                "test": [],
            }
        entry = {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        if entry not in data["training"]:
            data["training"].append(entry)
        data["numTraining"] = len(data["training"])
        _json_write(path, data)
    elif dataset.layout == "nnunet_v2":
        path = dataset_root / "dataset.json"
        data = json.loads(path.read_text()) if path.is_file() else None
        if data is None:
            data = {
                "name": dataset.name,
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, **{n: v for v, n in sorted(dataset.labels.items())}},
                "numTraining": 0,
                "file_ending": ".nii.gz",
            }
        data["numTraining"] = len(list((dataset_root / "imagesTr").glob("*_0000.nii.gz")))
        _json_write(path, data)
    elif dataset.layout == "totalsegmentator":
        path = dataset_root / "meta.csv"
        rows: list[dict[str, str]] = []
        if path.is_file():
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f, delimiter=";"))
        if all(r["image_id"] != case_id for r in rows):
            rows.append(
                {
                    "image_id": case_id,
                    "age": "",
                    "gender": "",
                    "institute": "phantom",
                    "study_type": "ct thorax-abdomen",
                    "split": split,
                }
            )
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(META_COLUMNS), delimiter=";", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def write_case(
    dataset_root: Path,
    dataset: DatasetSpec,
    *,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | Mapping[str, np.ndarray] | None,
    affine: np.ndarray,
    label_affine: np.ndarray | None = None,
    image_dtype: DTypeLike = np.int16,
    channel_naming: bool = False,
    split: str = "train",
) -> RawCase:
    """Write one case in ``dataset.layout`` under ``dataset_root`` and register it in the metadata.

    Args:
        image: CT in HU, voxel order (i, j, k) as it should be stored (any dimensionality, so that
            tests can write broken 4-D files).
        label: raw label map of the dataset (uint8 values), or for the TotalSegmentator layout
            either that map (split into one binary mask per catalog structure, all written, empty
            ones included, as in the real download) or a mapping structure name -> mask. ``None``
            writes no label.
        label_affine: affine of the label files (default: ``affine``).
        channel_naming: MSD layout only: name the image ``<case>_0000.nii.gz`` (nnU-Net v1).
        split: TotalSegmentator only: the ``split`` column of ``meta.csv``.

    Returns:
        The :class:`RawCase` a reader will discover (label paths ``None`` when nothing was written).
    """
    root = Path(dataset_root)
    label_affine = affine if label_affine is None else label_affine
    layout = dataset.layout
    label_path: Path | None
    structure_paths: dict[str, Path] | None = None
    if layout in ("msd", "nnunet_v2"):
        suffix = "_0000" if layout == "nnunet_v2" or channel_naming else ""
        image_path = root / "imagesTr" / f"{case_id}{suffix}.nii.gz"
        label_path = root / "labelsTr" / f"{case_id}.nii.gz"
    elif layout == "kits19":
        if not case_id.startswith("case_"):
            raise ValueError(f"KiTS19 case ids look like 'case_00042', got {case_id!r}")
        image_path = root / case_id / "imaging.nii.gz"
        label_path = root / case_id / "segmentation.nii.gz"
    elif layout == "btcv":
        image_path = root / "img" / f"img{case_id}.nii.gz"
        label_path = root / "label" / f"label{case_id}.nii.gz"
    elif layout == "totalsegmentator":
        image_path = root / case_id / "ct.nii.gz"
        label_path = None
    else:
        raise ValueError(f"unknown layout {layout!r}")

    write_nifti(image_path, image, affine, dtype=image_dtype)
    if layout == "totalsegmentator":
        if label is not None:
            masks = (
                {name: np.asarray(label) == value for value, name in sorted(dataset.labels.items())}
                if isinstance(label, np.ndarray)
                else dict(label)
            )
            structure_paths = {}
            for name, mask in masks.items():
                structure_paths[name] = root / case_id / "segmentations" / f"{name}.nii.gz"
                write_nifti(structure_paths[name], mask, label_affine, dtype=np.uint8)
            structure_paths = dict(sorted(structure_paths.items()))
    elif label is not None:
        assert label_path is not None
        if not isinstance(label, np.ndarray):
            raise TypeError(f"layout {layout!r} takes one label map, not per-structure masks")
        write_nifti(label_path, label, label_affine, dtype=np.uint8)
    else:
        label_path = None
    _register_case(root, dataset, case_id=case_id, split=split)
    return RawCase(dataset.id, case_id, image_path, label_path, structure_paths)


def update_dataset_json(dataset_root: Path, **fields: Any) -> None:
    """Set top-level fields of an existing ``dataset.json`` (e.g. nnU-Net v2 region labels)."""
    path = Path(dataset_root) / "dataset.json"
    data = json.loads(path.read_text())
    data.update(fields)
    _json_write(path, data)
