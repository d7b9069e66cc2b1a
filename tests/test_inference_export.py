"""The way back: predictions in exactly the input's geometry, exact box-wise export, raw numbering."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from multitalent.catalog import Catalog
from multitalent.inference.export import (
    InverseGeometry,
    paint_order,
    restore_class_box,
    restore_label_map,
    restore_mask,
)
from multitalent.inference.model import LoadedModel, ModelFiles
from multitalent.inference.predictor import Predictor, PredictSettings, select_classes
from multitalent.preprocess import Plan, preprocess_case, preprocess_image, restore_probabilities
from test_preprocess import ALL_ORIENTATIONS, LIVER, canonical_phantom, stored_version

CATALOG = Catalog("test", (LIVER,))
LIVER_VALUES = [c.raw_values for c in LIVER.classes]


def plan(spacing=(1.5, 1.0, 1.0)) -> Plan:
    return Plan.for_catalog(CATALOG, target_spacing_zyx_mm=spacing)


def one_hot_probs(label_zyx: np.ndarray, class_values) -> np.ndarray:
    return np.stack([np.isin(label_zyx, v).astype(np.float32) for v in class_values])


def raw_regions_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as the classes see them: every class region (e.g. liver = {1, 2}) is the same."""
    return all(np.array_equal(np.isin(a, v), np.isin(b, v)) for v in LIVER_VALUES)


def test_paint_order_writes_nested_regions_over_their_parents():
    # liver {1, 2} first with 1, then tumour {2} with 2; vessel {3}; "unused" {3, 1}
    assert paint_order([(1, 2), (2,)]) == [(0, 1), (1, 2)]
    brats = [(1, 2, 3), (2, 3), (3,)]  # whole tumour, core, enhancing
    assert paint_order(brats) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize(("perm", "flips"), ALL_ORIENTATIONS[::3])
def test_label_map_round_trip_is_exact_without_resampling(perm, flips):
    image_ras, label_ras = canonical_phantom()
    label_ras[label_ras == 3] = 0  # the "unused" class {3, 1} overlaps liver: keep classes consistent
    image, affine = stored_version(image_ras, perm, flips, [1.0, 1.0, 1.5])
    label, _ = stored_version(label_ras, perm, flips, [1.0, 1.0, 1.5])
    case = preprocess_case(image, label, affine, plan=plan(), dataset=LIVER, seed_key="liver/c1")
    geometry = InverseGeometry.from_record(json.loads(json.dumps(case.geometry)))
    probs = one_hot_probs(case.label_zyx, LIVER_VALUES[:2])
    back = restore_label_map(probs, LIVER_VALUES[:2], geometry)
    assert back.label.shape == label.shape and back.label.dtype == np.uint8
    assert np.array_equal(back.label, label)


def test_label_map_round_trip_with_resampling_keeps_the_organ():
    """Same standard as the converter's NIfTI round trip: LPS, 0.8 x 0.8 x 2.5 mm -> plan -> back."""
    image_ras, label_ras = canonical_phantom()
    image, affine = stored_version(image_ras, (0, 1, 2), (-1, -1, 1), [0.8, 0.8, 2.5])
    label, _ = stored_version(label_ras, (0, 1, 2), (-1, -1, 1), [0.8, 0.8, 2.5])
    case = preprocess_case(image, label, affine, plan=plan(), dataset=LIVER, seed_key="liver/c1")
    geometry = InverseGeometry.from_record(case.geometry)
    back = restore_label_map(one_hot_probs(case.label_zyx, LIVER_VALUES), LIVER_VALUES, geometry).label
    assert back.shape == label.shape
    a, b = np.isin(label, (1, 2)), np.isin(back, (1, 2))
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    assert ((back == 2) & (label == 2)).any()


@pytest.mark.parametrize(
    ("spacing_ras", "plan_spacing"),
    [
        ([0.8, 0.8, 2.5], (1.5, 1.0, 1.0)),
        ([1.3, 0.7, 1.1], (1.0, 1.0, 1.0)),
        ([1.0, 1.0, 1.0], (4.0, 1.0, 1.0)),
    ],
)
def test_box_export_equals_thresholding_the_full_restored_probabilities(spacing_ras, plan_spacing):
    rng = np.random.default_rng(0)
    image_ras, _ = canonical_phantom()
    image, affine = stored_version(image_ras, (1, 0, 2), (1, -1, -1), spacing_ras)
    _, _, record = preprocess_image(image, affine, plan=plan(plan_spacing))
    geometry = InverseGeometry.from_record(record)
    shape = tuple(record["shape_after_resample_zyx"])
    from scipy import ndimage

    probs = np.stack(
        [
            np.clip(ndimage.gaussian_filter(rng.random(shape), 1.0) * 4 - 1.5, 0, 1).astype(np.float32)
            for _ in range(3)
        ]
    )
    probs[2] = 0.2  # nothing above the threshold
    full = restore_probabilities(probs, record) > 0.5
    for k in range(3):
        mask = restore_mask(probs[k], geometry)
        assert mask.shape == image.shape
        assert (mask.astype(bool) != full[k]).sum() <= 2  # float32 rounding at exactly 0.5 only
    assert restore_class_box(probs[2], geometry) is None
    assert full[0].any()


@pytest.mark.parametrize(
    ("spacing_ras", "plan_spacing"), [([0.8, 0.8, 2.5], (1.5, 1.0, 1.0)), ([1.3, 0.7, 1.1], (1.0, 1.0, 1.0))]
)
def test_export_from_the_sparse_store_equals_the_export_from_the_dense_volume(spacing_ras, plan_spacing):
    """Each class read over the union of its kept boxes (float16, zero below the floor) gives the
    label map of the dense float32 volume, up to voxels whose value sits within float16 rounding of
    the threshold."""
    from scipy import ndimage

    from multitalent.inference.probability_store import SparseProbabilities

    rng = np.random.default_rng(1)
    image_ras, _ = canonical_phantom()
    image, affine = stored_version(image_ras, (1, 0, 2), (1, -1, -1), spacing_ras)
    _, _, record = preprocess_image(image, affine, plan=plan(plan_spacing))
    geometry = InverseGeometry.from_record(record)
    shape = tuple(record["shape_after_resample_zyx"])
    probs = np.zeros((4, *shape), dtype=np.float32)
    for k in range(3):  # two smooth blobs per class, ~0 elsewhere
        seeds = np.zeros(shape, dtype=np.float32)
        for _ in range(2):
            seeds[tuple(int(rng.integers(0, n)) for n in shape)] = 1.0
        field = ndimage.gaussian_filter(seeds, 1.0)
        probs[k] = np.clip(field / field.max() * 1.6, 0, 1)
    store = SparseProbabilities.empty(4, shape)
    cut = shape[0] // 3
    weights = torch.full(shape, 2.0)  # the store divides by the weights
    store.add_slab(0, torch.from_numpy(probs[:, :cut] * 2), weights[:cut])
    store.add_slab(cut, torch.from_numpy(probs[:, cut:] * 2), weights[cut:])
    assert store.nbytes < probs.nbytes / 4
    values = [[1], [2], [1, 3], [4]]
    dense = restore_label_map(probs, values, geometry)
    sparse = restore_label_map(store, values, geometry)
    assert sparse.label.shape == image.shape
    assert (sparse.label != dense.label).sum() <= 0.001 * dense.label.size
    assert sparse.voxels_per_class[3] == 0 and min(sparse.voxels_per_class[:3]) > 0
    for k in range(4):
        origin, region = store.region(k)
        got = restore_mask(region, geometry, origin_zyx=origin)
        assert (got != restore_mask(probs[k], geometry)).sum() <= 0.001 * got.size


# ------------------------------------------------------------------------------ whole files
class BrightNet(torch.nn.Module):
    """Pointwise logits: class 0 where the normalised image exceeds t0, class 1 above t1 (> t0)."""

    def __init__(self, thresholds_norm: list[float]) -> None:
        super().__init__()
        self.t = torch.tensor(thresholds_norm).view(1, -1, 1, 1, 1)

    def forward(self, x):
        return 50.0 * (x - self.t)


def bright_predictor(p: Plan, hu_thresholds=(0.0, 200.0)) -> Predictor:
    norm = [float(p.normalization.apply(np.array([t], np.float32))[0]) for t in hu_thresholds]
    files = ModelFiles(
        weights=Path("none.pt"),
        network={"patch_size_zyx": [8, 8, 8]},
        plan=p,
        catalog=CATALOG,
        source={"id": "bright"},
    )
    net = BrightNet([*norm, 99.0, 99.0])
    return Predictor(LoadedModel(net, files), PredictSettings(mirror_axes=(0, 2), device="cpu"))


def oblique_affine(spacing, degrees=20.0):
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = (-20, 5, 33)
    return a


GEOMETRIES = {
    "RAS": (np.diag([1.0, 1.0, 1.5, 1.0]), (1.5, 1.0, 1.0)),
    "LPS": (np.diag([-0.8, -0.8, 2.5, 1.0]), (1.5, 1.0, 1.0)),
    "oblique": (oblique_affine([0.9, 1.1, 2.0]), (1.5, 1.0, 1.0)),
    "anisotropic, other spacing than the plan": (np.diag([0.7, 3.0, 0.9, 1.0]), (2.0, 0.9, 1.2)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_predicted_files_have_exactly_the_inputs_shape_affine_and_codes(tmp_path, name):
    affine, plan_spacing = GEOMETRIES[name]
    rng = np.random.default_rng(1)
    shape = (23, 19, 14)
    image = np.full(shape, -1000, np.int16)
    image[3:20, 2:17, 2:12] = rng.normal(-50, 20, (17, 15, 10)).astype(np.int16)
    image[6:15, 5:13, 4:10] = 100  # "liver" (> 0 HU)
    image[8:14, 7:11, 5:9] = 250  # "tumour" (> 200 HU)
    img = nib.Nifti1Image(image, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    path = tmp_path / "scan.nii.gz"
    nib.save(img, path)
    predictor = bright_predictor(plan(plan_spacing))
    classes = select_classes(CATALOG, classes=["liver", "liver:tumour"])
    record = predictor.predict_file(path, tmp_path / "out", classes=classes, masks=True)
    assert record["files"] == ["liver.nii.gz", "liver/liver.nii.gz", "liver/tumour.nii.gz"]
    assert record["classes_found"] == {"liver": ["liver", "tumour"]}
    for rel in record["files"]:
        out = nib.load(tmp_path / "out" / rel)
        assert out.shape == shape
        assert np.array_equal(out.affine, nib.load(path).affine)
        assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
        assert out.get_data_dtype() == np.uint8
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    label = np.asarray(nib.load(tmp_path / "out" / "liver.nii.gz").dataobj)
    liver = image > 0
    dice = 2 * (np.isin(label, (1, 2)) & liver).sum() / (np.isin(label, (1, 2)).sum() + liver.sum())
    if name == "RAS":  # the plan's spacing: nothing resampled, the prediction is exact
        assert np.array_equal(np.isin(label, (1, 2)), liver)
        assert np.array_equal(label == 2, image > 200)
    else:
        assert dice > 0.75, dice
        assert (label == 2).any()
    if name == "oblique":
        assert any("oblique" in w for w in record["warnings"])
    if name.startswith("anisotropic"):
        assert any("spacing y" in w for w in record["warnings"])


def test_select_classes_errors():
    with pytest.raises(ValueError, match="unknown datasets"):
        select_classes(CATALOG, datasets=["nope"])
    with pytest.raises(ValueError, match="unknown classes"):
        select_classes(CATALOG, classes=["kidney"])
    assert [c.name for c in select_classes(CATALOG, datasets=["liver"])] == [c.name for c in LIVER.classes]
