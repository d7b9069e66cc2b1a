"""The phantom collection: determinism, layouts, geometry, annotation protocols."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from multitalent.catalog import load_preset
from multitalent.cli import main
from multitalent.rawio import discover_cases, load_case
from multitalent.synth import SCANS, make_case, write_phantom_collection
from multitalent.synth.anatomy import FOV_MM, Tissue, render_tissues, sample_anatomy
from multitalent.synth.collection import case_count, protocol_lut
from multitalent.synth.geometry import grid_affine

CATALOG = load_preset("phantom")
SCALE = 0.25


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom")
    return out, write_phantom_collection(out, seed=0, scale=SCALE)


@pytest.fixture(scope="module")
def loaded(collection: tuple[Path, dict]) -> dict[str, list]:
    out, _ = collection
    return {d.id: [load_case(c, d) for c in discover_cases(d, out / d.location)] for d in CATALOG.datasets}


def _world_z(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).T
    return (affine[:3, :3] @ ijk + affine[:3, 3:4])[2]


def test_every_layout_used_and_case_counts_follow_scale(collection: tuple[Path, dict]) -> None:
    out, summary = collection
    assert set(summary) == set(CATALOG.dataset_ids)
    assert {d.layout for d in CATALOG.datasets} == {"msd", "nnunet_v2", "kits19", "btcv", "totalsegmentator"}
    for d in CATALOG.datasets:
        assert len(summary[d.id]["cases"]) == max(1, round(d.num_cases * SCALE))
        assert len(discover_cases(d, out / d.location)) == len(summary[d.id]["cases"])
        assert case_count(d, 1.0) == d.num_cases and case_count(d, 0.001) == 1
    counts = [d.num_cases for d in CATALOG.datasets]
    assert min(counts) <= 3 and max(counts) >= 12  # sizes differ enough for 1/sqrt(n) sampling to matter


def test_declared_labels_appear_in_each_dataset(loaded: dict[str, list]) -> None:
    for d in CATALOG.datasets:
        present = set().union(*(np.unique(c.label).tolist() for c in loaded[d.id]))
        assert present == {0, *d.labels}, d.id
        for c in loaded[d.id]:
            assert c.warnings == []


def test_protocols_match_the_catalog() -> None:
    for d in CATALOG.datasets:
        assert set(SCANS[d.id].protocol.values()) == set(d.labels), d.id


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_phantom_collection(a, seed=5, scale=0.01)
    write_phantom_collection(b, seed=5, scale=0.01)
    write_phantom_collection(c, seed=6, scale=0.01)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 20
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    images = [
        f for f in files if "label" not in str(f) and "segmentations" not in str(f) and f.suffix == ".gz"
    ]
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in images)


def test_geometry_varies_between_datasets(loaded: dict[str, list]) -> None:
    axcodes, z_spacings, inplane = set(), set(), set()
    for cases in loaded.values():
        for c in cases:
            codes = nib.aff2axcodes(c.affine)
            axcodes.add(codes)
            zooms = np.sqrt((c.affine[:3, :3] ** 2).sum(axis=0))
            z_axis = next(i for i, code in enumerate(codes) if code in "SI")
            z_spacings.add(round(float(zooms[z_axis]), 2))
            inplane.update(round(float(zooms[i]), 2) for i in range(3) if i != z_axis)
            assert all(30 <= n <= 90 for n in c.image.shape), c.image.shape  # small volumes
    assert {("R", "A", "S"), ("L", "P", "S"), ("I", "P", "L")} <= axcodes
    assert min(z_spacings) <= 1.5 and max(z_spacings) >= 3.0
    assert min(inplane) <= 1.0 and max(inplane) >= 1.5


def test_orientation_and_spacing_sample_the_same_world_anatomy() -> None:
    anatomy = sample_anatomy(np.random.default_rng(1), force_tumours=True)
    lo = tuple(FOV_MM[a][0] for a in "xyz")
    hi = tuple(FOV_MM[a][1] for a in "xyz")
    canonical = []
    for codes in ("RAS", "LPS", "IPL", "LAS"):
        shape, affine = grid_affine(axcodes=codes, spacing_xyz_mm=(2.0, 2.0, 3.0), lo_xyz_mm=lo, hi_xyz_mm=hi)
        assert nib.aff2axcodes(affine) == tuple(codes)
        tissue = render_tissues(anatomy, shape, affine)
        img = nib.as_closest_canonical(nib.Nifti1Image(tissue, affine))
        canonical.append((np.asarray(img.dataobj), img.affine))
    for data, affine in canonical[1:]:
        np.testing.assert_allclose(affine, canonical[0][1], atol=1e-9)
        np.testing.assert_array_equal(data, canonical[0][0])
    # and the liver is on the patient's right (+x in RAS), the spleen on the left
    data, affine = canonical[0]
    x_of = lambda t: (affine[:3, :3] @ np.argwhere(data == t).T + affine[:3, 3:4])[0].mean()  # noqa: E731
    assert x_of(Tissue.LIVER) > 5 and x_of(Tissue.SPLEEN) < -5


def test_intensity_offsets_and_organ_contrast(loaded: dict[str, list]) -> None:
    for d in CATALOG.datasets:
        c = loaded[d.id][0]
        air = c.image[c.image < -500]
        assert abs(float(np.median(air)) - (-1000 + SCANS[d.id].hu_offset)) < 10, d.id
    p01 = loaded["P01"][0]
    liver, tumour = p01.image[p01.label == 1], p01.image[p01.label == 2]
    assert liver.mean() - tumour.mean() > 30  # tumours are visible
    p05 = loaded["P05"][0]
    assert p05.image[p05.label == 1].mean() < -700  # lung
    assert p05.image[p05.label == 4].mean() > 150  # contrast-filled aorta


def test_conflicting_protocols_for_heart_and_aorta(loaded: dict[str, list]) -> None:
    # P04 labels the aorta below the diaphragm only, P05 the whole aorta
    p04 = loaded["P04"][0]
    p05 = loaded["P05"][0]
    assert _world_z(p04.affine, p04.label == 6).max() < 20  # diaphragm at z = 4 +- a few mm
    assert _world_z(p05.affine, p05.label == 4).max() > 30
    # P06's heart class covers the aortic root (raw 2), which P05 calls aorta
    p06 = loaded["P06"][0]
    assert (p06.label == 2).sum() > 20
    heart06 = CATALOG.dataset("P06").classes[0]
    assert heart06.name == "heart" and set(heart06.raw_values) == {1, 2}
    # same anatomy, two protocols: the root is heart for P06 and aorta for P05
    lut05, lut06 = protocol_lut(SCANS["P05"]), protocol_lut(SCANS["P06"])
    assert lut05[Tissue.AORTIC_ROOT] == 4 and lut06[Tissue.AORTIC_ROOT] == 2
    # kidney tumours are drawn inside a kidney: the tumour touches kidney voxels
    from scipy.ndimage import binary_dilation

    _, label, _ = make_case(SCANS["P03"], seed=0, dataset_index=2, case_index=0)
    tumour = label == 2
    assert tumour.sum() > 10 and (label == 1).sum() > tumour.sum()
    assert (label[binary_dilation(tumour) & ~tumour] == 1).any()


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "raw"), "--seed", "2", "--scale", "0.01"]) == 0
    text = capsys.readouterr().out
    for d in CATALOG.datasets:
        assert d.id in text and (tmp_path / "raw" / d.location).is_dir()
    assert "7 datasets, 7 cases" in text


def test_convert_command_writes_the_phantom_collection_only_when_asked_and_missing(tmp_path: Path) -> None:
    from multitalent.convert.cli import generate_missing_raw
    from multitalent.convert.job import ConvertJob
    from multitalent.jobs import load_job

    repo = Path(__file__).resolve().parents[1]
    raw = tmp_path / "raw"

    def job(*sets: str) -> ConvertJob:
        return load_job(
            repo / "jobs" / "convert.yaml", ConvertJob, [f"raw_root={raw}", f"out={tmp_path / 'out'}", *sets]
        )

    logged: list[str] = []
    assert not generate_missing_raw(job("synth=null"), log=logged.append) and not raw.exists()
    assert generate_missing_raw(job("synth.scale=0.01"), log=logged.append)
    assert all((raw / d.location).is_dir() for d in CATALOG.datasets)
    assert len(logged) == 1 and "phantom collection" in logged[0]
    assert not generate_missing_raw(job("synth.scale=0.01"), log=logged.append)  # exists: left alone
    assert len(logged) == 1
