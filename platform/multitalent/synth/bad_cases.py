"""A corpus of broken raw cases, one per fault the loader must catch, for converter tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from multitalent.catalog.model import DatasetSpec
from multitalent.synth.anatomy import FOV_MM, Tissue, render_tissues, sample_anatomy, tissues_to_hu
from multitalent.synth.geometry import grid_affine
from multitalent.synth.writer import uses_channel_naming, write_case

# fault name -> keyword found in CaseError.reason (or, for the last, in LoadedCase.warnings)
FAULTS: dict[str, str] = {
    "truncated": "truncated",
    "not_nifti": "not a NIfTI",
    "shape": "shape mismatch",
    "affine": "affine mismatch",
    "nan": "NaN",
    "undeclared": "not declared",
    "4d": "4-D",
    "no_label": "missing label",
    "empty_label": "all-zero label",
}
WARNING_FAULTS = frozenset({"empty_label"})


def _case_id(layout: str, index: int, fault: str) -> str:
    if layout == "kits19":
        return f"case_{90000 + index:05d}"
    if layout == "btcv":
        return f"{9000 + index}"
    if layout == "totalsegmentator":
        return f"s{9000 + index}"
    return f"bad_{fault}"


def _small_case(dataset: DatasetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A coarse (3-4 mm) phantom with a valid label: liver -> the smallest declared value, kidneys ->
    the largest (works for any catalog dataset, not only the phantom ones)."""
    anatomy = sample_anatomy(np.random.default_rng(20240), force_tumours=True)
    shape, affine = grid_affine(
        axcodes="RAS",
        spacing_xyz_mm=(3.0, 3.0, 4.0),
        lo_xyz_mm=(FOV_MM["x"][0], FOV_MM["y"][0], FOV_MM["z"][0]),
        hi_xyz_mm=(FOV_MM["x"][1], FOV_MM["y"][1], FOV_MM["z"][1]),
    )
    tissue = render_tissues(anatomy, shape, affine)
    image = tissues_to_hu(tissue, np.random.default_rng(20241))
    values = sorted(dataset.labels)
    label = np.zeros(shape, dtype=np.uint8)
    label[np.isin(tissue, [Tissue.LIVER, Tissue.LIVER_TUMOUR])] = values[0]
    kidneys = [Tissue.KIDNEY_LEFT, Tissue.KIDNEY_RIGHT, Tissue.KIDNEY_TUMOUR_LEFT, Tissue.KIDNEY_TUMOUR_RIGHT]
    label[np.isin(tissue, kidneys)] = values[-1]
    return image, label, affine


def write_bad_cases(dataset_root: Path, dataset: DatasetSpec) -> dict[str, str]:
    """Write one broken case per fault into ``dataset_root`` in ``dataset.layout``.

    Returns ``case_id -> keyword``. Loading each case raises ``CaseError`` whose reason contains the
    keyword, except the ``"all-zero label"`` case, which loads with that text in
    ``LoadedCase.warnings``. Faults: truncated .nii.gz, a file that is not NIfTI (an HTML page),
    image/label shape mismatch, affine mismatch (label shifted 2 mm), NaN voxels, an undeclared
    label value (TotalSegmentator: a mask of a structure not in the catalog), a 4-D image, a missing
    label, an all-zero label. Existing good cases and metadata (``dataset.json``, ``meta.csv``) are
    kept; the bad cases are added to the metadata like any other case.
    """
    root = Path(dataset_root)
    image, label, affine = _small_case(dataset)
    channel_naming = dataset.layout == "msd" and uses_channel_naming(root)
    ts = dataset.layout == "totalsegmentator"
    undeclared = min(set(range(1, 256)) - set(dataset.labels))
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    expected: dict[str, str] = {}
    for index, (fault, keyword) in enumerate(FAULTS.items()):
        case_id = _case_id(dataset.layout, index, fault)
        case_image: np.ndarray = image
        case_label: np.ndarray | dict[str, np.ndarray] | None = label
        image_dtype: type = np.int16
        label_affine = affine
        if fault == "shape":
            case_label = label[:, :, :-1]
            if ts:
                case_label = {name: label == v for v, name in dataset.labels.items()}
                first = dataset.labels[min(dataset.labels)]
                case_label[first] = case_label[first][:, :, :-1]
        elif fault == "affine":
            label_affine = shifted
        elif fault == "nan":
            case_image = image.copy()
            case_image[tuple(s // 2 for s in image.shape)] = np.nan
            case_image[0, 0, :3] = np.nan
            image_dtype = np.float32
        elif fault == "undeclared":
            if ts:
                case_label = {name: label == v for v, name in dataset.labels.items()}
                case_label["structure_not_in_catalog"] = label > 0
            else:
                case_label = label.copy()
                case_label[label > 0] = undeclared
        elif fault == "4d":
            case_image = np.stack([image, image], axis=-1)
        elif fault == "no_label":
            case_label = None
        elif fault == "empty_label":
            case_label = np.zeros_like(label)
        case = write_case(
            root,
            dataset,
            case_id=case_id,
            image=case_image,
            label=case_label,
            affine=affine,
            label_affine=label_affine,
            image_dtype=image_dtype,
            channel_naming=channel_naming,
        )
        if fault == "truncated":
            data = case.image_path.read_bytes()
            case.image_path.write_bytes(data[: len(data) * 3 // 5])
        elif fault == "not_nifti":
            case.image_path.write_bytes(b"<html><body><h1>404 Not Found</h1></body></html>\n")
        expected[case_id] = keyword
    return expected
