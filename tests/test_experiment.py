"""``multitalent experiment`` (issue 10): the job file, the plan of steps and runs, the dry run of
``jobs/experiment.yaml``, the catalog subset syntax the per-dataset arm uses, resumable step records and the
report's aggregation (union of the per-dataset models, spread over seeds, cost to a Dice)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from multitalent.catalog import CatalogError, load_catalog
from multitalent.cli import main
from multitalent.experiment import load_experiment_job, plan_steps
from multitalent.experiment.report import arm_curve, build_report, progress_records, render_markdown, time_to
from multitalent.experiment.runner import (
    ExperimentError,
    dry_run_plan,
    held_out_cases,
    link_inputs,
    read_record,
)
from multitalent.jobs import JobError

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "experiment.yaml"


def plan_for(tmp_path: Path, *overrides: str):
    return plan_steps(load_experiment_job(JOB, [f"out={tmp_path / 'exp'}", *overrides]))


# ------------------------------------------------------------------------------------------ catalogs
def test_a_catalog_of_one_dataset_is_spelled_with_brackets():
    one = load_catalog("phantom[P05]")
    assert one.name == "phantom[P05]" and one.dataset_ids == ("P05",)
    assert one.hash == load_catalog("phantom").subset(["P05"]).hash  # the label space of the subset
    assert load_catalog(one.name).hash == one.hash  # the name loads back (evaluate reads it so)
    assert load_catalog("phantom[P04, P01]").dataset_ids == ("P01", "P04")  # the catalog's order
    with pytest.raises(CatalogError, match=r"P09.*datasets: P01"):
        load_catalog("phantom[P09]")


# ------------------------------------------------------------------------------------------ job + plan
def test_the_job_file_plans_every_arm_seed_and_step(tmp_path):
    plan = plan_for(tmp_path)
    job = plan.job
    assert job.arms == ["multitalent", "naive_merge", "single"] and job.seeds == [0, 1]
    assert plan.datasets == ("P01", "P02", "P03", "P04", "P05", "P06", "P07")
    # 2 multi-dataset runs + 7 single-dataset runs per seed
    assert len(plan.runs) == 2 * (2 + 7)
    multi = plan.runs_of("multitalent", 0)[0]
    naive = plan.runs_of("naive_merge", 0)[0]
    singles = plan.runs_of("single", 0)
    assert multi.iterations == naive.iterations == job.budget.iterations
    assert multi.output == "sigmoid_heads" and naive.output == "merged_softmax"
    # equal total: each single-dataset run 420 / 7 = 60 iterations, 7 x 60 = 420
    assert job.budget.single == "equal_total" and {r.iterations for r in singles} == {60}
    assert sum(r.iterations for r in singles) == multi.iterations
    assert [r.catalog for r in singles] == [f"phantom[{d}]" for d in plan.datasets]
    # validation at the same fractions of every schedule
    assert multi.epochs // multi.validate_every == singles[0].epochs // singles[0].validate_every == 3
    kinds = [s.kind for s in plan.steps]
    assert kinds.count("convert") == 1 + 7 and kinds.count("inputs") == 1 and kinds[-1] == "report"
    assert kinds.count("train") == kinds.count("predict") == kinds.count("evaluate") == 18
    # every seed-0 step comes before every seed-1 step (a partial experiment has whole seeds)
    names = [s.name for s in plan.steps]
    assert max(i for i, n in enumerate(names) if "-s0-" in n) < min(
        i for i, n in enumerate(names) if "-s1-" in n
    )
    train = next(s for s in plan.steps if s.name == f"train-{naive.name}")
    assert "architecture.output=merged_softmax" in train.argv and "run.seed=0" in train.argv
    assert train.command.startswith("multitalent train ") and train.argv[1].endswith("pretrain_cpu_tiny.yaml")


@pytest.mark.parametrize(("single", "iterations"), [("paper", 240), (0.7, 320), (0.01, 80)])
def test_single_dataset_budgets_round_to_whole_validation_blocks(tmp_path, single, iterations):
    budget = ["budget.iterations=480", "budget.validations=4"]
    plan = plan_for(tmp_path, f"budget.single={single}", *budget, "arms=[multitalent, single]", "seeds=[3]")
    run = plan.runs_of("single", 3)[0]
    # whole blocks of 4 epochs of 20 iterations, at least one (0.01 of 480 rounds up to one block)
    assert run.iterations == iterations and run.epochs % 4 == 0 and run.validate_every == run.epochs // 4
    assert [r.arm for r in plan.runs] == ["multitalent"] + ["single"] * 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train_set=[run.seed=3]", "set by the experiment"),
        ("train_set=[batch.global_size]", "KEY=VALUE"),
        ("budget.iterations=490", "whole number of epochs"),
        ("budget.single=1.5", "fraction"),
        ("budget.single=half", "budget.single"),
        ("arms=[multitalent, multitalent]", "distinct arms"),
        ("arms=[naive]", "arms"),
        ("seeds=[]", "seeds"),
        ("train=missing.yaml", "missing.yaml does not exist"),
    ],
)
def test_bad_experiment_jobs_are_named(tmp_path, override, message):
    with pytest.raises(JobError, match=message):
        load_experiment_job(JOB, [f"out={tmp_path}", override])


def test_experiment_job_dry_runs_every_training_run(tmp_path, capsys):
    """``multitalent experiment jobs/experiment.yaml --dry-run``: every step listed with its command, every
    training run's job built by the train dry run (network, output kind and loss), nothing written."""
    out = tmp_path / "exp"
    assert main(["experiment", str(JOB), "--dry-run", "--set", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "18 training runs, 64 steps" in text
    assert text.count("output merged_softmax; loss DeepSupervisionLoss(MergedSoftmaxLoss)") == 2
    assert text.count("output sigmoid_heads; loss DeepSupervisionLoss(PartialLabelLoss)") == 16
    assert "multitalent evaluate --pred" in text and "--splits" in text
    assert not out.exists()


def test_a_record_of_another_command_is_refused(tmp_path):
    plan = plan_for(tmp_path)
    step = plan.steps[0]
    record = plan.layout.record(step.name)
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"step": step.name, "command": step.command, "wall_s": 1.0}))
    assert read_record(plan, step) is not None  # finished: skipped by a rerun
    record.write_text(json.dumps({"step": step.name, "command": "multitalent convert other.yaml"}))
    with pytest.raises(ExperimentError, match="another command"):
        read_record(plan, step)
    _, errors = dry_run_plan(plan_for(tmp_path, "arms=[naive_merge]", "seeds=[0]"))
    assert any("another command" in e for e in errors)


# ------------------------------------------------------------------------------------------ report
def write_run(
    plan, run, *, dice: dict[str, float], val: list[dict[str, float]], cpu_per_it: float, seconds: float
):
    """What the commands of one run leave: a progress.jsonl with one validation per block (resumed once
    half-way, so CPU counts restart), the evaluation and the predictions."""
    layout = plan.layout
    folder = layout.runs / run.name
    folder.mkdir(parents=True)
    lines = []
    per_block = run.iterations // len(val)
    for j, v in enumerate(val):
        if j == len(val) // 2:  # a second launch: cpu_s starts again from 0
            lines.append({"event": "start", "iteration": j * per_block})
        it = (j + 1) * per_block
        launch_start = (len(val) // 2) * per_block if j >= len(val) // 2 else 0
        validation = {f"val/dice/{k.replace(':', '/').replace(' ', '_')}": x for k, x in v.items()}
        lines.append(
            {
                "event": "epoch",
                "iteration": it,
                "cpu_s": (it - launch_start) * cpu_per_it,
                "validation": validation,
            }
        )
    (folder / "progress.jsonl").write_text("\n".join(json.dumps(x) for x in [{"event": "start"}, *lines]))
    ev = layout.evaluations(run.name)
    ev.mkdir(parents=True)
    per_class = {k: {"dice": x, "hd95_mm": 10 * (1 - x), "cases": 2} for k, x in dice.items()}
    (ev / "evaluation.json").write_text(json.dumps({"summary": {"per_class": per_class}}))
    pred = layout.predictions(run.name)
    pred.mkdir(parents=True)
    cases = {c: {"seconds": seconds, "cpu_seconds": seconds / 2} for c in ("a", "b", "own")}
    (pred / "predictions.json").write_text(json.dumps({"cases": cases}))


def test_report_joins_the_single_models_and_spreads_over_seeds(tmp_path):
    plan = plan_for(
        tmp_path,
        "arms=[multitalent, single]",
        "seeds=[0, 1]",
        "budget.iterations=80",
        "budget.iterations_per_epoch=10",
        "budget.validations=2",
        "budget.single=paper",
        "evaluation.dice_targets=[0.5]",
        "evaluation.conflicts=['P05:heart']",
    )
    inputs = plan.layout.inputs(0)
    inputs.mkdir(parents=True)
    (inputs / "inputs.json").write_text(json.dumps({"timing": ["a", "b"], "cases": {}}))
    for seed, offset in ((0, 0.0), (1, 0.1)):
        multi = plan.runs_of("multitalent", seed)[0]
        write_run(
            plan, multi, dice={"P01:liver": 0.6 + offset, "P05:heart": 0.4}, cpu_per_it=1.0, seconds=2.0,
            val=[{"P01:liver": 0.3, "P05:heart": 0.2}, {"P01:liver": 0.7, "P05:heart": 0.5}],
        )  # fmt: skip
        for run in plan.runs_of("single", seed):
            d = run.datasets[0]
            dice = {"P01": {"P01:liver": 0.8}, "P05": {"P05:heart": 0.2 + offset}}.get(d, {})
            val = {
                "P01": [{"P01:liver": 0.5}, {"P01:liver": 0.9}],
                "P05": [{"P05:heart": 0.1}, {"P05:heart": 0.2}],
            }
            write_run(plan, run, dice=dice, val=val.get(d, [{}, {}]), cpu_per_it=0.5, seconds=1.0)
    report = build_report(plan)
    multi0 = report["arms"]["multitalent"]["0"]
    single0 = report["arms"]["single"]["0"]
    # the union of the per-dataset evaluations
    assert set(single0["scores"]) == {"P01:liver", "P05:heart"}
    assert single0["scores"]["P05:heart"]["dice"] == pytest.approx(0.2)
    # costs: 7 runs of 40 iterations; CPU counted over both launches; 7 models x 1 s on each timing case
    # (case "own" is not a timing case: only the timing cases are predicted by every model)
    assert single0["costs"]["runs"] == 7 and single0["costs"]["iterations"] == 280
    assert single0["costs"]["train_cpu_rank0_s"] == pytest.approx(7 * 40 * 0.5)
    assert single0["costs"]["seconds_per_case"] == pytest.approx(7.0)
    assert single0["costs"]["cpu_seconds_per_case"] == pytest.approx(3.5)
    assert multi0["costs"]["seconds_per_case"] == pytest.approx(2.0)
    assert single0["costs"]["timing_cases"] == 2
    # curves: pass j of every run; class means
    assert [p["dice"] for p in single0["curve"]] == pytest.approx([0.3, 0.55])
    assert [p["iterations"] for p in single0["curve"]] == [140, 280]
    assert [p["dice"] for p in multi0["curve"]] == pytest.approx([0.25, 0.6])
    assert single0["time_to_dice"]["0.5"]["iterations"] == 280
    assert multi0["time_to_dice"]["0.5"]["cpu_s"] == pytest.approx(80.0)
    assert time_to(single0["curve"], 0.9) is None
    text = render_markdown(report)
    # mean over seeds ± half the range: multitalent P01 liver 0.6 / 0.7
    assert "| P01:liver | 0.65 ±0.05 | 0.80 ±0.00 |" in text
    assert "| P05:heart † | 0.40 ±0.00 | 0.25 ±0.05 |" in text
    assert "| 0.5 | 0 | 80 it, 80 CPU s | 280 it, 140 CPU s |" in text
    assert "| inference CPU per case ÷ MultiTalent's | 1.0× ±0.0 | 3.5× ±0.0 |" in text
    assert "| training runs (models) per seed | 1 | 7 |" in text


def test_progress_records_add_up_cpu_over_launches(tmp_path):
    lines = [
        {"event": "start", "iteration": 0},
        {"event": "epoch", "iteration": 10, "cpu_s": 5.0},
        {"event": "start", "iteration": 10},
        {"event": "epoch", "iteration": 20, "cpu_s": 4.0},
    ]
    (tmp_path / "progress.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    records = progress_records(tmp_path)
    assert [r.get("cpu_total_s") for r in records if r["event"] == "epoch"] == [5.0, 9.0]
    assert progress_records(tmp_path / "missing") == []


def test_a_curve_without_validation_is_nan_not_zero(tmp_path):
    plan = plan_for(tmp_path, "arms=[multitalent]", "seeds=[0]")
    curve = arm_curve(plan, plan.runs_of("multitalent", 0))
    assert all(math.isnan(p["dice"]) and p["cpu_s"] is None for p in curve)


def test_held_out_scans_are_linked_per_model(tmp_path):
    """``inputs/fold0``: every held-out scan (multi-dataset models); ``inputs/fold0-<D>``: D's held-out
    scans and the timing cases (single-dataset models), under the names predict and evaluate use."""
    from multitalent.data.sampling import write_splits
    from multitalent.rawio import discover_cases
    from multitalent.rawio.naming import case_name, find_scans
    from multitalent.synth import write_phantom_collection

    raw = tmp_path / "raw"
    write_phantom_collection(raw, seed=0)
    catalog = load_catalog("phantom")
    keys = [(d.id, c.case_id) for d in catalog.datasets for c in discover_cases(d, raw / d.location)]
    (tmp_path / "convert.yaml").write_text(f"kind: convert\ncatalog: phantom\nraw_root: {raw}\nout: unused\n")
    plan = plan_for(tmp_path, f"convert={tmp_path / 'convert.yaml'}")
    plan.layout.shards("all").mkdir(parents=True)
    write_splits(plan.layout.shards("all"), keys)
    info = link_inputs(plan)
    # datasets with fewer than 5 cases (P02: 3, P06: 4) have no held-out case
    assert {d: len(c) for d, c in info["cases"].items()} == {
        "P01": 2, "P02": 0, "P03": 2, "P04": 2, "P05": 3, "P06": 0, "P07": 1,
    }  # fmt: skip
    everything = {case_name(p) for p in find_scans(plan.layout.inputs(0))}
    assert everything == set(info["names"]) and len(everything) == 10
    assert len(info["timing"]) == 2 and set(info["timing"]) <= everything
    for d in plan.datasets:
        mine = {case_name(p) for p in find_scans(plan.layout.inputs(0, d))}
        own = {n for n, where in info["names"].items() if where.startswith(f"{d}/")}
        assert mine == own | set(info["timing"])
        assert all(p.is_symlink() and p.resolve().is_file() for p in find_scans(plan.layout.inputs(0, d)))
    assert held_out_cases(plan) == info["cases"]
