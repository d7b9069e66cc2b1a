"""Left and right: lateral pairs in the catalog, swapped targets of samples mirrored along x, and
mirror test-time augmentation that keeps laterality."""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
import pytest
import torch

from multitalent.catalog import (
    Catalog,
    CatalogError,
    ClassSpec,
    DatasetSpec,
    available_presets,
    lateral_swap,
    load_preset,
    mirror_allowed,
    mirror_label_lut,
    sided_classes,
)
from multitalent.data.augment import AugmentParams, augment_batch, identity_config
from multitalent.data.laterality import MirrorSwap, laterality_config, unmirror_outputs
from multitalent.losses import targets_from_labels

X = 4  # the x axis of (B, K, z, y, x): left-right in RAS+ voxel order (docs/contracts.md)


def _dataset(labels, classes=None, *, pairs=(), sided=(), dataset_id="d") -> DatasetSpec:
    specs = tuple(ClassSpec(n, tuple(v)) for n, v in (classes or [(n, [v]) for v, n in labels.items()]))
    return DatasetSpec(
        id=dataset_id, name=dataset_id, layout="nnunet_v2", labels=labels, classes=specs,
        lateral_pairs=tuple(pairs), sided=tuple(sided),
    )  # fmt: skip


# ----------------------------------------------------------------------------- catalog
EXPECTED_PAIRS = {
    "phantom": {("P04", "left kidney", "right kidney"), ("P05", "left lung", "right lung")},
    "amos": {("amos", "left kidney", "right kidney"), ("amos", "left adrenal gland", "right adrenal gland")},
    "multitalent13": {
        ("07", "left kidney", "right kidney"),
        ("07", "left adrenal gland", "right adrenal gland"),
        ("10", "left lung", "right lung"),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PAIRS))
def test_presets_carry_their_lateral_pairs(name):
    cat = load_preset(name)
    assert {(d.id, *p) for d in cat.datasets for p in d.lateral_pairs} == EXPECTED_PAIRS[name]


def test_totalsegmentator_pairs_every_left_right_structure_but_the_lung_lobes():
    cat = load_preset("totalsegmentator")
    (d,) = cat.datasets
    assert len(d.lateral_pairs) == 30
    assert ("rib_left_12", "rib_right_12") in d.lateral_pairs
    assert ("kidney_cyst_left", "kidney_cyst_right") in d.lateral_pairs
    # Left lung: 2 lobes, right lung: 3; the left atrial appendage has no right twin in the task.
    assert set(d.sided) == {
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
        "lung_middle_lobe_right", "lung_lower_lobe_right", "atrial_appendage_left",
    }  # fmt: skip
    assert mirror_allowed(cat).tolist() == [False]  # so `swap` does what TotalSegmentator does: no x-flip
    assert load_preset("multitalent13").dataset("09").sided == ("left kidney",)  # Gibson: left kidney only


@pytest.mark.parametrize("name", available_presets())
def test_every_sided_class_name_is_paired_or_declared_sided(name):
    cat = load_preset(name)
    for d in cat.datasets:
        declared = {n for p in d.lateral_pairs for n in p} | set(d.sided)
        named = {c.name for c in d.classes if re.search(r"(^|[ _])(left|right)([ _]|$)", c.name)}
        assert named == declared, d.id
        for left, right in d.lateral_pairs:
            assert "left" in left and "right" in right and left.replace("left", "right") == right


@pytest.mark.parametrize("name", available_presets())
def test_mirrored_raw_values_give_the_swapped_targets(name):
    cat = load_preset(name)
    swap = lateral_swap(cat)
    assert (swap[swap] == np.arange(cat.num_classes)).all()  # an involution
    lut_dv, region_dvk = mirror_label_lut(cat), cat.region_lut()
    for d in range(len(cat.datasets)):
        np.testing.assert_array_equal(region_dvk[d][lut_dv[d]], region_dvk[d][:, swap])
    # Laterality does not change the output channels, so the label-space hash stays what shards carry.
    plain = Catalog(cat.name, tuple(_without_laterality(d) for d in cat.datasets), cat.description)
    assert plain.hash == cat.hash
    assert Catalog.from_dict(cat.to_dict()) == cat


def _without_laterality(d: DatasetSpec) -> DatasetSpec:
    return DatasetSpec(d.id, d.name, d.layout, d.labels, d.classes, d.num_cases, d.location, d.modality)


def test_region_pairs_swap_through_their_parts():
    labels = {1: "kidney_left", 2: "kidney_right", 3: "cyst_left", 4: "cyst_right", 5: "kidneys"}
    classes = [
        ("left kidney", [1, 3]),  # region: kidney with its cyst
        ("right kidney", [2, 4]),
        ("left cyst", [3]),
        ("right cyst", [4]),
        ("kidneys", [1, 2, 3, 4, 5]),
    ]
    d = _dataset(labels, classes, pairs=[("left kidney", "right kidney"), ("left cyst", "right cyst")])
    cat = Catalog("c", (d,))
    assert mirror_label_lut(cat)[0].tolist() == [0, 2, 1, 4, 3, 5]
    assert lateral_swap(cat).tolist() == [1, 0, 3, 2, 4]


KIDNEYS = [("left kidney", [1]), ("spleen", [3]), ("kidneys", [1, 2])]
BROKEN = [
    (
        {"pairs": [("left kidney", "rigth kidney")]},
        r"\['left kidney', 'rigth kidney'\]: 'rigth kidney' is not a",
    ),
    (
        {"pairs": [("left kidney", "P05:right lung")]},
        r"a pair joins a left and a right class of the same dataset",
    ),
    (
        {"pairs": [("left kidney", "left kidney")]},
        r"\['left kidney', 'left kidney'\]: 'left kidney' is already",
    ),
    (
        {"pairs": [("left kidney", "right kidney"), ("left kidney", "spleen")]},
        r"'left kidney' is already in the pair \['left kidney', 'right kidney'\]",
    ),
    (
        {"pairs": [("left kidney", "right kidney")], "sided": ["right kidney"]},
        r"sided class 'right kidney' is in the lateral pair",
    ),
    ({"sided": ["left lung"]}, r"sided class 'left lung' is not a class"),
    (
        {"pairs": [("left kidney", "spleen")], "classes": KIDNEYS},
        r"mirroring maps class 'kidneys' \(raw values \[1, 2\]\) onto raw values \[2, 3\]",
    ),
    (
        {
            "pairs": [("left kidney", "right kidney")],
            "classes": [("left kidney", [1, 3]), ("right kidney", [2, 3])],
        },
        r"cannot tell which raw values swap",
    ),
]


@pytest.mark.parametrize(("broken", "message"), BROKEN)
def test_a_broken_pair_is_an_error_naming_it(broken, message):
    labels = {1: "left kidney", 2: "right kidney", 3: "spleen"}
    with pytest.raises(CatalogError, match=message):
        _dataset(labels, broken.get("classes"), pairs=broken.get("pairs", ()), sided=broken.get("sided", ()))


def test_a_pair_must_be_two_names_in_the_preset_format():
    d = load_preset("phantom").to_dict()
    d["datasets"][3]["lateral_pairs"] = [["left kidney"]]
    with pytest.raises(
        CatalogError, match=r"dataset 'P04': lateral pair \['left kidney'\] must be two class names"
    ):
        Catalog.from_dict(d)


# ----------------------------------------------------------------------------- augmentation
def _phantom_batch(seed: int = 0):
    """Three samples of datasets P01 (no pairs), P04 (kidneys) and P05 (lungs), random raw labels."""
    cat = load_preset("phantom")
    g = torch.Generator().manual_seed(seed)
    dataset_idx_b = torch.tensor([cat.dataset_index(i) for i in ("P01", "P04", "P05")])
    top = torch.tensor([cat.dataset(i).max_raw_value + 1 for i in ("P01", "P04", "P05")])
    shape = (6, 8, 10)
    label = (torch.rand((3, *shape), generator=g) * top[:, None, None, None]).to(torch.uint8)
    image = torch.randn((3, 1, *shape), generator=g)
    return cat, image, label, dataset_idx_b


def _forced(mirror_b3, *, rotate: bool = False) -> AugmentParams:
    params = AugmentParams.identity(len(mirror_b3))
    params.mirror_b3 = torch.tensor(mirror_b3, dtype=torch.bool)
    if rotate:
        params.rotate_b[:] = True
        params.rotation_rad_b3[:] = torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)
    return params


@pytest.mark.parametrize("zy", [(False, False), (True, True)])
def test_a_mirrored_sample_has_the_swapped_targets_of_the_unmirrored_one(zy):
    cat, image, label, didx = _phantom_batch()
    swap_config = laterality_config(identity_config(), "swap", cat)
    lut = torch.as_tensor(cat.region_lut())
    swap_k = torch.as_tensor(lateral_swap(cat))
    mirror = [[*zy, True]] * 3
    _, out = augment_batch(
        image,
        label,
        config=swap_config,
        generator=torch.Generator(),
        params=_forced(mirror),
        dataset_idx_b=didx,
    )
    flip = [2 + a for a in range(3) if mirror[0][a]]
    expected = targets_from_labels(label, didx, lut).flip(flip)[:, swap_k]
    assert torch.equal(targets_from_labels(out, didx, lut), expected)
    # The swap changed P04's and P05's pairs and nothing of P01.
    naive = targets_from_labels(label, didx, lut).flip(flip)
    p04_left = cat.classes.index(next(c for c in cat.classes if c.key == "P04:left kidney"))
    assert not torch.equal(naive[1, p04_left], expected[1, p04_left])
    assert torch.equal(naive[0], expected[0])


def test_swapping_commutes_with_rotation_scaling_and_leaves_unmirrored_samples_alone():
    cat, image, label, didx = _phantom_batch(1)
    swap_config = laterality_config(identity_config(), "swap", cat)
    params = _forced([[False, False, True], [True, False, True], [False, True, False]], rotate=True)
    params.scale_b[:] = True
    params.scale_factor_b[:] = 1.1
    kw = {"generator": torch.Generator(), "params": params, "dataset_idx_b": didx, "out_shape_zyx": (4, 6, 8)}
    _, swapped = augment_batch(image, label, config=swap_config, **kw)
    _, naive = augment_batch(image, label, config=identity_config(), **kw)
    lut_dv = torch.as_tensor(mirror_label_lut(cat)).long()
    for b in range(3):
        expected = lut_dv[didx[b]][naive[b].long()] if params.mirror_b3[b, 2] else naive[b].long()
        assert torch.equal(swapped[b].long(), expected)
    assert swapped.dtype == torch.uint8


def test_datasets_with_sided_classes_are_not_mirrored_left_right():
    cat = load_preset("multitalent13")
    config = laterality_config(identity_config(), "swap", cat)
    didx = torch.tensor([cat.dataset_index("09"), cat.dataset_index("07")])  # Gibson (left kidney only), BTCV
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 9, (2, 4, 5, 6), generator=g).to(torch.uint8)
    image = torch.randn((2, 1, 4, 5, 6), generator=g)
    params = _forced([[True, False, True], [False, False, True]])
    _, out = augment_batch(image, label, config=config, generator=g, params=params, dataset_idx_b=didx)
    assert torch.equal(out[0], label[0].flip(0))  # z mirrored only; no value swapped
    assert torch.equal(out[1], torch.as_tensor(mirror_label_lut(cat))[didx[1]][label[1].flip(2).long()])
    with pytest.raises(ValueError, match="needs dataset_idx_b"):
        augment_batch(image, label, config=config, generator=g, params=params)


def test_laterality_modes():
    cat = load_preset("phantom")
    base = identity_config()
    base = type(base)(**{**base.__dict__, "p_mirror_zyx": (0.5, 0.5, 0.5)})
    assert laterality_config(base, "naive", cat) == base
    assert laterality_config(base, "off", cat).p_mirror_zyx == (0.5, 0.5, 0.0)
    swap = laterality_config(base, "swap", cat)
    assert swap.p_mirror_zyx == (0.5, 0.5, 0.5) and swap.mirror_swap == MirrorSwap.from_catalog(cat)
    no_pairs = cat.subset(["P01", "P02"])
    assert laterality_config(base, "swap", no_pairs).mirror_swap is None  # then swap == naive
    with pytest.raises(ValueError, match="laterality 'sideways' is not one of swap, off, naive"):
        laterality_config(base, "sideways", cat)


def test_job_setting_reaches_the_augment_plan():
    from multitalent.jobs import JobError
    from multitalent.train.components import augment_plan
    from multitalent.train.job import load_train_job

    plans = {}
    for mode in ("swap", "off", "naive"):
        job = load_train_job("jobs/pretrain_cpu_tiny.yaml", [f"data.augmentation.laterality={mode}"])
        assert job.data.augmentation.laterality == mode  # a bare YAML `off` (false) still means "off"
        plans[mode] = augment_plan(job)
    assert load_train_job("jobs/pretrain_cpu_tiny.yaml").data.augmentation.laterality == "swap"
    assert plans["swap"].config.mirror_swap is not None and plans["swap"].laterality == "swap"
    assert plans["off"].config.p_mirror_zyx[2] == 0.0 and plans["off"].config.mirror_swap is None
    assert plans["naive"].config.p_mirror_zyx[2] == 0.5 and plans["naive"].config.mirror_swap is None
    with pytest.raises(JobError, match="laterality: off never mirrors along x"):
        load_train_job(
            "jobs/pretrain_cpu_tiny.yaml",
            ["data.augmentation.laterality=off", "data.augmentation.settings.p_mirror_zyx=[0.5,0.5,0.5]"],
        )
    with pytest.raises(JobError, match=r"settings\.mirror_swap: not an augmentation setting"):
        load_train_job("jobs/pretrain_cpu_tiny.yaml", ["data.augmentation.settings.mirror_swap=null"])


# ----------------------------------------------------------------------------- test-time augmentation
def _lateral_net(image_bczyx: torch.Tensor) -> torch.Tensor:
    """A net that knows left from right: channels (left kidney, right kidney, spleen) = the image
    on the low-x half, on the high-x half, everywhere (the kidney pair and one unpaired class)."""
    x = image_bczyx.shape[-1]
    low = (torch.arange(x) < x // 2).to(image_bczyx.dtype)
    img = image_bczyx[:, 0]
    return torch.stack([img * low, img * (1 - low), img.sin()], dim=1)


def _mirror_tta(net, image_bczyx, swap_k):
    outs = []
    for m in itertools.product([False, True], repeat=3):
        dims = [2 + a for a in range(3) if m[a]]
        outs.append(
            unmirror_outputs(
                net(image_bczyx.flip(dims) if dims else image_bczyx), mirrored_zyx=m, swap_k=swap_k
            )
        )
    return torch.stack(outs).mean(0)


def test_mirror_tta_with_swap_is_the_mean_of_the_swapped_unmirrored_predictions():
    d = _dataset({1: "left kidney", 2: "right kidney", 3: "spleen"}, pairs=[("left kidney", "right kidney")])
    swap_k = lateral_swap(Catalog("c", (d,)))
    assert swap_k.tolist() == [1, 0, 2] and sided_classes(Catalog("c", (d,))) == ()
    image = torch.randn((2, 1, 4, 5, 6), generator=torch.Generator().manual_seed(0))
    # By hand: the mirrored input's channel 0 (left) lies on the original's right, so it averages into 1.
    expected = torch.zeros((2, 3, 4, 5, 6))
    for m in itertools.product([False, True], repeat=3):
        dims = [2 + a for a in range(3) if m[a]]
        out = _lateral_net(image.flip(dims) if dims else image)
        out = out.flip(dims) if dims else out
        expected += (out[:, [1, 0, 2]] if m[2] else out) / 8
    tta = _mirror_tta(_lateral_net, image, swap_k)
    torch.testing.assert_close(tta, expected, rtol=0, atol=1e-6)
    # The net is exact under mirroring, so TTA with the swap reproduces its plain prediction ...
    torch.testing.assert_close(tta, _lateral_net(image), rtol=0, atol=1e-6)
    # ... and naive TTA (no swap) smears each kidney over both sides.
    naive = _mirror_tta(_lateral_net, image, None)
    torch.testing.assert_close(naive[:, 0], naive[:, 1], rtol=0, atol=1e-6)


def test_unmirror_outputs_checks_its_inputs():
    out = torch.zeros((1, 3, 2, 2, 2))
    assert torch.equal(unmirror_outputs(out, mirrored_zyx=(True, False, False), swap_k=[2, 1, 0]), out)
    with pytest.raises(ValueError, match=r"swap_k must be a permutation of 3 channels, got \[0, 0, 1\]"):
        unmirror_outputs(out, mirrored_zyx=(False, False, True), swap_k=[0, 0, 1])
    with pytest.raises(ValueError, match="needs 3 flags"):
        unmirror_outputs(out, mirrored_zyx=(True,), swap_k=None)
    with pytest.raises(ValueError, match=r"must be \(B, K, Z, Y, X\)"):
        unmirror_outputs(out[0], mirrored_zyx=(False, False, True), swap_k=None)


def test_the_training_paths_pass_the_datasets_to_the_swap():
    """Both places that augment (the step on the device, the loader via ``AugmentPlan.apply``)."""
    from multitalent.data.batch import Batch
    from multitalent.train.batches import AugmentPlan
    from multitalent.train.step import StepInputs, augment_inputs

    cat, image, label, didx = _phantom_batch(2)
    lut, swap_k = torch.as_tensor(cat.region_lut()), torch.as_tensor(lateral_swap(cat))
    always_x = dataclasses.replace(identity_config(), p_mirror_zyx=(0.0, 0.0, 1.0))
    expected = targets_from_labels(label, didx, lut).flip(X)[:, swap_k]
    annotated = torch.as_tensor(cat.annotated_mask())[didx]
    inputs = StepInputs(image, label, didx, annotated)
    config = laterality_config(always_x, "swap", cat)
    out = augment_inputs(inputs, config=config, generator=torch.Generator().manual_seed(0))
    assert torch.equal(targets_from_labels(out.label_bzyx, didx, lut), expected)
    kw = {"config": always_x, "laterality": "swap", "catalog": cat}
    plan = AugmentPlan.make(enabled=True, where="loader", patch_zyx=image.shape[2:], **kw)
    batch = Batch(image, label, didx, annotated, ["a", "b", "c"])
    batch = plan.apply(batch, torch.Generator().manual_seed(0))
    assert torch.equal(targets_from_labels(batch.label_bzyx, didx, lut), expected)


def test_the_real_training_batches_keep_the_left_label_on_the_patients_left(phantom_shards):
    """The converted phantom through the trainer's own source and augmentation (issue 15's data check):
    with ``swap`` and ``off`` the left kidney / left lung label lies at lower x (the patient's left,
    RAS+) than the right one in every sample holding both; ``naive`` moves it to the right side in
    x-mirrored samples."""
    from multitalent.train.batches import step_generator
    from multitalent.train.components import assemble
    from multitalent.train.job import load_train_job

    pairs = {"P04": (3, 2), "P05": (1, 2)}  # raw values of (left, right) in the phantom's labels
    kept: dict[str, list[bool]] = {}
    for mode in ("swap", "off", "naive"):
        job = load_train_job(
            "jobs/laterality_cpu.yaml",
            [f"shards.path={phantom_shards}", f"data.augmentation.laterality={mode}", "run.seed=3"],
        )
        parts = assemble(job, rank=0)
        cat = parts.catalog
        kept[mode] = []
        for i, batch in parts.batches(0, 40, loader_workers=0):
            batch = parts.augment.apply(batch, step_generator(job.run.seed, 0, i))
            for b in range(len(batch)):
                ds = cat.datasets[int(batch.dataset_idx_b[b])].id
                if ds not in pairs:
                    continue
                lab = batch.label_bzyx[b].numpy()
                left, right = (np.argwhere(lab == v)[:, 2] for v in pairs[ds])
                if len(left) and len(right):
                    kept[mode].append(bool(left.mean() < right.mean()))
    assert len(kept["swap"]) >= 10, kept
    assert all(kept["swap"]) and all(kept["off"]), kept
    assert 0 < sum(kept["naive"]) < len(kept["naive"]), kept
