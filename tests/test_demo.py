"""The README's first command (``multitalent demo``): a short version of the whole path, really run.

``test_the_short_demo_runs_every_stage`` runs ``multitalent demo`` as the README does (its own process,
local Ray, 2 Ray Train workers, DeepSpeed, sqlite MLflow) on the phantom at scale 0.5 with 4 pre-training
and 6 fine-tuning iterations, then checks every stage's output: shards (the held-out dataset converted with
the champion's plan), both runs, the registry alias and its run, the fine-tuned run's parent, NIfTI label
maps in each scan's geometry, the evaluation tables and their MLflow metrics, the overlay PNG and the
printed table. A rerun then resumes (nothing retrained or republished) and a changed fine-tuning job fails
naming its stage. Dice floors for the full demo's iteration counts are measured in the README, not here:
4 iterations learn nothing.

The other tests are the pieces without Ray: the table, the progress bar, the held-out case links.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from multitalent.catalog import load_catalog
from multitalent.demo.layout import DemoLayout, demo_catalogs, heldout_cases, link_inputs, write_phantom
from multitalent.demo.report import ModelResult, TrainingBar, results_table
from multitalent.jobs import UserError

REPO = Path(__file__).resolve().parents[1]
MULTITALENT = str(Path(sys.executable).with_name("multitalent"))
SHORT = [
    "--scale", "0.5",
    "--pretrain-set", "schedule.epochs=2",
    "--pretrain-set", "schedule.iterations_per_epoch=2",
    "--pretrain-set", "validation.every_epochs=2",
    "--pretrain-set", "validation.overlays=false",
    "--finetune-set", "schedule.epochs=3",
    "--finetune-set", "schedule.iterations_per_epoch=2",
    "--finetune-set", "finetune.heads_epochs=1",
    "--finetune-set", "finetune.warmup_epochs=1",
    "--finetune-set", "validation.every_epochs=3",
    "--finetune-set", "validation.overlays=false",
]  # fmt: skip
TITLES = [
    "phantom collection",
    "convert",
    "pre-train",
    "publish",
    "convert held-out",
    "fine-tune",
    "predict",
    "evaluate",
    "overlay",
]


def _demo(workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "platform"),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [MULTITALENT, "demo", "--workdir", str(workdir), *SHORT, *extra],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    workdir = tmp_path_factory.mktemp("demo")
    t = time.monotonic()
    out = _demo(workdir)
    seconds = time.monotonic() - t
    print(f"short demo: {seconds:.0f} s wall, load average {os.getloadavg()[0]:.1f}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return workdir, out, seconds


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_short_demo_runs_every_stage(demo_run):
    from mlflow.tracking import MlflowClient

    from multitalent.train.publish import find_checkpoint

    workdir, proc, _ = demo_run
    lay = DemoLayout(workdir=workdir, scale=0.5)
    stdout = proc.stdout
    # each stage: a line when it starts and one when it ends, in order
    starts = [stdout.index(f"[{i}/9] {title}: ") for i, title in enumerate(TITLES, start=1)]
    assert starts == sorted(starts)
    assert stdout.count("      done in ") == 9
    # the training stages drew their bar (one line per epoch when not on a terminal)
    assert re.search(r"pre-train \[#+\] 4/4 it  loss \d", stdout)
    assert re.search(r"fine-tune \[#+\] 6/6 it  loss \d", stdout)

    # 1-2, 5: the phantom and both conversions; the held-out dataset got the champion's plan
    assert len([p for p in lay.raw.iterdir() if p.is_dir()]) == 7
    pre_cat, tgt_cat = demo_catalogs("P03")
    for shards, catalog in ((lay.pretrain_shards, pre_cat), (lay.target_shards, tgt_cat)):
        manifest = json.loads((shards / "manifest.json").read_text())
        assert manifest["catalog_hash"] == catalog.hash
        assert {c["dataset_id"] for c in manifest["cases"]} == set(catalog.dataset_ids)
        assert (shards / "splits.json").is_file()
    assert "P03" not in pre_cat.dataset_ids and tgt_cat.dataset_ids == ("P03",)
    pre_plan = json.loads((lay.pretrain_shards / "plan.json").read_text())
    tgt_plan = json.loads((lay.target_shards / "plan.json").read_text())
    assert tgt_plan["normalization"] == pre_plan["normalization"]
    assert tgt_plan["target_spacing_zyx_mm"] == pre_plan["target_spacing_zyx_mm"]

    # 3, 6: both runs finished; the fine-tuned one started from the champion (version 1)
    pretrain = find_checkpoint(lay.runs / lay.pretrain_run)
    finetune = find_checkpoint(lay.runs / lay.finetune_run)
    assert (pretrain.iteration, finetune.iteration) == (4, 6)
    assert finetune.info["parent"] == "phantom-without-P03/1"
    assert finetune.info["catalog"]["datasets"][0]["id"] == "P03"

    # 4: the registry alias names version 1, registered from the pre-training run
    client = MlflowClient(tracking_uri=lay.tracking_uri)
    version = client.get_model_version_by_alias(lay.model_name, "champion")
    assert version.version in ("1", 1) and version.run_id == pretrain.mlflow_run_id

    # 7: label maps in each held-out scan's own geometry
    for name, catalog, shards in (
        ("pretrained", pre_cat, lay.pretrain_shards),
        ("finetuned", tgt_cat, lay.target_shards),
    ):
        cases = heldout_cases(shards, catalog, lay.raw)
        assert cases
        from multitalent.rawio.naming import case_name

        for case in cases:
            label = lay.out / name / case_name(case.image_path) / f"{case.dataset_id}.nii.gz"
            scan = nib.load(case.image_path)
            pred = nib.load(label)
            assert pred.shape == scan.shape and np.allclose(pred.affine, scan.affine, atol=1e-3)
            assert set(np.unique(np.asarray(pred.dataobj))) <= {0, *range(1, 8)}

    # 8: evaluation tables per model, and their metrics in each model's MLflow run
    pre_eval = json.loads((lay.out / "pretrained" / "evaluation.json").read_text())["summary"]
    tgt_eval = json.loads((lay.out / "finetuned" / "evaluation.json").read_text())["summary"]
    assert set(tgt_eval["per_class"]) == {"P03:kidneys", "P03:kidney tumour"}
    assert pre_eval["per_class"] and all(k.split(":")[0] != "P03" for k in pre_eval["per_class"])
    for summary in (pre_eval, tgt_eval):
        for v in summary["per_class"].values():
            assert 0.0 <= v["dice"] <= 1.0 and v["cases"] >= 1
    for ckpt, summary in ((pretrain, pre_eval), (finetune, tgt_eval)):
        metrics = client.get_run(ckpt.mlflow_run_id).data.metrics
        assert math.isclose(metrics["eval/dice_mean/class"], summary["class_average"]["dice"], rel_tol=1e-6)

    # 9: the overlay, and the final report
    from PIL import Image

    with Image.open(lay.out / "overlay.png") as png:
        assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 100
    table = stdout[stdout.index("Held-out evaluation") :]
    kidneys = re.search(r"P03\s+kidneys\s+(\d+)\s+(\d\.\d{3})\s+([\d.]+|-)$", table, re.MULTILINE)
    assert kidneys and int(kidneys.group(1)) >= 1
    assert math.isclose(float(kidneys.group(2)), tgt_eval["per_class"]["P03:kidneys"]["dice"], abs_tol=5e-4)
    assert re.search(r"^pre-trained\s+P05\s+left lung\s+\d+\s+\d\.\d{3}", table, re.MULTILINE)
    assert (
        "registry: models:/phantom-without-P03@champion = models:/phantom-without-P03/1 in sqlite:///"
        in table
    )
    assert "output:   runs/demo (" in table  # relative to the directory it ran in
    assert re.search(r"MLflow:   \S*mlflow ui --backend-store-uri sqlite:///\S*runs/mlflow\.db", table)
    report = json.loads((lay.out / "results.json").read_text())
    assert report["registry"]["version"] == "1" and set(report["seconds"]) >= {"total", "pretrain", "predict"}
    assert "Held-out evaluation" in (lay.out / "results.md").read_text()
    assert sorted(p.name for p in (lay.out / "logs").iterdir())[0] == "1-phantom.log"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_rerun_resumes_and_a_failing_stage_is_named(demo_run):
    workdir, _, _ = demo_run
    # the fine-tuning job changed since the run was trained: stage 6 refuses to reuse or resume it
    proc = _demo(workdir, "--finetune-set", "catalog=phantom", "--finetune-set", "schedule.epochs=4")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, err = proc.stdout, proc.stderr
    assert "already there" in out and "already trained (4 iterations)" in out
    assert "already published: models:/phantom-without-P03@champion = models:/phantom-without-P03/1" in out
    assert "[7/9]" not in out
    assert "error: stage 6/9 (fine-tune) failed:" in err
    assert "was trained by the demo with another job (changed: catalog, schedule.epochs)" in err
    assert "runs/demo/logs/6-finetune.log" in err and "a rerun of the same command resumes" in err
    log = (workdir / "runs" / "demo" / "logs" / "6-finetune.log").read_text()
    assert "Traceback" in log and "delete that folder to train it again" in log


def test_a_mistake_in_a_job_override_stops_the_demo_before_anything_runs(tmp_path, capsys):
    from multitalent.cli import main

    status = main(["demo", "--workdir", str(tmp_path), "--finetune-set", "schedule.epochs=0"])
    assert status == 2
    err = capsys.readouterr().err
    assert "demo_finetune_cpu.yaml: invalid job" in err and "schedule.epochs" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ without Ray
def test_an_unknown_or_too_small_holdout_names_the_datasets():
    with pytest.raises(UserError, match=r"--holdout P99: not a phantom dataset \(one of P01, P02"):
        demo_catalogs("P99")
    with pytest.raises(
        UserError, match=r"--holdout P02: 3 case\(s\) at scale 1,.*one of P01, P03, P04, P05, P07$"
    ):
        demo_catalogs("P02")
    with pytest.raises(UserError, match=r"--holdout P01: 4 case\(s\) at scale 0.5,.*one of P03, P05$"):
        demo_catalogs("P01", scale=0.5)
    pre, held = demo_catalogs("P05")
    assert held.dataset_ids == ("P05",) and "P05" not in pre.dataset_ids and len(pre.datasets) == 6
    assert held.hash == load_catalog("phantom").subset(["P05"]).hash  # the label space, whatever the name


def _summary(per_class: dict[str, tuple[float, float]]) -> dict:
    datasets: dict[str, list[tuple[float, float]]] = {}
    for key, v in per_class.items():
        datasets.setdefault(key.split(":")[0], []).append(v)
    return {
        "per_class": {k: {"dice": d, "hd95_mm": h, "cases": 2} for k, (d, h) in per_class.items()},
        "per_dataset": {
            k: {"dice": float(np.mean([d for d, _ in v])), "hd95_mm": float(np.nanmean([h for _, h in v]))}
            for k, v in datasets.items()
        },
        "class_average": {"dice": 0.5, "hd95_mm": 7.0},
    }


def test_the_results_table_groups_by_model_and_dataset():
    pre, tgt = demo_catalogs("P03")
    pre_summary = _summary(
        {"P01:liver": (0.8, 4.0), "P01:liver tumour": (0.2, math.nan), "P07:vertebrae": (0.9, 2.0)}
    )
    tgt_summary = _summary({"P03:kidneys": (0.75, 3.25), "P03:kidney tumour": (0.0, 40.0)})
    lines = results_table(
        [ModelResult("pre-trained", pre_summary), ModelResult("fine-tuned", tgt_summary)], [pre, tgt]
    )
    text = "\n".join(lines)
    assert lines[0].split() == ["model", "dataset", "class", "cases", "Dice", "HD95", "mm"]
    assert re.search(r"^pre-trained\s+P01\s+liver\s+2\s+0\.800\s+4\.0$", text, re.MULTILINE)
    assert re.search(r"^\s+liver tumour\s+2\s+0\.200\s+-$", text, re.MULTILINE)  # HD95 undefined
    assert re.search(r"^\s+\(mean\)\s+0\.500\s+4\.0$", text, re.MULTILINE)  # P01's two classes
    assert re.search(r"^\s+\(class average\)\s+0\.500\s+7\.0$", text, re.MULTILINE)  # two datasets
    assert re.search(r"^fine-tuned\s+P03\s+kidneys\s+2\s+0\.750\s+3\.2$", text, re.MULTILINE)
    assert text.count("(class average)") == 1  # one dataset: its mean is the average
    assert "P02" not in text  # no held-out case of it was scored


def test_the_training_bar_reports_each_epoch_off_a_terminal():
    out = io.StringIO()
    bar = TrainingBar("pre-train", stream=out, tty=False, width=10)
    with bar:
        bar({"event": "waiting", "message": "the 2 worker(s) are starting"})
        bar({"event": "start", "iteration": 0, "total": 40})
        bar({"event": "epoch", "iteration": 20, "total": 40, "loss": 1.25, "eta_s": 30.0})
        bar({"event": "epoch", "iteration": 40, "total": 40, "loss": 0.5, "eta_s": 0.0,
             "validation": {"val/dice_mean/class": 0.625}})  # fmt: skip
        bar({"event": "end", "iteration": 40, "total": 40})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "the 2 worker(s) are starting" in lines[0]
    assert re.match(r"  pre-train \[#####\.\.\.\.\.\] 20/40 it  loss 1\.250  \d+s, ETA 30s$", lines[1])
    assert re.match(r"  pre-train \[##########\] 40/40 it  loss 0\.500  val Dice 0\.62  \d+s$", lines[2])


def test_the_training_bar_redraws_one_line_on_a_terminal():
    out = io.StringIO()
    with TrainingBar("fine-tune", stream=out, tty=True, tick_s=0.05) as bar:
        bar({"event": "start", "iteration": 0, "total": 8})
        bar({"event": "epoch", "iteration": 4, "total": 8, "loss": 2.0, "eta_s": 9.0})
        time.sleep(0.2)  # the ticker redraws meanwhile
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert text.count("\r") >= 4 and "4/8 it  loss 2.000" in text.split("\r")[-1]


def test_held_out_cases_are_linked_under_their_raw_case_names(tmp_path):
    from multitalent.rawio.naming import case_name, find_scans

    raw = tmp_path / "raw"
    assert write_phantom(raw, scale=0.5) > 0 and not list(tmp_path.glob(".tmp-*"))
    catalog = load_catalog("phantom").subset(["P03", "P05"])
    splits = {
        "version": 1,
        "n_splits": 1,
        "folds": [{"train": [], "val": ["P03__case_00001", "P05__thorax_002"]}],
    }
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    cases = heldout_cases(tmp_path, catalog, raw)
    assert [(c.dataset_id, c.case_id) for c in cases] == [("P03", "case_00001"), ("P05", "thorax_002")]
    folder = link_inputs(cases, tmp_path / "inputs")
    assert sorted(case_name(p) for p in find_scans(folder)) == ["case_00001", "thorax_002"]
    assert (folder / "case_00001" / "imaging.nii.gz").resolve() == cases[0].image_path.resolve()
    link_inputs(cases[:1], folder)  # replaced whole: the other link is gone, its target is not
    assert [case_name(p) for p in find_scans(folder)] == ["case_00001"] and cases[1].image_path.is_file()
    splits["folds"][0]["val"].append("P05__thorax_999")
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match=r"P05 cases \['thorax_999'\] are not in"):
        heldout_cases(tmp_path, catalog, raw)
