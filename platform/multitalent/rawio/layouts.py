"""Finding the cases of a raw dataset folder, one function per layout.

Discovery only lists files; it never opens image data. A case whose label file is missing is still
returned (``label_path=None``) so that the loader reports it with the rest of the bad cases.
Dataset-level problems (missing folders, an unreadable ``dataset.json`` or ``meta.csv``) raise
:class:`CaseError` at once, since no case of that dataset could be read.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multitalent.catalog.model import DatasetSpec
from multitalent.rawio.cases import CaseError, RawCase

NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _nifti_stem(path: Path) -> str | None:
    """File name without its NIfTI ending; ``None`` for other files and hidden/AppleDouble files."""
    if path.name.startswith("."):
        return None  # MSD tarballs ship macOS "._liver_0.nii.gz" resource forks
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return None


def _ending(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CaseError(path, "missing folder")
    return path


def read_dataset_json(root: Path, *, required: bool) -> dict[str, Any] | None:
    """``root/dataset.json`` as a dict (``None`` when absent and not ``required``)."""
    path = root / "dataset.json"
    if not path.is_file():
        if required:
            raise CaseError(path, "missing dataset.json")
        return None
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaseError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CaseError(path, "dataset.json must hold a JSON object")
    return data


def dataset_json_raw_values(data: dict[str, Any], path: Path) -> set[int]:
    """Raw label values declared by a ``dataset.json`` (background excluded).

    MSD / nnU-Net v1 map value -> name (``{"0": "background", "1": "liver"}``); nnU-Net v2 maps
    name -> value, where a region is a list of values (``{"liver": [1, 2], "tumour": 2}``).
    """
    labels = data.get("labels")
    if labels is None:
        return set()
    if not isinstance(labels, dict):
        raise CaseError(path, "'labels' must be an object")
    values: set[int] = set()
    try:
        if all(str(k).strip().isdigit() for k in labels):
            values = {int(k) for k in labels}
        else:
            for v in labels.values():
                values.update(int(x) for x in (v if isinstance(v, list) else [v]))
    except (TypeError, ValueError):
        raise CaseError(path, f"'labels' has a non-integer value: {labels}") from None
    return values - {0}


def _check_declared(data: dict[str, Any] | None, root: Path, dataset: DatasetSpec) -> None:
    if data is None:
        return
    path = root / "dataset.json"
    extra = sorted(dataset_json_raw_values(data, path) - set(dataset.labels))
    if extra:
        raise CaseError(
            path,
            f"declares label values {extra} that catalog dataset {dataset.id!r} does not "
            f"(catalog: {sorted(dataset.labels)})",
        )


def _images_and_labels(root: Path, dataset: DatasetSpec, *, ending: str | None) -> list[RawCase]:
    """``imagesTr``/``labelsTr`` with either single files (MSD) or ``<case>_XXXX`` channel files
    (nnU-Net v1/v2, where CT is channel 0000)."""
    images_dir = _require_dir(root / "imagesTr")
    labels_dir = root / "labelsTr"
    stems: dict[str, Path] = {}
    for p in images_dir.iterdir():
        stem = _nifti_stem(p)
        if stem is not None and (ending is None or p.name.endswith(ending)):
            stems[stem] = p

    def label_for(case_id: str, image: Path) -> Path | None:
        candidate = labels_dir / f"{case_id}{_ending(image)}"
        return candidate if candidate.is_file() else None

    # Channel naming when every image stem carries a 4-digit channel and no label is named by a
    # full stem (an MSD case may itself end in 4 digits, e.g. "case_0001").
    channel_named = ending is not None or (
        bool(stems)
        and all(_CHANNEL.match(s) for s in stems)
        and not any(label_for(s, p) for s, p in stems.items())
    )
    if not channel_named:
        return [
            RawCase(dataset.id, case_id, image, label_for(case_id, image)) for case_id, image in stems.items()
        ]
    channels: dict[str, dict[str, Path]] = {}
    for stem, image in stems.items():
        m = _CHANNEL.match(stem)
        if m:
            channels.setdefault(m.group("case"), {})[m.group("channel")] = image
    cases = []
    for case_id, files in channels.items():
        # CT is channel 0000; a case without it keeps the expected path so loading reports it.
        image = files.get("0000") or images_dir / f"{case_id}_0000{_ending(next(iter(files.values())))}"
        cases.append(RawCase(dataset.id, case_id, image, label_for(case_id, image)))
    return cases


def _msd(root: Path, dataset: DatasetSpec) -> list[RawCase]:
    _check_declared(read_dataset_json(root, required=False), root, dataset)
    return _images_and_labels(root, dataset, ending=None)


def _nnunet_v2(root: Path, dataset: DatasetSpec) -> list[RawCase]:
    data = read_dataset_json(root, required=True)
    assert data is not None
    _check_declared(data, root, dataset)
    ending = str(data.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_ENDINGS:
        raise CaseError(root / "dataset.json", f"file_ending {ending!r} is not NIfTI ({NIFTI_ENDINGS})")
    return _images_and_labels(root, dataset, ending=ending)


def _kits19(root: Path, dataset: DatasetSpec) -> list[RawCase]:
    folders = sorted(root.glob("case_*"))
    if not folders and (root / "data").is_dir():  # the kits19 git repository keeps cases in data/
        folders = sorted((root / "data").glob("case_*"))
    cases = []
    for folder in folders:
        if not folder.is_dir():
            continue
        label = folder / "segmentation.nii.gz"
        cases.append(
            RawCase(dataset.id, folder.name, folder / "imaging.nii.gz", label if label.is_file() else None)
        )
    return cases


def _btcv(root: Path, dataset: DatasetSpec) -> list[RawCase]:
    base = root
    for candidate in (root, root / "Training", root / "RawData" / "Training"):
        if (candidate / "img").is_dir():
            base = candidate
            break
    images_dir = _require_dir(base / "img")
    cases = []
    for p in images_dir.iterdir():
        stem = _nifti_stem(p)
        if stem is None or not stem.startswith("img"):
            continue
        case_id = stem[len("img") :]
        label = base / "label" / f"label{case_id}{_ending(p)}"
        cases.append(RawCase(dataset.id, case_id, p, label if label.is_file() else None))
    return cases


def read_totalseg_meta(root: Path) -> dict[str, dict[str, str]]:
    """TotalSegmentator ``meta.csv`` (semicolon-separated) as ``image_id -> row``."""
    path = root / "meta.csv"
    if not path.is_file():
        raise CaseError(path, "missing meta.csv")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if not rows:
        return {}
    if "image_id" not in rows[0]:
        raise CaseError(path, f"no 'image_id' column (columns: {list(rows[0])}); expected ';'-separated")
    return {row["image_id"].strip(): row for row in rows if row.get("image_id")}


def _totalsegmentator(root: Path, dataset: DatasetSpec) -> list[RawCase]:
    _require_dir(root)
    case_ids = set(read_totalseg_meta(root))
    case_ids.update(p.name for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file())
    cases = []
    for case_id in case_ids:
        seg_dir = root / case_id / "segmentations"
        structures = None
        if seg_dir.is_dir():
            found = {}
            for p in seg_dir.iterdir():
                stem = _nifti_stem(p)
                if stem is not None:
                    found[stem] = p
            structures = dict(sorted(found.items()))
        cases.append(RawCase(dataset.id, case_id, root / case_id / "ct.nii.gz", None, structures))
    return cases


_READERS: dict[str, Callable[[Path, DatasetSpec], list[RawCase]]] = {
    "msd": _msd,
    "nnunet_v2": _nnunet_v2,
    "kits19": _kits19,
    "btcv": _btcv,
    "totalsegmentator": _totalsegmentator,
}


def discover_cases(dataset: DatasetSpec, root: Path) -> list[RawCase]:
    """All cases of ``dataset`` under ``root`` (the dataset's own folder), sorted by case id.

    Raises:
        CaseError: the folder, or a file every case depends on, is missing or unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise CaseError(root, f"missing folder of dataset {dataset.id!r}")
    reader = _READERS.get(dataset.layout)
    if reader is None:
        raise CaseError(root, f"no reader for layout {dataset.layout!r}")
    return sorted(reader(root, dataset), key=lambda c: c.case_id)


def expected_label_path(case: RawCase, dataset: DatasetSpec) -> Path:
    """Where the layout keeps the label of ``case`` (for TotalSegmentator: the masks folder)."""
    image = case.image_path
    if dataset.layout in ("msd", "nnunet_v2"):
        return image.parent.parent / "labelsTr" / f"{case.case_id}{_ending(image)}"
    if dataset.layout == "kits19":
        return image.parent / "segmentation.nii.gz"
    if dataset.layout == "btcv":
        return image.parent.parent / "label" / f"label{case.case_id}{_ending(image)}"
    return image.parent / "segmentations"
