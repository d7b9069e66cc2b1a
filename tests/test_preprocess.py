"""Preprocessing: orientation, crop, resampling, statistics, plan, and the way back."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from scipy import ndimage

from multitalent.catalog import Catalog, DatasetSpec
from multitalent.preprocess import (
    DEFAULT_SPACING_ZYX_MM,
    PLAN_FILE,
    IntensityStats,
    Normalization,
    Plan,
    PlanError,
    PreprocessError,
    foreground_intensity_every_nth,
    foreground_intensity_sample,
    preprocess_case,
    preprocess_image,
    resample_image,
    resample_label,
    resampled_shape,
    restore_label,
    restore_probabilities,
    separate_axis,
)
from multitalent.preprocess import plan as plan_module
from multitalent.preprocess.resample import axis_matrix, nearest_indices

LIVER = DatasetSpec.from_dict(
    {
        "id": "liver",
        "layout": "msd",
        "labels": {"1": "liver", "2": "tumour", "3": "vessel"},
        "classes": [
            {"name": "liver", "raw_values": [1, 2]},
            {"name": "tumour", "raw_values": [2]},
            {"name": "vessel", "raw_values": [3]},
            {"name": "unused", "raw_values": [3, 1]},
        ],
    }
)
CATALOG = Catalog("test", (LIVER,))
ALL_ORIENTATIONS = [
    (perm, flips)
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((1, -1), repeat=3)
]


def make_plan(spacing_zyx: tuple[float, float, float] = (1.5, 1.0, 1.0), per_class: int = 10_000) -> Plan:
    return Plan.for_catalog(CATALOG, target_spacing_zyx_mm=spacing_zyx, fg_locations_per_class=per_class)


def canonical_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image and label in RAS voxel order (x, y, z), with an air border that gets cropped."""
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[2:12, 3:10, 1:9] = rng.normal(40, 30, (10, 7, 8))
    label = np.zeros(shape, dtype=np.uint8)
    label[3:10, 4:9, 2:8] = 1
    label[5:8, 5:7, 3:5] = 2
    label[9, 8, 6] = 3  # a single voxel
    label[4, 4, 2:4] = 0  # not convex
    return image, label


def stored_version(ras: np.ndarray, perm: tuple[int, ...], flips: tuple[int, ...], spacing_ras: list[float]):
    """The same physical volume stored with voxel axis i along world axis perm[i], flipped if -1."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for i, (axis, flip) in enumerate(zip(perm, flips)):
        affine[axis, i] = flip * spacing_ras[axis]
    affine[:3, 3] = (12.0, -30.0, 7.5)
    # world axis `axis` runs along stored axis i: undo the RAS layout accordingly
    to_ras = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(affine))
    stored = nio.apply_orientation(ras, back)
    assert np.array_equal(nio.apply_orientation(stored, to_ras), ras)
    return np.asarray(stored), affine


# ----------------------------------------------------------------------------- orientation
@pytest.mark.parametrize(("perm", "flips"), ALL_ORIENTATIONS)
def test_label_round_trip_is_exact_in_every_orientation(perm, flips):
    image_ras, label_ras = canonical_phantom()
    image, affine = stored_version(image_ras, perm, flips, [1.0, 1.0, 1.5])
    label, _ = stored_version(label_ras, perm, flips, [1.0, 1.0, 1.5])
    case = preprocess_case(image, label, affine, plan=make_plan(), dataset=LIVER, seed_key="liver/c1")
    # the air border was cropped, and nothing was resampled
    assert case.label_zyx.size < label.size
    assert case.geometry["shape_after_crop_zyx"] == case.geometry["shape_after_resample_zyx"]
    geometry = json.loads(json.dumps(case.geometry))  # survives JSON
    back = restore_label(case.label_zyx, geometry)
    assert back.shape == label.shape
    assert back.dtype == np.uint8
    assert np.array_equal(back, label)


@pytest.mark.parametrize(("perm", "flips"), ALL_ORIENTATIONS[::5])
def test_canonical_volume_is_independent_of_storage_order(perm, flips):
    image_ras, label_ras = canonical_phantom()
    image, affine = stored_version(image_ras, perm, flips, [1.0, 1.0, 1.5])
    label, _ = stored_version(label_ras, perm, flips, [1.0, 1.0, 1.5])
    image_zyx, label_zyx, geometry = preprocess_image(image, affine, plan=make_plan(), label=label)
    expected_zyx = label_ras.transpose(2, 1, 0)  # RAS (x, y, z) -> (z, y, x), superior = high z
    box = geometry["crop_box_zyx"]
    assert label_zyx is not None
    assert np.array_equal(label_zyx, expected_zyx[tuple(slice(a, b) for a, b in box)])
    lo, hi = make_plan().normalization.clip
    expected_image = np.rint(np.clip(image_ras.transpose(2, 1, 0), lo, hi)).astype(np.int16)
    assert np.array_equal(image_zyx, expected_image[tuple(slice(a, b) for a, b in box)])
    assert geometry["spacing_before_zyx_mm"] == pytest.approx([1.5, 1.0, 1.0])


def test_crop_keeps_labels_in_air_and_box_of_body():
    image_ras, label_ras = canonical_phantom()
    label_ras[0, 0, 0] = 3  # a labelled voxel out in the air must survive the crop
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    case = preprocess_case(image_ras, label_ras, affine, plan=make_plan(), dataset=LIVER, seed_key="k")
    assert case.geometry["crop_box_zyx"] == [[0, 9], [0, 10], [0, 12]]
    assert np.array_equal(restore_label(case.label_zyx, case.geometry), label_ras)
    label_ras[0, 0, 0] = 0
    case = preprocess_case(image_ras, label_ras, affine, plan=make_plan(), dataset=LIVER, seed_key="k")
    assert case.geometry["crop_box_zyx"] == [[1, 9], [3, 10], [2, 12]]
    # a lone noise voxel in the air does not stretch the box; two neighbours along x do
    image_ras[13, 0, 0] = -900.0
    case = preprocess_case(image_ras, label_ras, affine, plan=make_plan(), dataset=LIVER, seed_key="k")
    assert case.geometry["crop_box_zyx"] == [[1, 9], [3, 10], [2, 12]]
    image_ras[12, 0, 0] = -900.0
    case = preprocess_case(image_ras, label_ras, affine, plan=make_plan(), dataset=LIVER, seed_key="k")
    assert case.geometry["crop_box_zyx"] == [[0, 9], [0, 10], [2, 14]]


def test_nifti_file_round_trip(tmp_path):
    image_ras, label_ras = canonical_phantom()
    image, affine = stored_version(image_ras, (0, 1, 2), (-1, -1, 1), [0.8, 0.8, 2.5])  # LPS-like
    label, _ = stored_version(label_ras, (0, 1, 2), (-1, -1, 1), [0.8, 0.8, 2.5])
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    img = nib.load(tmp_path / "img.nii.gz")
    lab = nib.load(tmp_path / "lab.nii.gz")
    case = preprocess_case(
        img.get_fdata(dtype=np.float32),
        np.asarray(lab.dataobj, dtype=np.uint8),
        img.affine,
        plan=make_plan(),
        dataset=LIVER,
        seed_key="liver/nifti",
    )
    assert case.geometry["original_axcodes"] == "LPS"
    assert case.geometry["separate_axis"] == 0  # 2.5 / 0.8 > 3: z is resampled with order 0
    back = restore_label(case.label_zyx, case.geometry)
    nib.save(nib.Nifti1Image(back, np.asarray(case.geometry["original_affine"])), tmp_path / "back.nii.gz")
    again = nib.load(tmp_path / "back.nii.gz")
    assert np.allclose(again.affine, affine)
    # resampled forth and back (0.8 -> 1 -> 0.8 mm, 2.5 -> 1.5 -> 2.5 mm): the organ comes back
    # nearly whole, the 12-voxel tumour at least in part
    back_arr = np.asarray(again.dataobj)
    a, b = label == 1, back_arr == 1
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    assert ((back_arr == 2) & (label == 2)).any()


# ------------------------------------------------------------------------------ resampling
def test_resampled_shape_and_separate_axis_rule():
    assert resampled_shape((200, 512, 512), (2.5, 0.8, 0.8), (1.5, 1.0, 1.0)) == (333, 410, 410)
    assert resampled_shape((3, 3, 3), (1, 1, 1), (10, 10, 10)) == (1, 1, 1)
    assert separate_axis((3.5, 1.0, 1.0), (1.5, 1.0, 1.0)) == 0
    assert separate_axis((2.9, 1.0, 1.0), (1.5, 1.0, 1.0)) is None
    assert separate_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0)) == 1  # the target's anisotropy counts too
    assert separate_axis((1.0, 4.0, 4.0), (1.0, 1.0, 1.0)) is None  # two low-resolution axes
    assert separate_axis((3.5, 1.0, 1.0), (1.5, 1.0, 1.0), anisotropy_threshold=4.0) is None


def smooth_volume(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 300).astype(np.float32)


@pytest.mark.parametrize("out_shape", [(9, 30, 17), (20, 12, 40), (11, 19, 23)])
def test_cubic_resampling_matches_scipy_zoom(out_shape):
    x = smooth_volume((11, 19, 23))
    ours = resample_image(x, out_shape)
    zoom = np.divide(out_shape, x.shape)
    ref = ndimage.zoom(x.astype(np.float64), zoom, order=3, mode="nearest", grid_mode=True)
    assert ref.shape == ours.shape
    assert ours.dtype == np.float32
    # float32 arithmetic on values of a few hundred: agreement to 1e-3
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_axis_operators_match_scipy_to_float64_precision():
    for n_in, n_out in [(7, 11), (10, 5), (64, 51), (1, 3), (2, 5)]:
        eye = np.eye(n_in)
        for order in (1, 3):
            ref = ndimage.zoom(eye, (n_out / n_in, 1), order=order, mode="nearest", grid_mode=True)
            assert np.abs(axis_matrix(n_in, n_out, order) - ref).max() < 1e-9
        coords = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        ref0 = ndimage.map_coordinates(np.arange(n_in, dtype=float), coords[None], order=0, mode="nearest")
        assert np.array_equal(nearest_indices(n_in, n_out), ref0.astype(int))


def test_separate_axis_is_nearest_along_it_and_cubic_in_plane():
    x = smooth_volume((6, 16, 15))
    out_shape = (14, 12, 20)
    ours = resample_image(x, out_shape, separate_axis=0)
    inplane = ndimage.zoom(
        x.astype(np.float64), (1, 12 / 16, 20 / 15), order=3, mode="nearest", grid_mode=True
    )
    coords = (np.arange(14) + 0.5) * 6 / 14 - 0.5
    idx = ndimage.map_coordinates(np.arange(6, dtype=float), coords[None], order=0, mode="nearest")
    ref = inplane[idx.astype(int)]
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
    # every output slice is a copy of a resampled input slice: no interpolation along z
    assert all(any(np.allclose(s, t, atol=1e-3) for t in inplane) for s in ours)


def test_preprocess_uses_separate_z_past_anisotropy_three():
    rng = np.random.default_rng(3)
    image = rng.normal(0, 100, (12, 10, 4)).astype(np.float32)  # (x, y, z)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[3:8, 2:7, 1:3] = 1
    thick = np.diag([1.0, 1.0, 3.5, 1.0])  # 3.5 / 1 > 3
    thin = np.diag([1.0, 1.0, 2.5, 1.0])
    plan = make_plan()
    g_thick = preprocess_case(image, label, thick, plan=plan, dataset=LIVER, seed_key="a").geometry
    g_thin = preprocess_case(image, label, thin, plan=plan, dataset=LIVER, seed_key="a").geometry
    assert g_thick["separate_axis"] == 0
    assert g_thin["separate_axis"] is None
    case = preprocess_case(image, label, thick, plan=plan, dataset=LIVER, seed_key="a")
    assert case.image_zyx.shape == (9, 10, 12)  # 4 * 3.5 / 1.5 = 9.33 -> 9
    # order 0 in z: consecutive output slices mapped to the same input slice are identical
    idx = nearest_indices(4, 9)
    for a, b in zip(range(8), range(1, 9)):
        if idx[a] == idx[b]:
            assert np.array_equal(case.image_zyx[a], case.image_zyx[b])


def reference_label_resample(label: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Full-volume reference: scipy linear zoom of every indicator, argmax, ties -> nearest."""
    zoom = np.divide(out_shape, label.shape)
    values = np.unique(label)
    scores = np.stack(
        [
            ndimage.zoom((label == v).astype(float), zoom, order=1, mode="nearest", grid_mode=True)
            for v in values
        ]
    )
    top = scores.max(axis=0)
    tied = scores >= top - 1e-5
    nearest = ndimage.zoom(label, zoom, order=0, mode="nearest", grid_mode=True)
    nearest_pos = np.searchsorted(values, nearest)
    nearest_tied = np.take_along_axis(tied, nearest_pos[None], axis=0)[0]
    return np.where(nearest_tied, nearest, values[tied.argmax(axis=0)]).astype(label.dtype)


@pytest.mark.parametrize("out_shape", [(16, 24, 28), (7, 9, 11), (13, 17, 19), (24, 36, 42)])
def test_label_resampling_matches_per_label_linear_argmax(out_shape):
    rng = np.random.default_rng(5)
    label = np.zeros((12, 18, 21), dtype=np.uint8)
    label[2:10, 3:15, 4:17] = 1
    label[4:7, 6:11, 8:12] = 2
    label[8:10, 12:14, 14:16] = 7
    label[rng.random(label.shape) < 0.03] = 4
    ours = resample_label(label, out_shape)
    assert np.array_equal(ours, reference_label_resample(label, out_shape))


def test_label_resampling_keeps_values_and_small_structures():
    label = np.zeros((20, 40, 40), dtype=np.uint8)
    label[3:17, 5:35, 5:35] = 1
    label[8:11, 18:21, 18:21] = 2  # 3x3x3 structure inside
    label[15:17, 2:4, 36:38] = 3  # 2x2x2 structure at the border
    out = resample_label(label, (16, 32, 32))  # 0.8x in each axis
    assert set(np.unique(out)) == {0, 1, 2, 3}
    assert (out == 2).sum() >= 8
    up = resample_label(label, (30, 50, 50))
    assert set(np.unique(up)) == {0, 1, 2, 3}
    assert np.array_equal(resample_label(label, label.shape), label)


def test_resampling_identity_and_errors():
    x = smooth_volume((5, 6, 7))
    same = resample_image(x, x.shape)
    assert np.array_equal(same, x)
    assert same is not x
    with pytest.raises(ValueError, match="3-D"):
        resample_image(x[0], (3, 3))
    with pytest.raises(ValueError, match="integer"):
        resample_label(x, (3, 3, 3))


# ----------------------------------------------------------------------- statistics & plan
def test_intensity_stats_from_known_samples():
    stats = IntensityStats.from_samples([np.arange(0, 500), np.arange(500, 1000), np.zeros(0)])
    assert stats.n == 1000
    assert stats.mean == pytest.approx(499.5)
    assert stats.std == pytest.approx(np.sqrt((1000**2 - 1) / 12))  # population std of 0..999
    assert stats.percentile_00_5 == pytest.approx(0.005 * 999)  # linear interpolation
    assert stats.percentile_99_5 == pytest.approx(0.995 * 999)
    assert stats.median == pytest.approx(499.5)
    assert (stats.min, stats.max) == (0.0, 999.0)
    assert IntensityStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    norm = Normalization.from_stats(stats)
    assert norm.clip == (stats.percentile_00_5, stats.percentile_99_5)
    assert norm.source == "collection"
    assert norm.apply(np.array([-100.0, 499.5]))[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no foreground"):
        IntensityStats.from_samples([np.zeros(0)])


@pytest.mark.parametrize(
    "norm",
    [
        Normalization.multitalent(),
        Normalization(clip=(-1000.37, 1234.9), mean=12.345, std=301.7, source="collection"),
        Normalization(clip=(-32768.0, 32767.0), mean=-3.0, std=1e4),
    ],
    ids=["multitalent", "fractional-clip", "int16-range"],
)
def test_normalising_int16_on_the_device_equals_the_loaders_normalisation(norm):
    """Every int16 value: ``apply_torch`` (the GPU's share of an int16 patch) equals ``apply`` bit for bit,
    and the int16 padding normalises to air exactly."""
    import torch

    hu = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
    want = norm.apply(hu)
    got = norm.apply_torch(torch.from_numpy(hu))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert norm.hu_pad <= norm.clip[0] and norm.hu_pad >= -32768
    assert norm.apply_torch(torch.tensor([norm.hu_pad], dtype=torch.int16)).item() == norm.air


def test_foreground_intensity_sample_draws_only_foreground():
    image = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1
    label[9, 9, 9] = 5
    s = foreground_intensity_sample(image, label, n=500, seed="liver/c1")
    assert s.shape == (500,)
    assert set(s.tolist()) <= set(image[label > 0].tolist())
    assert len(set(s.tolist())) > 5  # with replacement, but spread over the 9 voxels
    assert np.array_equal(s, foreground_intensity_sample(image, label, n=500, seed="liver/c1"))
    assert not np.array_equal(s, foreground_intensity_sample(image, label, n=500, seed="liver/c2"))
    assert foreground_intensity_sample(image, np.zeros_like(label), n=5).shape == (0,)


def test_plan_json_round_trip_and_hash():
    plan = make_plan()
    d = json.loads(plan.to_json())
    assert d["version"] == 1
    assert d["catalog"] == {"name": "test", "hash": CATALOG.hash, "classes": [c.key for c in CATALOG.classes]}
    assert d["normalization"] == {
        "scheme": "ct",
        "clip": [-927.0, 275.0],
        "mean": 63.44,
        "std": 175.48,
        "source": "fixed",
    }
    assert d["target_spacing_zyx_mm"] == [1.5, 1.0, 1.0]
    assert (d["anisotropy_threshold"], d["image_dtype"], d["fg_locations_per_class"]) == (3.0, "int16", 10000)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.sha256 == plan.sha256
    assert len(plan.sha256) == 64
    assert make_plan((2.0, 1.0, 1.0)).sha256 != plan.sha256


def test_plan_save_load_and_errors(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path) == plan
    d = plan.to_dict()
    del d["normalization"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"bad\.json.*normalization"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="int16"):
        Normalization(clip=(-1e6, 0.0), mean=0.0, std=1.0)
    with pytest.raises(PlanError, match="std"):
        Normalization(clip=(-1.0, 1.0), mean=0.0, std=0.0)
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict({**plan.to_dict(), "version": 99})


def test_plan_file_holds_the_canonical_bytes_its_sha256_names(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / PLAN_FILE)
    assert path.read_bytes() == plan.to_json().encode("utf-8")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == plan.sha256
    assert Plan.load(path).sha256 == plan.sha256
    assert [p.name for p in tmp_path.iterdir()] == [PLAN_FILE]  # no temporary left behind
    assert plan.target_spacing_zyx_mm == DEFAULT_SPACING_ZYX_MM == (1.5, 1.0, 1.0)
    with pytest.raises(PlanError, match=r"missing.*cannot read"):
        Plan.load(tmp_path / "missing" / PLAN_FILE)


def test_plan_save_failing_midway_keeps_the_old_plan(tmp_path, monkeypatch):
    old = make_plan()
    path = old.save(tmp_path / PLAN_FILE)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        make_plan((2.0, 1.0, 1.0)).save(path)
    assert Plan.load(path) == old
    assert [p.name for p in tmp_path.iterdir()] == [PLAN_FILE]


def test_plan_readers_never_see_a_partial_save(tmp_path):
    path = tmp_path / PLAN_FILE
    plans = [make_plan(), make_plan((2.0, 1.0, 1.0), per_class=7)]
    plans[0].save(path)
    done = threading.Event()

    def writer() -> None:
        for i in range(300):
            plans[i % 2].save(path)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    while not done.is_set():
        seen.add(Plan.load(path).sha256)  # a torn file would raise PlanError
    thread.join()
    assert seen <= {p.sha256 for p in plans}


# ------------------------------------------------------------------------------------ cases
def resampled_case(seed_key: str, per_class: int = 40):
    image_ras, label_ras = canonical_phantom()
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    return preprocess_case(
        image_ras, label_ras, affine, plan=make_plan(per_class=per_class), dataset=LIVER, seed_key=seed_key
    )


def test_fg_locations_are_deterministic_and_inside_their_class():
    a, b = resampled_case("liver/c1"), resampled_case("liver/c1")
    assert a.fg_locations.dtype == np.int32
    assert a.fg_locations.tobytes() == b.fg_locations.tobytes()
    assert a.image_zyx.tobytes() == b.image_zyx.tobytes()
    assert a.label_zyx.tobytes() == b.label_zyx.tobytes()
    assert not np.array_equal(a.fg_locations, resampled_case("liver/c2").fg_locations)
    fg = a.fg_locations
    for local, cls in enumerate(LIVER.classes):
        rows = fg[fg[:, 0] == local]
        in_class = np.isin(a.label_zyx, cls.raw_values)
        assert len(rows) == min(40, int(in_class.sum()))
        assert in_class[rows[:, 1], rows[:, 2], rows[:, 3]].all()
    # the single voxel of value 3 does not survive 0.8 -> 1 mm; the regions containing 1 do
    assert a.labels_present == [1, 2] == sorted(set(np.unique(a.label_zyx).tolist()) - {0})
    assert a.classes_present == [0, 1, 3]


def test_preprocessed_case_dtypes_and_clip():
    case = resampled_case("liver/c1")
    assert case.image_zyx.dtype == np.int16
    assert case.label_zyx.dtype == np.uint8
    assert case.image_zyx.shape == case.label_zyx.shape == tuple(case.geometry["shape_after_resample_zyx"])
    assert case.image_zyx.min() >= -927 and case.image_zyx.max() <= 275
    assert case.spacing_zyx_mm == (1.5, 1.0, 1.0)
    json.dumps(case.geometry)


def test_restore_after_resampling_and_probabilities():
    _, label_ras = canonical_phantom()
    case = resampled_case("liver/c1")
    back = restore_label(case.label_zyx, case.geometry)
    assert back.shape == label_ras.shape
    a, b = label_ras == 1, back == 1
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    probs = np.stack(
        [(case.label_zyx == 1).astype(np.float32), np.full(case.label_zyx.shape, 0.25, np.float32)]
    )
    restored = restore_probabilities(probs, case.geometry)
    assert restored.shape == (2, *label_ras.shape)
    assert restored.dtype == np.float32
    inside = np.zeros(label_ras.shape, dtype=bool)
    box = case.geometry["crop_box_zyx"]
    inside.transpose(2, 1, 0)[tuple(slice(lo, hi) for lo, hi in box)] = True
    assert np.allclose(restored[1][inside], 0.25) and np.all(restored[1][~inside] == 0)
    assert ((restored[0] >= 0.5) != (back == 1)).mean() < 0.02
    with pytest.raises(PreprocessError, match="shape"):
        restore_label(case.label_zyx[:-1], case.geometry)


def test_bad_cases_raise_clear_errors():
    image_ras, label_ras = canonical_phantom()
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    plan = make_plan()
    bad = label_ras.copy()
    bad[5, 5, 5] = 9
    with pytest.raises(PreprocessError, match=r"liver/c7: label values \[9\] are not declared"):
        preprocess_case(image_ras, bad, affine, plan=plan, dataset=LIVER, seed_key="liver/c7")
    with pytest.raises(PreprocessError, match="liver/c7: label shape"):
        preprocess_case(image_ras, label_ras[:-1], affine, plan=plan, dataset=LIVER, seed_key="liver/c7")
    nan = image_ras.copy()
    nan[5, 5, 5] = np.nan
    with pytest.raises(PreprocessError, match="NaN"):
        preprocess_case(nan, label_ras, affine, plan=plan, dataset=LIVER, seed_key="liver/c7")
    with pytest.raises(PreprocessError, match="singular"):
        preprocess_case(image_ras, label_ras, np.zeros((4, 4)), plan=plan, dataset=LIVER, seed_key="c")
    with pytest.raises(PreprocessError, match=r"0\.\.255"):
        preprocess_case(
            image_ras, label_ras.astype(np.int32) - 1, affine, plan=plan, dataset=LIVER, seed_key="c"
        )


def test_every_tenth_foreground_voxel_is_nnunet_v1s_rule():
    """nnU-Net v1 ``DatasetAnalyzer``: ``modality[seg > 0][::10]`` per case, concatenated, then
    percentiles 0.5 / 99.5, mean and std over all collected voxels (a case weighs by its volume)."""
    rng = np.random.default_rng(0)
    cases = []
    for shape, fg in (((7, 9, 11), 0.3), ((5, 13, 4), 0.6), ((3, 3, 3), 0.0)):
        image = rng.normal(40, 200, size=shape).astype(np.float32)
        label = (rng.random(shape) < fg).astype(np.uint8) * rng.integers(1, 4, size=shape).astype(np.uint8)
        cases.append((image, label))
    parts = [foreground_intensity_every_nth(img, lab) for img, lab in cases]
    for (img, lab), part in zip(cases, parts):
        # a direct transcription: flatten in C order, keep foreground, every 10th from the first
        flat = [float(v) for v, y in zip(img.ravel(order="C"), lab.ravel(order="C")) if y > 0]
        assert part.tolist() == pytest.approx(flat[::10], abs=0)
        assert part.dtype == np.float32
    assert parts[2].shape == (0,)
    stats = IntensityStats.from_samples(parts)
    every = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
    assert stats.n == every.size == sum(-(-int((lab > 0).sum()) // 10) for _, lab in cases)
    assert stats.mean == pytest.approx(float(np.mean(every)), rel=1e-12)
    assert stats.std == pytest.approx(float(np.std(every)), rel=1e-12)
    assert stats.percentile_00_5 == pytest.approx(float(np.percentile(every, 0.5)), rel=1e-12)
    assert stats.percentile_99_5 == pytest.approx(float(np.percentile(every, 99.5)), rel=1e-12)
    assert stats.median == pytest.approx(float(np.median(every)), rel=1e-12)
    with pytest.raises(ValueError, match="step"):
        foreground_intensity_every_nth(cases[0][0], cases[0][1], step=0)
    with pytest.raises(ValueError, match="shape"):
        foreground_intensity_every_nth(cases[0][0], cases[1][1])


def test_the_converter_takes_every_10th_foreground_voxel_by_default(tmp_path):
    """nnU-Net v1's rule (the paper's values) is the converter's default, and reaches the scan task."""
    from multitalent.catalog import load_catalog
    from multitalent.convert.job import NormalizationSection
    from multitalent.convert.tasks import scan_case
    from multitalent.rawio import discover_cases, load_case
    from multitalent.synth import write_phantom_collection

    assert (NormalizationSection().rule, NormalizationSection().every_nth) == ("every_nth", 10)
    write_phantom_collection(tmp_path / "raw", seed=0, scale=0.2)
    dataset = load_catalog("phantom").datasets[0]
    case = discover_cases(dataset, tmp_path / "raw" / dataset.location)[0]
    loaded = load_case(case, dataset)
    expected = np.asarray(loaded.image)[np.asarray(loaded.label) > 0][::10].astype(np.float32)
    nth = scan_case(case, dataset, cache_dir=str(tmp_path), rule="every_nth", every_nth=10)
    draws = scan_case(case, dataset, cache_dir=str(tmp_path), rule="draws", samples=50)
    assert np.array_equal(np.load(nth["sample"]), expected)
    assert np.load(draws["sample"]).shape == (50,) and nth["sample"] != draws["sample"]
