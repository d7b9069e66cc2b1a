"""The phantom collection: catalog preset ``phantom`` written in every raw layout.

Each dataset images its own patients (one :func:`~multitalent.synth.anatomy.sample_anatomy` per
case) with its own scanner geometry, and annotates them with its own *protocol*: a lookup from
tissue to raw label value. The protocols make the collection partial (few structures per dataset),
overlapping (organ-with-tumour regions beside tumour classes) and conflicting (heart with and
without the aortic root; aorta whole, without the root, or abdominal only), as real collections are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitalent.catalog.model import Catalog, DatasetSpec
from multitalent.synth.anatomy import FOV_MM, Tissue, render_tissues, sample_anatomy, tissues_to_hu
from multitalent.synth.geometry import grid_affine
from multitalent.synth.writer import update_dataset_json, write_case

T = Tissue


@dataclass(frozen=True)
class PhantomScan:
    """How one phantom dataset is scanned, stored and annotated."""

    axcodes: str  # voxel axis directions (nibabel.aff2axcodes)
    spacing_xy_mm: tuple[float, float]  # in-plane spacing, uniform per case in this range
    spacing_z_mm: float
    case_id_format: str  # formatted with i = case index
    protocol: Mapping[Tissue, int]  # tissue -> raw label value; other tissues are background
    hu_offset: float = 0.0
    image_dtype: str = "int16"
    channel_naming: bool = False  # MSD layout with nnU-Net v1 "<case>_0000" image names
    dataset_json: Mapping[str, Any] = field(default_factory=dict)  # extra dataset.json fields


SCANS: dict[str, PhantomScan] = {
    "P01": PhantomScan("RAS", (1.1, 1.3), 2.5, "liver_{i}", {T.LIVER: 1, T.LIVER_TUMOUR: 2}),
    "P02": PhantomScan("LPS", (0.9, 0.9), 1.5, "spleen_{i}", {T.SPLEEN: 1}, channel_naming=True),
    "P03": PhantomScan(
        "IPL",
        (0.9, 1.1),
        3.0,
        "case_{i:05d}",
        {T.KIDNEY_LEFT: 1, T.KIDNEY_RIGHT: 1, T.KIDNEY_TUMOUR_LEFT: 2, T.KIDNEY_TUMOUR_RIGHT: 2},
    ),
    "P04": PhantomScan(
        "LAS",
        (1.5, 1.5),
        3.0,
        "{i1:04d}",
        {
            T.SPLEEN: 1,
            T.KIDNEY_RIGHT: 2,
            T.KIDNEY_TUMOUR_RIGHT: 2,
            T.KIDNEY_LEFT: 3,
            T.KIDNEY_TUMOUR_LEFT: 3,
            T.LIVER: 4,
            T.LIVER_TUMOUR: 4,
            T.STOMACH: 5,
            T.STOMACH_GAS: 5,
            T.AORTA_ABDOMINAL: 6,  # protocol: aorta below the diaphragm only
        },
        hu_offset=20.0,
    ),
    "P05": PhantomScan(
        "RAS",
        (1.0, 1.0),
        2.0,
        "thorax_{i:03d}",
        {
            T.LUNG_LEFT: 1,
            T.LUNG_RIGHT: 2,
            T.HEART: 3,  # protocol: heart without the aortic root
            T.AORTIC_ROOT: 4,
            T.AORTA_THORACIC: 4,
            T.AORTA_ABDOMINAL: 4,
        },
        image_dtype="float32",
    ),
    "P06": PhantomScan(
        "LPS",
        (1.2, 1.2),
        2.5,
        "cardiac_{i:03d}",
        {T.HEART: 1, T.AORTIC_ROOT: 2, T.AORTA_THORACIC: 3, T.AORTA_ABDOMINAL: 3},
        hu_offset=-10.0,
        dataset_json={
            "labels": {"background": 0, "heart": [1, 2], "aortic root": 2, "aorta": 3},
            "regions_class_order": [1, 2, 3],
        },
    ),
    "P07": PhantomScan(
        "RAS",
        (1.5, 1.5),
        1.5,
        "s{i:04d}",
        {T.LIVER: 1, T.LIVER_TUMOUR: 1, T.BLADDER: 2, T.VERTEBRA: 3, T.DISC: 3},
    ),
}


def phantom_catalog() -> Catalog:
    from multitalent.catalog.presets import load_preset

    return load_preset("phantom")


def protocol_lut(scan: PhantomScan) -> np.ndarray:
    """uint8 lookup ``tissue -> raw label value`` (256 entries)."""
    lut = np.zeros(256, dtype=np.uint8)
    for tissue, value in scan.protocol.items():
        lut[int(tissue)] = value
    return lut


def case_count(dataset: DatasetSpec, scale: float) -> int:
    return max(1, round(dataset.num_cases * scale))


def make_case(
    scan: PhantomScan, *, seed: int, dataset_index: int, case_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: ``(image_ijk float32 HU, label_ijk uint8, affine)``.

    Case 0 of every dataset always has both tumours, so each declared label value occurs.
    """
    anatomy_seq, grid_seq, noise_seq = np.random.SeedSequence([seed, dataset_index, case_index]).spawn(3)
    anatomy = sample_anatomy(np.random.default_rng(anatomy_seq), force_tumours=case_index == 0)
    grid_rng = np.random.default_rng(grid_seq)
    spacing_xy = round(float(grid_rng.uniform(*scan.spacing_xy_mm)), 2)
    jx, jy = grid_rng.uniform(-3.0, 3.0, 2)
    trim_lo, trim_hi = grid_rng.uniform(0.0, 6.0, 2)
    shape, affine = grid_affine(
        axcodes=scan.axcodes,
        spacing_xyz_mm=(spacing_xy, spacing_xy, scan.spacing_z_mm),
        lo_xyz_mm=(FOV_MM["x"][0] + jx, FOV_MM["y"][0] + jy, FOV_MM["z"][0] + trim_lo),
        hi_xyz_mm=(FOV_MM["x"][1] + jx, FOV_MM["y"][1] + jy, FOV_MM["z"][1] - trim_hi),
    )
    tissue = render_tissues(anatomy, shape, affine)
    image = tissues_to_hu(tissue, np.random.default_rng(noise_seq), hu_offset=scan.hu_offset)
    return image, protocol_lut(scan)[tissue], affine


def write_phantom_collection(out: Path, *, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Write every dataset of the ``phantom`` preset to ``out/<dataset.location>/``.

    ``scale`` multiplies each dataset's ``num_cases`` (at least one case each). The same seed gives
    the same bytes. Files already in those folders are overwritten or kept, never deleted: write
    into an empty ``out`` for a clean collection. Returns a JSON-able summary per dataset id:
    layout, folder, case ids, spacing range (x, y, z mm), orientation, HU offset, classes.
    """
    out = Path(out)
    catalog = phantom_catalog()
    summary: dict[str, Any] = {}
    for dataset_index, dataset in enumerate(catalog.datasets):
        scan = SCANS[dataset.id]
        root = out / dataset.location
        n = case_count(dataset, scale)
        case_ids = []
        spacings = []
        for i in range(n):
            image, label, affine = make_case(scan, seed=seed, dataset_index=dataset_index, case_index=i)
            case_id = scan.case_id_format.format(i=i, i1=i + 1)
            split = "test" if n >= 3 and i == n - 1 else "train"
            write_case(
                root,
                dataset,
                case_id=case_id,
                image=image,
                label=label,
                affine=affine,
                image_dtype=np.dtype(scan.image_dtype),
                channel_naming=scan.channel_naming,
                split=split,
            )
            case_ids.append(case_id)
            spacings.append(np.sqrt((affine[:3, :3] ** 2).sum(axis=1)))  # per world axis
        if scan.dataset_json:
            update_dataset_json(root, **scan.dataset_json)
        spacing = np.array(spacings)
        summary[dataset.id] = {
            "name": dataset.name,
            "layout": dataset.layout,
            "path": str(root),
            "cases": case_ids,
            "spacing_xyz_mm": [
                [round(float(a), 2), round(float(b), 2)] for a, b in zip(spacing.min(0), spacing.max(0))
            ],
            "axcodes": scan.axcodes,
            "hu_offset": scan.hu_offset,
            "classes": [c.name for c in dataset.classes],
        }
    return summary
