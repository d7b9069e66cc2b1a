"""Dice and HD95 against hand-computed values, the empty-mask rules, aggregates, and the command."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from multitalent.catalog import Catalog, DatasetSpec, load_catalog
from multitalent.evaluation.evaluate import ClassScore, evaluate_folder, summarise
from multitalent.evaluation.overlap import overlap, worst_case_mm


def line(shape, i, j, k0, k1):
    m = np.zeros(shape, bool)
    m[i, j, k0:k1] = True
    return m


@pytest.mark.parametrize(
    ("pred", "gt", "spacing", "dice", "hd95"),
    [
        # identical cubes
        (np.pad(np.ones((3, 3, 3), bool), 2), np.pad(np.ones((3, 3, 3), bool), 2), (1, 1, 1), 1.0, 0.0),
        # two voxels 3 slices apart along k at 2 mm: 6 mm
        (line((5, 5, 8), 1, 1, 0, 1), line((5, 5, 8), 1, 1, 3, 4), (1.0, 1.0, 2.0), 0.0, 6.0),
        # lines shifted by 2 voxels along i at 0.5 mm: every surface voxel is 1 mm from the other line
        (line((6, 4, 9), 1, 2, 2, 6), line((6, 4, 9), 3, 2, 2, 6), (0.5, 1.0, 3.0), 0.0, 1.0),
        # lines k=2..5 and k=3..6 at 3 mm: distances [3, 0, 0, 0] each way; 95th percentile
        # (linear interpolation, torch.quantile) = 0.85 * 3 = 2.55 mm; Dice 2*3/8
        (line((6, 4, 9), 1, 2, 2, 6), line((6, 4, 9), 1, 2, 3, 7), (0.5, 1.0, 3.0), 0.75, 2.55),
    ],
)
def test_dice_and_hd95_equal_hand_computed_values(pred, gt, spacing, dice, hd95):
    o = overlap(pred, gt, spacing)
    assert o.status == "scored"
    assert o.dice == pytest.approx(dice)
    assert o.hd95_mm == pytest.approx(hd95, abs=1e-5)
    assert (o.tp, o.fp, o.fn) == (int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum()))


def test_hd95_is_monais_on_random_anisotropic_masks():
    import torch
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(0)
    pred = ndimage.gaussian_filter(rng.random((20, 24, 12)), 2) > 0.5
    gt = ndimage.gaussian_filter(rng.random((20, 24, 12)), 2) > 0.5
    spacing = (0.7, 0.9, 2.5)
    expected = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(gt)[None, None],
        percentile=95,
        spacing=list(spacing),
        include_background=True,
    )
    assert overlap(pred, gt, spacing).hd95_mm == pytest.approx(float(expected[0, 0]), rel=1e-6)


def test_empty_mask_rules():
    shape, spacing = (4, 5, 6), (0.5, 1.0, 3.0)
    empty = np.zeros(shape, bool)
    some = empty.copy()
    some[1, 1, 1] = True
    both = overlap(empty, empty, spacing)
    assert both.status == "both_empty" and both.dice == 1.0 and math.isnan(both.hd95_mm)
    missed = overlap(empty, some, spacing)
    diagonal = math.sqrt(2.0**2 + 5.0**2 + 18.0**2)
    assert worst_case_mm(shape, spacing) == pytest.approx(diagonal)
    assert missed.status == "pred_empty" and missed.dice == 0.0 and missed.hd95_mm == pytest.approx(diagonal)
    alarm = overlap(some, empty, spacing)
    assert alarm.status == "gt_empty" and alarm.dice == 0.0 and alarm.hd95_mm == pytest.approx(diagonal)


CAT = Catalog(
    "toy",
    (
        DatasetSpec.from_dict(
            {
                "id": "A",
                "layout": "msd",
                "labels": {"1": "liver", "2": "tumour"},
                "classes": [
                    {"name": "liver", "raw_values": [1, 2]},
                    {"name": "tumour", "raw_values": [2], "groups": ["difficult", "cancer"]},
                ],
            }
        ),
        DatasetSpec.from_dict(
            {"id": "B", "layout": "msd", "labels": {"1": "spleen"}, "groups": {"spleen": []}}
        ),
    ),
)


def test_aggregates_equal_a_hand_computation():
    nan = math.nan
    scores = [
        ClassScore("A", "a1", "liver", 0.9, 2.0, 0, 0, 0, "scored"),
        ClassScore("A", "a2", "liver", 0.7, 4.0, 0, 0, 0, "scored"),
        ClassScore("A", "a1", "tumour", 1.0, nan, 0, 0, 0, "both_empty"),
        ClassScore("A", "a2", "tumour", 0.0, 30.0, 0, 0, 0, "pred_empty"),
        ClassScore("B", "b1", "spleen", 0.6, 5.0, 0, 0, 0, "scored"),
    ]
    s = summarise(scores, CAT)
    assert s.per_class["A:liver"]["dice"] == pytest.approx(0.8)
    assert s.per_class["A:liver"]["hd95_mm"] == pytest.approx(3.0)
    assert s.per_class["A:tumour"]["dice"] == pytest.approx(0.5)
    assert s.per_class["A:tumour"]["hd95_mm"] == pytest.approx(30.0)  # both-empty case has no HD95
    assert s.per_class["A:tumour"]["both_empty"] == 1 and s.per_class["A:tumour"]["pred_empty"] == 1
    assert s.per_dataset["A"]["dice"] == pytest.approx(0.65)
    assert s.per_dataset["A"]["hd95_mm"] == pytest.approx(16.5)
    assert s.per_dataset["B"]["dice"] == pytest.approx(0.6)
    assert s.class_average["dice"] == pytest.approx((0.8 + 0.5 + 0.6) / 3)
    assert s.dataset_average["dice"] == pytest.approx((0.65 + 0.6) / 2)
    assert s.groups["difficult"]["dice"] == pytest.approx(0.5) and s.groups["cancer"]["hd95_mm"] == 30.0
    assert s.status_counts == {"scored": 3, "both_empty": 1, "pred_empty": 1, "gt_empty": 0}


@pytest.fixture(scope="module")
def raw_phantom(tmp_path_factory):
    from multitalent.synth import write_phantom_collection

    root = tmp_path_factory.mktemp("raw")
    write_phantom_collection(root, seed=0, scale=0.3)
    return root


def test_evaluate_command_on_perfect_and_damaged_predictions(tmp_path, raw_phantom, capsys):
    """Predictions made of the ground truth itself score Dice 1 / HD95 0; a removed tumour counts as
    ``pred_empty``; cases without prediction are listed as missing."""
    from multitalent.cli import main
    from multitalent.rawio import discover_cases, load_case
    from multitalent.rawio.naming import case_name

    catalog = load_catalog("phantom")
    liver = catalog.dataset("P01")
    cases = discover_cases(liver, raw_phantom / liver.location)
    pred = tmp_path / "pred"
    for i, raw in enumerate(cases[:2]):
        loaded = load_case(raw, liver)
        label = loaded.label.copy()
        if i == 1:
            label[label == 2] = 1  # the tumour is missed; liver (region {1, 2}) is unchanged
        (pred / case_name(raw.image_path)).mkdir(parents=True)
        nib.save(nib.Nifti1Image(label, loaded.affine), pred / case_name(raw.image_path) / "P01.nii.gz")
    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--pred", str(pred), "--gt", str(raw_phantom), "--catalog", "phantom", "--out", str(out)]
    )
    assert code == 0
    summary = (out / "evaluation_summary.csv").read_text()
    assert "class,P01:liver,1.000000,0.0000,2," in summary
    report = json.loads((out / "evaluation.json").read_text())
    tumour = report["summary"]["per_class"]["P01:liver tumour"]
    assert tumour["pred_empty"] == 1 and tumour["scored"] + tumour["both_empty"] == 1
    assert report["missing"] == [f"P01/{c.case_id}" for c in cases[2:]]
    md = (out / "evaluation.md").read_text()
    assert "HD95: MONAI compute_hausdorff_distance(percentile=95" in md and "one mask empty: Dice 0" in md
    assert "| P01:liver | 2 | 1.000 | 0.00 |" in md
    rows = (out / "evaluation_cases.csv").read_text().splitlines()
    assert rows[0] == "dataset,case,class,dice,hd95_mm,tp,fp,fn,status" and len(rows) == 1 + 2 * 2
    assert "class average" in capsys.readouterr().out


def test_evaluate_folder_restricted_to_cases_and_errors(tmp_path, raw_phantom):
    catalog = load_catalog("phantom")
    spleen = catalog.dataset("P02")
    from multitalent.rawio import discover_cases
    from multitalent.rawio.naming import case_name

    raw = discover_cases(spleen, raw_phantom / spleen.location)[0]
    folder = tmp_path / case_name(raw.image_path)
    folder.mkdir()
    shutil.copy(raw.label_path, folder / "P02.nii.gz")
    img = nib.load(raw.label_path)
    report = evaluate_folder(tmp_path, raw_phantom, catalog, cases={("P02", raw.case_id)})
    assert [s.dice for s in report.scores] == [1.0] and not report.missing and not report.errors
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), folder / "P02.nii.gz")
    report = evaluate_folder(tmp_path, raw_phantom, catalog, cases={("P02", raw.case_id)})
    assert not report.scores and "shape" in report.errors[0]


def test_evaluate_job_file_loads_and_checks_fold_with_splits():
    from pathlib import Path

    from multitalent.evaluation.job import EvaluateJob
    from multitalent.jobs import JobError, load_job

    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.yaml"
    job = load_job(path, EvaluateJob)
    assert job.kind == "evaluate" and job.splits is None
    with pytest.raises(JobError, match="splits and fold go together"):
        load_job(path, EvaluateJob, ["fold=1"])
