"""The experiment's tables, from what its commands wrote (nothing here trains, predicts or scores).

Sources, per training run: ``evaluations/<run>/evaluation.json`` (``multitalent evaluate``: Dice and
HD95 per class on the held-out fold), ``runs/<run>/progress.jsonl`` (``multitalent train``: iterations,
rank-0 CPU seconds, validation Dice per class at each validation pass), ``predictions/<run>/predictions.json``
(``multitalent predict``: seconds per case), and the step records (wall and CPU seconds of each command).

Arm ``single`` is K runs: its per-class table is the union of the K evaluations (each run scores its own
dataset's classes), its cost the sum of the K runs', its validation curve at pass ``j`` the mean over the
classes of every run's pass ``j`` (the passes sit at the same fractions of each run's schedule), and its
inference time per case the sum of the K models' times on that case (segmenting all classes of a scan
takes all K). Over seeds: the mean and half the range (``±``; with two seeds, half their difference).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multitalent.experiment.plan import ExperimentPlan, RunSpec
from multitalent.provenance import git_commit

ARM_TITLES = {"multitalent": "MultiTalent", "naive_merge": "naive merge", "single": "one model per dataset"}


# ------------------------------------------------------------------------------------------ reading
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def progress_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``progress.jsonl`` records, with ``cpu_s`` made cumulative over launches (a resumed run
    starts counting again at its ``start`` record)."""
    path = run_dir / "progress.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    offset = last = 0.0
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict):
            continue
        if r.get("event") == "start":
            offset, last = offset + last, 0.0
        if isinstance(r.get("cpu_s"), int | float):
            last = float(r["cpu_s"])
            r = {**r, "cpu_total_s": offset + last}
        out.append(r)
    return out


def validation_points(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{iteration, cpu_s, per_class: {metric key: Dice}}]`` of each validation pass, in order (a pass
    repeated by a resumed launch counts once)."""
    points: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("event") == "epoch" and isinstance(r.get("validation"), dict):
            per_class = {k: float(v) for k, v in r["validation"].items() if k.startswith("val/dice/")}
            points[int(r["iteration"])] = {
                "iteration": int(r["iteration"]),
                "cpu_s": r.get("cpu_total_s"),
                "per_class": per_class,
            }
    return [points[i] for i in sorted(points)]


def cost_at(records: Sequence[dict[str, Any]], iteration: int) -> float | None:
    """Rank-0 CPU seconds when ``iteration`` iterations were done (an epoch record there)."""
    for r in records:
        if r.get("event") == "epoch" and int(r.get("iteration", -1)) == iteration:
            value = r.get("cpu_total_s")
            return float(value) if value is not None else None
    return None


def _mean(values: Iterable[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(finite) if finite else math.nan


# ------------------------------------------------------------------------------------------ per arm
def arm_scores(plan: ExperimentPlan, runs: Sequence[RunSpec]) -> dict[str, dict[str, float]]:
    """Class key -> ``{dice, hd95_mm, cases}`` from the evaluations of ``runs`` (one arm, one seed)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        data = _json(plan.layout.evaluations(run.name) / "evaluation.json")
        if not isinstance(data, dict):
            continue
        for key, v in data["summary"]["per_class"].items():
            out[key] = {
                "dice": math.nan if v.get("dice") is None else float(v["dice"]),
                "hd95_mm": math.nan if v.get("hd95_mm") is None else float(v["hd95_mm"]),
                "cases": int(v.get("cases", 0)),
            }
    return out


def arm_curve(plan: ExperimentPlan, runs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """Validation pass ``j`` of the arm: ``{fraction, iterations, cpu_s, dice}`` where ``dice`` is the
    mean over the classes of every run's pass ``j`` and ``iterations`` / ``cpu_s`` sum every run's
    (runs without validation cases count their cost at the same point of their schedule)."""
    per_run = [(r, progress_records(plan.layout.runs / r.name)) for r in runs]
    validations = plan.job.budget.validations
    curve = []
    for j in range(validations):
        fraction = (j + 1) / validations
        dice: dict[str, float] = {}
        iterations = 0
        cpu: float | None = 0.0
        for run, records in per_run:
            at = round(run.iterations * fraction)
            iterations += at
            c = cost_at(records, at)
            cpu = None if cpu is None or c is None else cpu + c
            points = validation_points(records)
            if len(points) > j:
                dice.update(points[j]["per_class"])
        curve.append(
            {
                "fraction": fraction,
                "iterations": iterations,
                "cpu_s": cpu,
                "dice": _mean(dice.values()),
                "classes": len(dice),
            }
        )
    return curve


def arm_costs(plan: ExperimentPlan, runs: Sequence[RunSpec]) -> dict[str, Any]:
    """Training and inference cost of one arm and seed (sums over its runs)."""
    train_wall = train_cpu = train_loop = predict_wall = predict_cpu = 0.0
    inputs = _json(plan.layout.inputs(plan.job.evaluation.fold) / "inputs.json") or {}
    timing = set(inputs.get("timing", []))
    per_case: dict[str, float] = {}
    cpu_per_case: dict[str, float] = {}
    timed: list[int] = []
    for run in runs:
        train = _json(plan.layout.record(f"train-{run.name}")) or {}
        predict = _json(plan.layout.record(f"predict-{run.name}")) or {}
        train_wall += float(train.get("wall_s") or 0.0)
        predict_wall += float(predict.get("wall_s") or 0.0)
        predict_cpu += float(predict.get("cpu_s") or 0.0)
        records = progress_records(plan.layout.runs / run.name)
        train_cpu += cost_at(records, run.iterations) or 0.0
        train_loop += sum(float(r.get("seconds") or 0.0) for r in records if r.get("event") == "end")
        predictions = _json(plan.layout.predictions(run.name) / "predictions.json") or {}
        cases = {k: v for k, v in predictions.get("cases", {}).items() if k in timing}
        timed.append(len(cases))
        for case, record in cases.items():
            per_case[case] = per_case.get(case, 0.0) + float(record.get("seconds", math.nan))
            cpu_per_case[case] = cpu_per_case.get(case, 0.0) + float(record.get("cpu_seconds", math.nan))
    return {
        "runs": len(runs),
        "iterations": sum(r.iterations for r in runs),
        "train_wall_s": train_wall,
        "train_loop_s": train_loop,
        "train_cpu_rank0_s": train_cpu,
        "predict_wall_s": predict_wall,
        "predict_cpu_s": predict_cpu,
        "timing_cases": min(timed) if timed else 0,  # timing cases every model of the arm predicted
        "seconds_per_case": _mean(per_case.values()),
        "cpu_seconds_per_case": _mean(cpu_per_case.values()),
    }


def time_to(curve: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first validation pass at which the arm's Dice reached ``target``."""
    for point in curve:
        if not math.isnan(point["dice"]) and point["dice"] >= target:
            return point
    return None


# ------------------------------------------------------------------------------------------ the report
def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        version = str(torch.__version__)
    except ImportError:  # pragma: no cover - torch is a dependency
        version = "?"
    return f"{os.cpu_count()} CPU(s) {model or platform.machine()}, {platform.system()}, torch {version}"


def build_report(plan: ExperimentPlan) -> dict[str, Any]:
    job = plan.job
    arms: dict[str, Any] = {}
    for arm in job.arms:
        seeds = {}
        for seed in job.seeds:
            runs = plan.runs_of(arm, seed)
            curve = arm_curve(plan, runs)
            seeds[str(seed)] = {
                "runs": [r.name for r in runs],
                "scores": arm_scores(plan, runs),
                "curve": curve,
                "costs": arm_costs(plan, runs),
                "time_to_dice": {str(t): time_to(curve, t) for t in job.evaluation.dice_targets},
            }
        arms[arm] = seeds
    records = [_json(plan.layout.record(s.name)) for s in plan.steps if s.kind != "report"]
    done = [r for r in records if r]
    started = min((r["started"] for r in done if r.get("started")), default=None)
    finished = max((r["finished"] for r in done if r.get("finished")), default=None)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git_commit": git_commit(short=True),
        "out": str(plan.layout.out),
        "job": job.model_dump(),
        "steps_done": len(done),
        "steps": len(records),
        "started": started,
        "finished": finished,
        "step_seconds": {r["step"]: r.get("wall_s") for r in done},
        "step_cpu_seconds": {r["step"]: r.get("cpu_s") for r in done},
        "step_notes": {r["step"]: r.get("note") for r in done},
        "datasets": list(plan.datasets),
        "held_out": _json(plan.layout.inputs(job.evaluation.fold) / "inputs.json"),
        "arms": arms,
    }


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    """``mean ±half-range`` of the finite values; ``–`` when none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "–"
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return f"{mean:.{digits}f}" + ("" if len(values) == 1 else " (1 seed)")
    if digits == 0 and max(finite) == min(finite):  # a count, the same in every seed
        return f"{mean:.0f}"
    return f"{mean:.{digits}f} ±{(max(finite) - min(finite)) / 2:.{digits}f}"


def _times(values: Sequence[float]) -> str:
    """:func:`_fmt` of ratios, the mean marked ``×``: ``3.1× ±0.2``."""
    text = _fmt(values, 1)
    if text == "–":
        return text
    head, sep, tail = text.partition(" ")
    return f"{head}×{sep}{tail}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _class_order(report: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for arm in report["arms"].values():
        for seed in arm.values():
            keys += [k for k in seed["scores"] if k not in keys]
    order = {d: i for i, d in enumerate(report["datasets"])}
    return sorted(keys, key=lambda k: (order.get(k.split(":")[0], 99), keys.index(k)))


def render_markdown(report: dict[str, Any]) -> str:
    job = report["job"]
    arms = list(report["arms"])
    seeds = [str(s) for s in job["seeds"]]
    conflicts = set(job["evaluation"]["conflicts"])
    keys = _class_order(report)
    head = " | " + " | ".join(ARM_TITLES[a] for a in arms) + " |"
    rule = "|---" * (len(arms) + 1) + "|"
    lines = [
        "# Experiment: MultiTalent vs naive merge vs one model per dataset",
        "",
        f"- out: `{report['out']}`; steps done {report['steps_done']} of {report['steps']}; "
        f"{report['started']} to {report['finished']} (UTC); commit {report['git_commit']}",
        f"- machine: {report['machine']}",
        f"- seeds {', '.join(seeds)}; values are the mean over seeds ±half their range; "
        f"held-out cases: fold {job['evaluation']['fold']} of the converter's splits.json",
        "",
        "## Dice per class (held-out fold, `multitalent evaluate`)",
        "",
        "| class" + head,
        rule,
    ]

    def values(arm: str, key: str, metric: str) -> list[float]:
        return [report["arms"][arm][s]["scores"].get(key, {}).get(metric, math.nan) for s in seeds]

    for key in keys:
        mark = " †" if key in conflicts else ""
        lines.append(f"| {key}{mark} | " + " | ".join(_fmt(values(a, key, "dice")) for a in arms) + " |")
    datasets = [d for d in report["datasets"] if any(k.startswith(f"{d}:") for k in keys)]

    def dataset_mean(arm: str, seed: str, d: str, metric: str) -> float:
        return _mean(
            v[metric] for k, v in report["arms"][arm][seed]["scores"].items() if k.split(":")[0] == d
        )

    def average(arm: str, seed: str, metric: str, over: str) -> float:
        scores = report["arms"][arm][seed]["scores"]
        if over == "class":
            return _mean(scores.get(k, {}).get(metric, math.nan) for k in keys)
        if over == "conflict":
            return _mean(scores.get(k, {}).get(metric, math.nan) for k in keys if k in conflicts)
        return _mean(dataset_mean(arm, seed, d, metric) for d in datasets)

    for metric, title in (("dice", "Dice"), ("hd95_mm", "HD95 (mm)")):
        if metric == "hd95_mm":
            lines += ["", "## HD95 per class (mm; lower is better)", "", "| class" + head, rule]
            for key in keys:
                mark = " †" if key in conflicts else ""
                row = " | ".join(_fmt(values(a, key, metric), 1) for a in arms)
                lines.append(f"| {key}{mark} | {row} |")
        lines += ["", f"## {title} per dataset and averaged", "", "| dataset" + head, rule]
        digits = 2 if metric == "dice" else 1
        for d in datasets:
            row = " | ".join(_fmt([dataset_mean(a, s, d, metric) for s in seeds], digits) for a in arms)
            lines.append(f"| {d} | {row} |")
        for over, label in (
            ("class", "class average"),
            ("dataset", "dataset average"),
            ("conflict", "† classes"),
        ):
            row = " | ".join(_fmt([average(a, s, metric, over) for s in seeds], digits) for a in arms)
            lines.append(f"| **{label}** | {row} |")
    lines += [
        "",
        "† a class whose protocol contradicts a same-name class of another dataset (the naive merge joins "
        "them): " + ", ".join(sorted(conflicts)),
        "",
        "## Cost",
        "",
        "| | " + " | ".join(ARM_TITLES[a] for a in arms) + " |",
        rule,
    ]

    def cost(arm: str, field: str, digits: int = 0) -> str:
        return _fmt([float(report["arms"][arm][s]["costs"][field]) for s in seeds], digits)

    rows = [
        ("training runs (models) per seed", "runs", 0),
        ("training iterations per seed (all runs)", "iterations", 0),
        ("training wall s per seed (train commands)", "train_wall_s", 0),
        ("of which in the training loops (the rest: launches)", "train_loop_s", 0),
        ("training CPU s per seed (rank 0 of 2 workers)", "train_cpu_rank0_s", 0),
        ("timing cases (predicted by every model)", "timing_cases", 0),
        ("inference wall s per case, all classes (all models)", "seconds_per_case", 2),
        ("inference CPU s per case, all classes (all models)", "cpu_seconds_per_case", 2),
        ("predict commands: wall s per seed", "predict_wall_s", 0),
        ("predict commands: CPU s per seed", "predict_cpu_s", 0),
    ]
    for label, field, digits in rows:
        lines.append(f"| {label} | " + " | ".join(cost(a, field, digits) for a in arms) + " |")
    if "multitalent" in arms:
        ratios = []
        for a in arms:
            per_seed = [
                _ratio(
                    report["arms"][a][s]["costs"]["cpu_seconds_per_case"],
                    report["arms"]["multitalent"][s]["costs"]["cpu_seconds_per_case"],
                )
                for s in seeds
            ]
            ratios.append(_times(per_seed))
        lines.append("| inference CPU per case ÷ MultiTalent's | " + " | ".join(ratios) + " |")
    lines += ["", "## Training cost to reach a validation Dice", ""]
    lines += [
        "Validation Dice during training (mean over classes, fixed foreground patches of the held-out "
        "fold); the cost is the iterations and rank-0 CPU seconds of all the arm's runs at the first "
        "validation pass that reached it (per seed; `not reached` within the budget).",
        "",
        "| target | seed | " + " | ".join(ARM_TITLES[a] for a in arms) + " |",
        "|---|---" + "|---" * len(arms) + "|",
    ]
    for target in job["evaluation"]["dice_targets"]:
        for s in seeds:
            cells = []
            for a in arms:
                p = report["arms"][a][s]["time_to_dice"].get(str(target))
                cpu = p and p.get("cpu_s")
                cells.append(
                    "not reached"
                    if p is None
                    else f"{p['iterations']} it" + (f", {cpu:.0f} CPU s" if cpu is not None else "")
                )
            lines.append(f"| {target} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "Validation curves (iterations of all runs of the arm: Dice):", ""]
    for a in arms:
        for s in seeds:
            pts = ", ".join(
                f"{p['iterations']}: {p['dice']:.3f}"
                if not math.isnan(p["dice"])
                else f"{p['iterations']}: –"
                for p in report["arms"][a][s]["curve"]
            )
            lines.append(f"- {ARM_TITLES[a]}, seed {s}: {pts}")
    lines += ["", "## Steps (wall s, CPU s of the command's reaped processes)", ""]
    for name, wall in report["step_seconds"].items():
        note = report["step_notes"].get(name)
        cpu = report["step_cpu_seconds"].get(name)
        detail = note if note and note.startswith("skipped") else f"{wall} s, CPU {cpu}"
        lines.append(f"- {name}: {detail}")
    return "\n".join(lines) + "\n"


def write_report(plan: ExperimentPlan) -> dict[str, Any]:
    """Build the report from the finished steps and write ``results.json`` and ``results.md``."""
    from multitalent.experiment.runner import _atomic_json

    report = build_report(plan)
    _atomic_json(plan.layout.results_json, report)
    text = render_markdown(report)
    tmp = plan.layout.results_md.with_name(f".tmp-{plan.layout.results_md.name}")
    tmp.write_text(text)
    tmp.replace(plan.layout.results_md)
    return report
