"""The naive-merge baseline (``architecture.output: merged_softmax``): the merged label set, its targets
(unannotated structures become background, classes of one name merge), the softmax CE + Dice loss on
hand-computed cases, and a merged model through ``multitalent predict`` (probabilities per catalog class)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalent.catalog import Catalog, DatasetSpec, load_catalog
from multitalent.catalog.merge import merge_by_name
from multitalent.losses import MergedSoftmaxLoss, merged_targets_from_labels
from multitalent.models import build_network, class_logits_forward, class_logits_network, output_heads
from multitalent.models.outputs import merged_class_logits


def two_datasets() -> Catalog:
    """A: liver = {1 liver, 2 tumour} (a region) and liver tumour = {2}; B: liver, spleen, and a raw
    value 3 (``other``) that no class of B contains."""
    a = DatasetSpec.from_dict(
        {
            "id": "A",
            "layout": "msd",
            "labels": {"1": "liver", "2": "tumour"},
            "classes": [{"name": "liver", "raw_values": [1, 2]}, {"name": "liver tumour", "raw_values": [2]}],
        }
    )
    b = DatasetSpec.from_dict(
        {
            "id": "B",
            "layout": "msd",
            "labels": {"1": "liver", "2": "spleen", "3": "other"},
            "classes": [{"name": "liver", "raw_values": [1]}, {"name": "spleen", "raw_values": [2]}],
        }
    )
    return Catalog("two", (a, b))


# ------------------------------------------------------------------------------------------ merged set
def test_same_name_classes_merge_and_regions_split_into_their_atoms():
    m = merge_by_name(two_datasets())
    assert m.names == ("background", "liver", "liver tumour", "spleen")
    # A: raw 1 -> liver, raw 2 -> liver tumour (its most specific class); B: raw 1 -> the same liver,
    # raw 2 -> spleen, raw 3 (in no class of B) -> background
    assert m.lut_dv.tolist() == [[0, 1, 2, 0], [0, 1, 3, 0]]
    # global classes: A:liver, A:liver tumour, B:liver, B:spleen
    assert [m.members(k) for k in range(4)] == [
        ["liver", "liver tumour"],
        ["liver tumour"],
        ["liver"],
        ["spleen"],
    ]


def test_phantom_merge_joins_the_conflicting_protocols():
    catalog = load_catalog("phantom")
    m = merge_by_name(catalog)
    heart = m.index("heart")
    aorta = m.index("aorta")
    by_key = {c.key: c.index for c in catalog.classes}
    # P05 heart (without the aortic root) and P06 heart (with it) are one label: P06's raw 2 (aortic
    # root) lies only in its heart region, so it becomes "heart" too
    assert m.members(by_key["P05:heart"]) == m.members(by_key["P06:heart"]) == ["heart"]
    p06 = catalog.dataset_index("P06")
    assert m.lut_dv[p06, 1] == m.lut_dv[p06, 2] == heart and m.lut_dv[p06, 3] == aorta
    # three aorta protocols (abdominal only, whole, without the root): one label
    for key in ("P04:aorta", "P05:aorta", "P06:aorta"):
        assert m.members(by_key[key]) == ["aorta"]
    # P03 kidneys and P04 left/right kidney have other names: not merged (they conflict instead)
    assert {"kidneys", "left kidney", "right kidney"} <= set(m.names)
    assert output_heads("merged_softmax", catalog) == (m.num_channels,) == (15,)


# ------------------------------------------------------------------------------------------ targets
def test_targets_map_each_dataset_through_its_own_row():
    m = merge_by_name(two_datasets())
    label = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 2, 3]]], dtype=torch.uint8)  # (B=2, 1, 4)
    target = merged_targets_from_labels(label, torch.tensor([0, 1]), m.lut_dv)
    assert target.dtype == torch.int64
    assert target.tolist() == [[[0, 1, 2, 2]], [[0, 1, 3, 0]]]


def test_unannotated_structures_are_background_in_the_one_hot_target():
    """A does not annotate the spleen: in A's sample every voxel is background or one of A's labels,
    so the spleen channel is 0 everywhere and background 1 wherever A's label is 0 (also where a spleen
    would lie). B does not annotate the tumour: its tumour voxels (raw 1, labelled liver) train liver."""
    m = merge_by_name(two_datasets())
    label = torch.tensor([[[0, 0, 1, 2]], [[0, 2, 1, 1]]], dtype=torch.uint8)
    y = torch.nn.functional.one_hot(merged_targets_from_labels(label, torch.tensor([0, 1]), m.lut_dv), 4)
    spleen, tumour, background = m.index("spleen"), m.index("liver tumour"), 0
    assert y[0, ..., spleen].sum() == 0 and y[0, 0, :2, background].tolist() == [1, 1]
    assert y[1, ..., tumour].sum() == 0 and y[1, 0, 2:, m.index("liver")].tolist() == [1, 1]


def test_targets_reject_float_labels_and_bad_shapes():
    m = merge_by_name(two_datasets())
    with pytest.raises(TypeError, match="integer raw labels"):
        merged_targets_from_labels(torch.zeros(1, 4), torch.tensor([0]), m.lut_dv)
    with pytest.raises(ValueError, match="dataset_idx_b"):
        merged_targets_from_labels(torch.zeros(2, 4, dtype=torch.uint8), torch.tensor([0]), m.lut_dv)


# ------------------------------------------------------------------------------------------ loss
def test_loss_on_a_hand_computed_case():
    """Logits 0: p = 1/3 on each of 3 channels; one sample, targets [1, 0] on 2 voxels.

    CE = ln 3. Channel 1: tp = 1/3, sum p = 2/3, sum y = 1 -> Dice (2/3 + s) / (5/3 + s).
    Channel 2: tp = 0, sum p = 2/3, sum y = 0 -> Dice s / (2/3 + s). L = CE - mean of the two."""
    s = 1e-5
    loss_fn = MergedSoftmaxLoss(smooth=s)
    logits = torch.zeros(1, 3, 2, dtype=torch.float64, requires_grad=True)
    loss, metrics = loss_fn(logits, torch.tensor([[1, 0]]))
    d1 = (2 / 3 + s) / (5 / 3 + s)
    d2 = s / (2 / 3 + s)
    assert metrics["ce"].item() == pytest.approx(math.log(3), abs=1e-12)
    assert metrics["dice_c"][1:].tolist() == pytest.approx([d1, d2], abs=1e-12)
    assert loss.item() == pytest.approx(math.log(3) - (d1 + d2) / 2, abs=1e-12)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # the gradient raises the target channel's logit at each voxel
    assert logits.grad[0, 1, 0] < 0 and logits.grad[0, 0, 1] < 0


def test_a_perfect_prediction_has_zero_ce_and_dice_one():
    target = torch.tensor([[[0, 1, 2, 1]]])
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).double() * 60.0
    loss, metrics = MergedSoftmaxLoss()(logits, target)
    assert metrics["ce"].item() == pytest.approx(0.0, abs=1e-12)
    assert metrics["dice_c"][1:].tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    assert loss.item() == pytest.approx(-1.0, abs=1e-9)


@pytest.mark.parametrize("dice", ["batch", "sample"])
def test_reduce_gives_the_loss_of_the_concatenated_batch(dice):
    """Two "ranks": each sees half the batch, ``reduce`` adds the other's statistics (as an all-reduce
    sum would); every rank's loss equals the single-process loss of the whole batch."""
    torch.manual_seed(0)
    logits = torch.randn(4, 4, 3, 5, dtype=torch.float64)
    target = torch.randint(0, 4, (4, 3, 5))
    loss_fn = MergedSoftmaxLoss(dice=dice)
    whole, _ = loss_fn(logits, target)
    captured: list[torch.Tensor] = []
    loss_fn(logits[2:], target[2:], reduce=lambda t: captured.append(t.detach()) or t)
    half, _ = loss_fn(logits[:2], target[:2], reduce=lambda t: t + captured[0])
    assert half.item() == pytest.approx(whole.item(), abs=1e-12)


def test_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="background and >= 1"):
        MergedSoftmaxLoss()(torch.zeros(1, 1, 4), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels"):
        MergedSoftmaxLoss()(torch.zeros(1, 3, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="dice"):
        MergedSoftmaxLoss(dice="voxel")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ class logits
def test_class_logits_decide_as_the_argmax_of_the_softmax():
    """Channels 0 background, 1 liver, 2 liver tumour, 3 spleen; classes A:liver = {1, 2}, A:liver
    tumour = {2}, B:liver = {1}, B:spleen = {3}. A class's score is a / (a + b): a its best label's
    probability, b the best other label's; positive logit exactly where the argmax is one of its labels."""
    m = merge_by_name(two_datasets())
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, 5) * 3
    z = merged_class_logits(logits, torch.as_tensor(m.members_km))
    assert z.shape == (2, 4, 5, 5) and torch.isfinite(z).all()
    p = torch.softmax(logits, 1)
    best = lambda *labels: torch.stack([p[:, i] for i in labels]).amax(0)  # noqa: E731
    a_b = [
        (best(1, 2), best(0, 3)),  # A:liver, a region
        (best(2), best(0, 1, 3)),  # A:liver tumour
        (best(1), best(0, 2, 3)),  # B:liver
        (best(3), best(0, 1, 2)),  # B:spleen
    ]
    expected = torch.stack([a / (a + b) for a, b in a_b], 1)
    assert torch.allclose(torch.sigmoid(z), expected, atol=1e-6)
    argmax = p.argmax(1)
    for k, labels in enumerate(([1, 2], [2], [1], [3])):
        assert torch.equal(z[:, k] > 0, torch.isin(argmax, torch.tensor(labels)))
    # a hand case: p = (0.1, 0.45, 0.05, 0.4): argmax liver; A:liver 0.45 / (0.45 + 0.4), spleen 0.4 / 0.85
    hand = torch.log(torch.tensor([0.1, 0.45, 0.05, 0.4]))[None, :, None]
    scores = torch.sigmoid(merged_class_logits(hand, torch.as_tensor(m.members_km)))[0, :, 0]
    assert scores.tolist() == pytest.approx([0.45 / 0.85, 0.05 / 0.5, 0.45 / 0.85, 0.4 / 0.85], abs=1e-6)
    with pytest.raises(ValueError, match="merged channels"):
        merged_class_logits(torch.zeros(1, 3, 2), torch.as_tensor(m.members_km))
    # a sigmoid model's output is its class logits as they are
    net = build_network("unet", [2, 2], size="tiny", patch_size_zyx=[16, 32, 32], deep_supervision=False)
    assert class_logits_network(net, output="sigmoid_heads", catalog=two_datasets()) is net
    assert class_logits_forward(net, output="sigmoid_heads", catalog=two_datasets()) is net


def test_merged_network_validates_through_class_logits():
    """During training the engine returns the deep-supervision list of merged logits; the validation
    forward reads the full-resolution entry and gives per-class logits of the catalog."""
    catalog = two_datasets()
    net = build_network(
        "unet", output_heads("merged_softmax", catalog), size="tiny", patch_size_zyx=[16, 32, 32],
        output="merged_softmax",
    )  # fmt: skip
    forward = class_logits_forward(net, output="merged_softmax", catalog=catalog)
    with torch.no_grad():
        out = forward(torch.randn(1, 1, 16, 32, 32))
    assert out.shape == (1, catalog.num_classes, 16, 32, 32) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------ predict
def merged_run(root: Path) -> tuple[Path, torch.nn.Module]:
    """A training run folder of an (untrained) merged-softmax tiny U-Net on the phantom label space, as a
    checkpoint leaves it (``model_info.json`` with the architecture, catalog and plan)."""
    from multitalent.preprocess import Plan
    from multitalent.train.checkpoint import (
        MODEL_INFO_FILE,
        PLAN_FILE,
        STATE_FILE,
        WEIGHTS_FILE,
        TrainerState,
        write_rank_manifest,
    )

    catalog = load_catalog("phantom")
    torch.manual_seed(3)
    net = build_network(
        "unet", output_heads("merged_softmax", catalog), size="tiny", patch_size_zyx=[16, 32, 32],
        output="merged_softmax",
    )  # fmt: skip
    with torch.no_grad():  # a strong background bias, so that most voxels are background
        for level in net.heads:
            level.groups[0].bias[0] = 3.0
    run = root / "merged"
    ckpt = run / "ckpt-it000000010-abc"
    ckpt.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt / WEIGHTS_FILE)
    Plan.for_catalog(catalog).save(ckpt / PLAN_FILE)
    info = {
        "architecture": net.build_kwargs(),
        "catalog": catalog.to_dict(),
        "training": {"laterality": "swap"},
    }
    (ckpt / MODEL_INFO_FILE).write_text(json.dumps(info))
    (ckpt / STATE_FILE).write_text(TrainerState(iteration=10).to_json())
    write_rank_manifest(ckpt, 0)
    return run, net


def test_merged_model_predicts_scores_per_catalog_class(tmp_path):
    from multitalent.inference.cli import resolve_model
    from multitalent.inference.model import load_model

    run, net = merged_run(tmp_path)
    files = resolve_model(str(run))
    assert files.network["output"] == "merged_softmax" and files.network["heads"] == [15]
    model = load_model(files)
    catalog = files.catalog
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        per_class = torch.sigmoid(model.network(x))
        net.eval().deep_supervision = False
        p = torch.softmax(net(x), 1)
    assert per_class.shape == (1, catalog.num_classes, 16, 32, 32)
    m = merge_by_name(catalog)
    for c in catalog.classes:
        inside = [m.index(name) for name in m.members(c.index)]
        outside = [i for i in range(m.num_channels) if i not in inside]
        a, b = p[:, inside].amax(1), p[:, outside].amax(1)
        assert torch.allclose(per_class[:, c.index], a / (a + b), atol=1e-5)
        assert torch.equal(per_class[:, c.index] > 0.5, torch.isin(p.argmax(1), torch.tensor(inside)))
    keys = {c.key: c.index for c in catalog.classes}
    # classes merged by name read the same score; a region scores at least its sub-region
    assert torch.equal(per_class[:, keys["P05:heart"]], per_class[:, keys["P06:heart"]])
    assert (per_class[:, keys["P01:liver"]] >= per_class[:, keys["P01:liver tumour"]]).all()


def test_predict_and_evaluate_work_unchanged_on_a_merged_model(tmp_path, capsys):
    """``multitalent predict`` on a phantom scan writes every dataset's label map (in its raw numbering)
    from the merged model, and ``multitalent evaluate`` scores it."""
    from multitalent.cli import main
    from multitalent.synth import write_phantom_collection

    run, _ = merged_run(tmp_path)
    raw = tmp_path / "raw"
    write_phantom_collection(raw, seed=0, scale=0.2)
    scans = sorted((raw / "Dataset005_PhantomThorax" / "imagesTr").glob("*.nii.gz"))[:1]
    out = tmp_path / "pred"
    code = main(["predict", "-i", str(scans[0]), "-o", str(out), "--model", str(run), "--no-mirror"])
    assert code == 0, capsys.readouterr()
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"]["network"]["output"] == "merged_softmax"
    case = next(iter(summary["cases"]))
    assert summary["cases"][case]["cpu_seconds"] > 0  # the case's CPU cost, beside its wall seconds
    assert {f.removesuffix(".nii.gz") for f in summary["cases"][case]["files"]} == {
        d.id for d in load_catalog("phantom").datasets
    }
    assert main(["evaluate", "--pred", str(out), "--gt", str(raw), "--datasets", "P05"]) == 0
    scored = (out / "evaluation_cases.csv").read_text().splitlines()
    assert len(scored) == 1 + 4  # header + P05's four classes on the one case
    assert np.all([row.startswith("P05,") for row in scored[1:]])


def test_a_merged_model_package_records_its_output_kind(tmp_path):
    """``architecture.json`` of a package says ``output: merged_softmax``; opening checks the heads against
    the merged label set (not one head per class), and predict's loader gives per-class logits."""
    from multitalent.inference.cli import resolve_model
    from multitalent.inference.model import load_model
    from multitalent.preprocess import Plan
    from multitalent.registry import PackageError, open_package
    from multitalent.registry.package import ModelCard, write_package

    catalog = load_catalog("phantom")
    net = build_network(
        "unet", output_heads("merged_softmax", catalog), size="tiny", patch_size_zyx=[16, 32, 32],
        output="merged_softmax",
    )  # fmt: skip
    card = ModelCard(cases={}, validation={}, training={})
    folder = write_package(
        tmp_path / "pkg", model=net, state_dict=net.state_dict(), plan=Plan.for_catalog(catalog),
        catalog=catalog, card=card,
    )  # fmt: skip
    package = open_package(folder)
    assert package.architecture["build"]["output"] == "merged_softmax"
    assert package.architecture["build"]["heads"] == [15]
    assert "output merged_softmax read as 20 classes of 7 datasets" in (folder / "MODEL_CARD.md").read_text()
    assert package.load_network().output == "merged_softmax"
    model = load_model(resolve_model(str(folder)))
    with torch.no_grad():
        assert model.network(torch.randn(1, 1, 16, 32, 32)).shape == (1, 20, 16, 32, 32)
    # a sigmoid-heads network cannot be packaged as this label space's merged softmax, nor the reverse
    sigmoid = build_network("unet", [15], size="tiny", patch_size_zyx=[16, 32, 32])
    with pytest.raises(PackageError, match="head groups"):
        write_package(
            tmp_path / "bad", model=sigmoid, state_dict=sigmoid.state_dict(), plan=Plan.for_catalog(catalog),
            catalog=catalog, card=card,
        )  # fmt: skip
