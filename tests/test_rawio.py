"""Raw layout readers and validated loading (rawio), on phantom cases written by synth."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from multitalent.catalog import DatasetSpec, load_preset
from multitalent.rawio import CaseError, RawCase, discover_cases, expected_label_path, load_case
from multitalent.synth import FAULTS, WARNING_FAULTS, write_bad_cases, write_case, write_phantom_collection

CATALOG = load_preset("phantom")
# One dataset per reader (P02 is MSD with nnU-Net v1 "_0000" names).
READER_DATASETS = ["P01", "P02", "P03", "P04", "P05", "P07"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    write_phantom_collection(out, seed=3, scale=0.01)  # one case per dataset
    return out


def _tiny(dataset: DatasetSpec, shape=(6, 5, 4)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.round(np.linspace(-1000, 400, int(np.prod(shape)))).astype(np.float32).reshape(shape)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:3, 1:3, 1:3] = min(dataset.labels)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    return image, label, affine


@pytest.mark.parametrize("dataset_id", [d.id for d in CATALOG.datasets])
def test_each_layout_discovers_and_loads_phantom_cases(collection: Path, dataset_id: str) -> None:
    dataset = CATALOG.dataset(dataset_id)
    cases = discover_cases(dataset, collection / dataset.location)
    assert len(cases) == 1
    case = cases[0]
    assert case.dataset_id == dataset_id and case.image_path.is_file()
    if dataset.layout == "totalsegmentator":
        assert case.label_path is None
        assert set(case.structure_paths or {}) == set(dataset.labels.values())
    else:
        assert case.label_path is not None and case.label_path.is_file()
    loaded = load_case(case, dataset)
    assert loaded.image.dtype == np.float32 and loaded.label.dtype == np.uint8
    assert loaded.image.ndim == 3 and loaded.image.shape == loaded.label.shape
    assert loaded.affine.shape == (4, 4) and loaded.warnings == []
    stored = nib.load(case.image_path)
    assert loaded.image.shape == stored.shape  # voxel order as stored, not reoriented
    np.testing.assert_allclose(loaded.affine, stored.affine)
    assert set(np.unique(loaded.label)) == {0, *dataset.labels}  # case 0 carries every label


def test_discovery_is_sorted_and_keeps_cases_without_labels(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P04")  # BTCV
    image, label, affine = _tiny(dataset)
    for case_id in ["0010", "0002", "0007"]:
        write_case(tmp_path, dataset, case_id=case_id, image=image, label=label, affine=affine)
    (tmp_path / "label" / "label0007.nii.gz").unlink()
    cases = discover_cases(dataset, tmp_path)
    assert [c.case_id for c in cases] == ["0002", "0007", "0010"]
    assert cases[1].label_path is None
    with pytest.raises(CaseError) as err:
        load_case(cases[1], dataset)
    assert err.value.path == tmp_path / "label" / "label0007.nii.gz"
    assert "missing label" in err.value.reason


def test_msd_single_files_and_v1_channel_names(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P01")
    image, label, affine = _tiny(dataset)
    single, channel = tmp_path / "single", tmp_path / "channel"
    write_case(single, dataset, case_id="liver_0001", image=image, label=label, affine=affine)
    (single / "imagesTr" / "._liver_0001.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    for case_id in ["liver_1", "liver_0"]:
        write_case(
            channel, dataset, case_id=case_id, image=image, label=label, affine=affine, channel_naming=True
        )
    write_case(
        channel, dataset, case_id="liver_0", image=image + 1, label=label, affine=affine, channel_naming=True
    )

    [case] = discover_cases(dataset, single)
    assert case.case_id == "liver_0001"  # ends in 4 digits, but the label is named by the full stem
    assert case.image_path.name == "liver_0001.nii.gz"
    cases = discover_cases(dataset, channel)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1"]
    assert [c.image_path.name for c in cases] == ["liver_0_0000.nii.gz", "liver_1_0000.nii.gz"]
    np.testing.assert_array_equal(load_case(cases[1], dataset).label, label)


def test_nnunet_v2_reads_channel_zero_and_region_labels(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P06")
    image, label, affine = _tiny(dataset)
    write_case(tmp_path, dataset, case_id="cardiac_000", image=image, label=label, affine=affine)
    # a second channel must be ignored: CT is channel 0
    nib.save(
        nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)),
        tmp_path / "imagesTr" / "cardiac_000_0001.nii.gz",
    )
    data = json.loads((tmp_path / "dataset.json").read_text())
    data["labels"] = {"background": 0, "heart": [1, 2], "aortic root": 2, "aorta": 3}
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    [case] = discover_cases(dataset, tmp_path)
    assert case.image_path.name == "cardiac_000_0000.nii.gz"
    np.testing.assert_array_equal(load_case(case, dataset).image, image)

    data["labels"]["calcium"] = [4, 5]  # raw values the catalog does not have
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(CaseError) as err:
        discover_cases(dataset, tmp_path)
    assert err.value.path.name == "dataset.json" and "[4, 5]" in err.value.reason

    (tmp_path / "dataset.json").unlink()
    with pytest.raises(CaseError, match=r"missing dataset\.json"):
        discover_cases(dataset, tmp_path)


def test_totalsegmentator_label_map_follows_catalog_values(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P07")  # 1 liver, 2 urinary_bladder, 3 vertebrae
    image, _, affine = _tiny(dataset)
    shape = image.shape
    liver, bladder, vertebrae = (np.zeros(shape, bool) for _ in range(3))
    liver[0:3] = True
    bladder[2:5] = True  # overlaps the liver in slab 2: the larger value (bladder) wins
    vertebrae[:, 0, 0] = True  # overlaps both
    masks = {"vertebrae": vertebrae, "liver": liver, "urinary_bladder": bladder}
    write_case(tmp_path, dataset, case_id="s0001", image=image, label=masks, affine=affine, split="val")
    meta = (tmp_path / "meta.csv").read_text().splitlines()
    assert meta[0].split(";")[0] == "image_id" and meta[0].split(";")[-1] == "split"
    assert meta[1].startswith("s0001;") and meta[1].endswith(";val")

    [case] = discover_cases(dataset, tmp_path)
    assert case.label_path is None and list(case.structure_paths or {}) == sorted(masks)
    loaded = load_case(case, dataset)
    expected = np.zeros(shape, np.uint8)
    expected[liver] = 1
    expected[bladder] = 2
    expected[vertebrae] = 3
    np.testing.assert_array_equal(loaded.label, expected)

    # a catalog structure without a mask file stays background, with a warning
    case.structure_paths["urinary_bladder"].unlink()  # type: ignore[index]
    [case] = discover_cases(dataset, tmp_path)
    loaded = load_case(case, dataset)
    assert (loaded.label == 2).sum() == 0 and any("urinary_bladder" in w for w in loaded.warnings)

    # a mask that is not binary
    nib.save(nib.Nifti1Image(liver.astype(np.uint8) * 7, affine), case.structure_paths["liver"])  # type: ignore[index]
    with pytest.raises(CaseError) as err:
        load_case(case, dataset)
    assert (
        err.value.path.name == "liver.nii.gz" and "not binary" in err.value.reason and "7" in err.value.reason
    )


def test_totalsegmentator_needs_meta_csv(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P07")
    image, label, affine = _tiny(dataset)
    write_case(tmp_path, dataset, case_id="s0001", image=image, label=label, affine=affine)
    (tmp_path / "meta.csv").write_text("image_id,split\ns0001,train\n")  # comma-separated: wrong
    with pytest.raises(CaseError, match="image_id"):
        discover_cases(dataset, tmp_path)
    (tmp_path / "meta.csv").unlink()
    with pytest.raises(CaseError, match=r"missing meta\.csv"):
        discover_cases(dataset, tmp_path)


@pytest.mark.parametrize("dataset_id", READER_DATASETS)
def test_bad_input_corpus_raises_case_error_naming_file_and_reason(
    collection: Path, tmp_path: Path, dataset_id: str
) -> None:
    dataset = CATALOG.dataset(dataset_id)
    root = tmp_path / dataset.location
    # start from the good phantom case so channel naming and metadata are those of the dataset
    source = collection / dataset.location
    for p in source.rglob("*"):
        if p.is_file():
            target = root / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    expected = write_bad_cases(root, dataset)
    assert sorted(expected.values()) == sorted(FAULTS.values())
    cases = {c.case_id: c for c in discover_cases(dataset, root)}
    assert set(expected) < set(cases)  # the good case is still there
    warning_keywords = {FAULTS[f] for f in WARNING_FAULTS}
    for case_id, keyword in expected.items():
        case = cases[case_id]
        if keyword in warning_keywords:
            loaded = load_case(case, dataset)
            assert any(keyword in w for w in loaded.warnings) and not loaded.label.any()
            continue
        with pytest.raises(CaseError) as err:
            load_case(case, dataset)
        e = err.value
        assert keyword in e.reason, (case_id, e)
        assert str(e) == f"{e.path}: {e.reason}"
        assert case_id in str(e.path)
        if keyword in ("truncated", "not a NIfTI", "NaN", "4-D"):
            assert e.path == case.image_path
        elif keyword == "missing label":
            assert e.path == expected_label_path(case, dataset) and not e.path.exists()
        else:  # shape, affine, undeclared values: the label (or mask) file
            assert e.path.is_file() and e.path != case.image_path


def test_file_format_faults(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P04")
    image, label, affine = _tiny(dataset, shape=(20, 20, 20))
    case = write_case(tmp_path, dataset, case_id="0001", image=image, label=label, affine=affine)

    def reason() -> str:
        with pytest.raises(CaseError) as err:
            load_case(case, dataset)
        assert err.value.path == case.image_path
        return err.value.reason

    good = case.image_path.read_bytes()
    case.image_path.write_bytes(gzip.compress(b"P5\n20 20\n255\n" + bytes(400), mtime=0))  # a gzipped PGM
    assert "not a NIfTI" in reason()
    case.image_path.write_bytes(b"")
    assert "not a NIfTI" in reason() and "empty" in reason()
    case.image_path.write_bytes(good[:200])  # cut inside the header
    assert "truncated" in reason()
    raw = gzip.decompress(good)
    plain = RawCase(case.dataset_id, case.case_id, tmp_path / "img" / "img0001.nii", case.label_path)
    plain.image_path.write_bytes(raw[: len(raw) // 2])  # uncompressed .nii cut in the data
    with pytest.raises(CaseError) as err:
        load_case(plain, dataset)
    assert "truncated" in err.value.reason and err.value.path.name == "img0001.nii"


def test_label_value_checks(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P01")  # labels 1, 2
    image, label, affine = _tiny(dataset)

    def load(lab: np.ndarray, dtype) -> object:
        case = write_case(tmp_path, dataset, case_id="liver_0", image=image, label=None, affine=affine)
        path = tmp_path / "labelsTr" / "liver_0.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(lab.astype(dtype), affine), path)
        return load_case(RawCase(case.dataset_id, case.case_id, case.image_path, path), dataset)

    lab = label.astype(np.float64) * 2.0
    np.testing.assert_array_equal(load(lab, np.float64).label, label * 2)  # float labels with integer values
    lab[0, 0, 0] = 0.5
    with pytest.raises(CaseError, match="non-integer"):
        load(lab, np.float32)
    lab = label.astype(np.int16)
    lab[0, 0, 0], lab[0, 0, 1], lab[0, 0, 2] = 300, -1, 3
    with pytest.raises(CaseError) as err:
        load(lab, np.int16)
    assert "not declared" in err.value.reason and "[-1, 3, 300]" in err.value.reason
    lab = label.astype(np.uint8)
    lab[0, 0, 0] = 7
    with pytest.raises(CaseError, match=r"\[7\] are not declared"):
        load(lab, np.uint8)


def test_geometry_tolerance_and_singleton_fourth_axis(tmp_path: Path) -> None:
    dataset = CATALOG.dataset("P03")
    image, label, affine = _tiny(dataset)
    near = affine.copy()
    near[0, 3] += 4e-4
    case = write_case(
        tmp_path,
        dataset,
        case_id="case_00000",
        image=image[..., None],
        label=label,
        affine=affine,
        label_affine=near,
    )
    loaded = load_case(case, dataset)  # trailing singleton axis squeezed, 0.4 um is within tolerance
    assert loaded.image.shape == label.shape
    with pytest.raises(CaseError, match="affine mismatch"):
        load_case(case, dataset, affine_atol_mm=1e-4)
    image_inf = image.copy()
    image_inf[0, 0, 0] = np.inf
    case = write_case(
        tmp_path,
        dataset,
        case_id="case_00001",
        image=image_inf,
        label=label,
        affine=affine,
        image_dtype=np.float32,
    )
    with pytest.raises(CaseError, match="1 Inf"):
        load_case(case, dataset)


def test_case_error_survives_pickling() -> None:
    e = pickle.loads(pickle.dumps(CaseError(Path("/x/y.nii.gz"), "truncated file")))
    assert (
        isinstance(e, CaseError) and e.path == Path("/x/y.nii.gz") and str(e) == "/x/y.nii.gz: truncated file"
    )


# ----------------------------------------------------------------------------- fast mask path
@pytest.mark.parametrize("order", ["C", "F"])
def test_painting_masks_in_their_box_equals_full_volume_indexing(order: str) -> None:
    from multitalent.rawio.load import _nonzero_box, _paint_mask

    rng = np.random.default_rng(3)
    fast = np.zeros((20, 30, 40), np.uint8)
    slow = np.zeros_like(fast)
    for value in (3, 7, 9):  # ascending, overlapping: the larger value wins in both
        mask = np.zeros((20, 30, 40), np.uint8, order=order)
        z, y, x = rng.integers(0, 15), rng.integers(0, 20), rng.integers(0, 30)
        mask[z : z + 6, y : y + 9, x : x + 11] = rng.integers(0, 2, size=(6, 9, 11), dtype=np.uint8)
        _paint_mask(fast, mask, value, path=Path("m.nii.gz"), name=f"s{value}")
        slow[mask == 1] = value
        box = _nonzero_box(mask)
        assert box is not None
        nz = np.argwhere(mask)
        assert [(s.start, s.stop) for s in box] == [
            (int(a), int(b) + 1) for a, b in zip(nz.min(0), nz.max(0))
        ]
    assert np.array_equal(fast, slow)
    assert _nonzero_box(np.zeros((4, 5, 6), np.uint8, order=order)) is None
    with pytest.raises(CaseError, match=r"not binary: has values \[2\]"):
        _paint_mask(fast, np.full((20, 30, 40), 2, np.uint8, order=order), 1, path=Path("m"), name="m")
    floats = np.zeros((20, 30, 40), np.float32)
    floats[1, 2, 3] = np.nan
    with pytest.raises(CaseError, match="non-finite"):
        _paint_mask(fast, floats, 1, path=Path("m"), name="m")


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_gzip_read_in_memory_equals_nibabel_for_multi_member_files(tmp_path: Path, klass: type) -> None:
    from multitalent.rawio.nifti import read_volume

    data = np.random.default_rng(0).integers(0, 2, size=(7, 8, 9)).astype(np.uint8)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    plain = tmp_path / "m.nii"
    nib.save(klass(data, affine), plain)
    raw = plain.read_bytes()
    two = tmp_path / "two.nii.gz"  # two gzip members, as concatenated or bgzip-like files have
    two.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    from multitalent.rawio.nifti import _load_fast

    assert _load_fast(two) is not None  # the in-memory path, not nibabel's fallback
    array, got_affine = read_volume(two, what="mask")
    assert np.array_equal(array, data) and np.allclose(got_affine, affine)
    view, _ = read_volume(two, what="mask", writeable=False)  # no copy of the decompressed voxels
    assert np.array_equal(view, data) and not view.flags.writeable and array.flags.writeable
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(gzip.compress(raw)[:-40])
    with pytest.raises(CaseError, match="truncated"):
        read_volume(truncated, what="mask")
