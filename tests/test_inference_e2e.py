"""End to end: a model trained on the phantom collection (a short real training run: Ray Train, DeepSpeed,
MLflow) segments held-out phantom cases through ``multitalent predict`` and ``multitalent evaluate``.

The run is short (100 iterations of the tiny U-Net on 2 CPU workers, ~5-15 min on shared cores), so the
floor is modest and set on the largest structure: the lungs of P05 (left and right lung classes together,
as the phantom's 100 iterations do not yet separate the sides) on fold 0's validation cases, which the
model never trained on, reach a Dice of at least ``LUNG_DICE_FLOOR`` (measured 0.36-0.38; an untrained
network predicts no lung). The per-class table of ``evaluate`` is checked for its shape and counts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from multitalent.cli import main

REPO = Path(__file__).resolve().parents[1]
# training 100 iterations on 2 shared cores can outlast the suite-wide 600 s timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

LUNG_DICE_FLOOR = 0.25


@pytest.fixture(scope="module")
def trained_run(phantom_shards, tmp_path_factory):
    from multitalent.train import load_train_job, run_training

    storage = tmp_path_factory.mktemp("runs")
    job = load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [
            f"shards.path={phantom_shards}",
            f"run.storage_path={storage}",
            "run.name=e2e",
            "architecture.patch_zyx=[32, 48, 48]",
            "batch.global_size=4",
            "optimiser.lr=0.05",
            "optimiser.momentum=0.9",
            "schedule.epochs=4",
            "schedule.iterations_per_epoch=25",
            "checkpoint.every_iterations=50",
            "data.augmentation.enabled=false",
            "data.fg_fraction=0.66",
            "tracking.log_every=10",
            "validation.every_epochs=4",
            "validation.max_cases=2",
            "validation.overlays=false",
            "validation.fold=0",
        ],
    )
    return run_training(job).run_dir


def test_predict_and_evaluate_held_out_phantom_cases(trained_run, phantom_shards, tmp_path):
    from multitalent.catalog import load_catalog
    from multitalent.data.sampling import SPLITS_FILE, fold_keys, load_splits
    from multitalent.rawio import discover_cases, load_case

    raw = phantom_shards.parent / "raw"
    splits = phantom_shards / SPLITS_FILE
    val = [c for d, c in fold_keys(load_splits(splits), 0)[1] if d == "P05"]
    assert val, "fold 0 holds validation cases of P05"
    thorax = load_catalog("phantom").dataset("P05")
    held_out = [c for c in discover_cases(thorax, raw / thorax.location) if c.case_id in val]
    images = tmp_path / "images"
    images.mkdir()
    for case in held_out:
        (images / case.image_path.name).symlink_to(case.image_path)

    pred = tmp_path / "pred"
    args = ["predict", "-i", str(images), "-o", str(pred), "--model", str(trained_run), "--datasets", "P05"]
    assert main([*args, "--no-mirror"]) == 0
    predicted = json.loads((pred / "predictions.json").read_text())
    assert sorted(predicted["cases"]) == sorted(val) and not predicted["failures"]
    assert predicted["model"]["source"]["iteration"] == 100

    out = tmp_path / "eval"
    evaluate = ["evaluate", "--pred", str(pred), "--gt", str(raw), "--splits", str(splits), "--fold", "0"]
    assert main([*evaluate, "--datasets", "P05", "--out", str(out)]) == 0
    with open(out / "evaluation_summary.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f) if r["level"] == "class"}
    assert sorted(rows) == sorted(f"P05:{c.name}" for c in thorax.classes)
    assert all(int(r["n"]) == len(val) for r in rows.values())

    dice = []
    for case in held_out:
        gt = np.isin(load_case(case, thorax).label, (1, 2))
        lungs = np.isin(np.asarray(nib.load(pred / case.case_id / "P05.nii.gz").dataobj), (1, 2))
        dice.append(2 * (gt & lungs).sum() / (gt.sum() + lungs.sum()))
    assert np.mean(dice) >= LUNG_DICE_FLOOR, dice
