"""Running an experiment's steps (:mod:`multitalent.experiment.plan`): one subprocess per command,
resumable, every step recorded.

A step is finished when ``steps/<step>.json`` exists and names the same command; a rerun skips it. A
step interrupted before its record is run again: ``multitalent train`` resumes its run from the last
verified checkpoint, ``predict`` skips finished cases, ``convert`` finished cases. A record is written
(atomically) only after the command exited 0, so the record never claims what did not happen. A record of
another command (the job changed) is an error naming it: choose another ``out`` or remove the record.

Each record holds the command, exit status, start and end (UTC), wall seconds and the CPU seconds of
the command's reaped processes (``getrusage(RUSAGE_CHILDREN)``; Ray's worker processes are not among
them: training reports its own rank-0 CPU in ``progress.jsonl``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multitalent.experiment.plan import ExperimentPlan, Step
from multitalent.preprocess.plan import PLAN_FILE

Log = Callable[[str], None]
INPUTS_FILE = "inputs.json"


class ExperimentError(RuntimeError):
    """A step failed, or the output folder holds records of another experiment."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_record(plan: ExperimentPlan, step: Step) -> dict[str, Any] | None:
    """The finished step's record, ``None`` when it has not finished.

    Raises:
        ExperimentError: the record names another command.
    """
    path = plan.layout.record(step.name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("command") != step.command:
        raise ExperimentError(
            f"{path}: step {step.name} finished earlier with another command:\n  {record.get('command')}\n"
            f"now:\n  {step.command}\nthe job changed: choose another out, or remove that record to redo it"
        )
    return dict(record)


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def multitalent_command(python: str = sys.executable) -> str:
    """The ``multitalent`` program of this interpreter's environment (beside it, else on ``PATH``).

    Raises:
        ExperimentError: not installed.
    """
    import shutil

    beside = Path(python).with_name("multitalent")
    found = str(beside) if beside.is_file() else shutil.which("multitalent")
    if found is None:
        raise ExperimentError(f"no `multitalent` command beside {python} or on PATH: install the package")
    return found


def run_command(
    step: Step, log_path: Path, *, python: str = sys.executable, on_line: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run ``multitalent <argv>`` (the command installed with this interpreter), output appended to
    ``log_path``; returns the timing part of the record (``returncode``, ``started``, ``finished``,
    ``wall_s``, ``cpu_s``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [multitalent_command(python), *step.argv]
    started, t0, cpu0 = _now(), time.perf_counter(), _cpu_children()
    with log_path.open("a") as log:
        log.write(f"\n# {started} $ {step.command}\n")
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # lines as they come (progress, the log)
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    return {
        "returncode": code,
        "started": started,
        "finished": _now(),
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(_cpu_children() - cpu0, 2),
    }


def link_inputs(plan: ExperimentPlan) -> dict[str, Any]:
    """Link the raw scans of the fold's validation cases (the converter's ``splits.json``) into
    ``inputs/fold<F>`` (all of them) and ``inputs/fold<F>-<dataset>`` (that dataset's and the timing
    cases), keeping each scan's file name (and its case folder for KiTS19 / TotalSegmentator) so that
    ``predict`` names its outputs as ``evaluate`` looks for them. Each folder is built beside and renamed.
    """
    from multitalent.catalog import load_catalog
    from multitalent.data.sampling import SPLITS_FILE, fold_keys, load_splits
    from multitalent.rawio import discover_cases
    from multitalent.rawio.naming import GENERIC_IMAGE_NAMES, case_name, nifti_stem

    fold = plan.job.evaluation.fold
    _, val = fold_keys(load_splits(plan.layout.shards("all") / SPLITS_FILE), fold)
    held_out = set(val)
    catalog = load_catalog(plan.convert.catalog)
    raw_root = Path(plan.convert.raw_root).expanduser().resolve()
    cases: dict[str, list[str]] = {d: [] for d in plan.datasets}
    names: dict[str, str] = {}  # case name -> "<dataset>/<case id>"
    links: dict[str, list[tuple[str, str, Path]]] = {d: [] for d in plan.datasets}  # (case, link, image)
    for dataset in catalog.datasets:
        if dataset.id not in cases:
            continue
        for raw in discover_cases(dataset, raw_root / dataset.location):
            if (dataset.id, raw.case_id) not in held_out:
                continue
            name = case_name(raw.image_path)
            if name in names:
                raise ExperimentError(
                    f"case name {name!r} of {dataset.id}/{raw.case_id} is also {names[name]}'s: "
                    "predictions would collide"
                )
            names[name] = f"{dataset.id}/{raw.case_id}"
            generic = nifti_stem(raw.image_path) in GENERIC_IMAGE_NAMES
            rel = f"{name}/{raw.image_path.name}" if generic else raw.image_path.name
            links[dataset.id].append((name, rel, raw.image_path.resolve()))
            cases[dataset.id].append(raw.case_id)
    with_cases = [d for d in plan.datasets if links[d]]
    timing = [links[d][0] for d in with_cases[: plan.job.evaluation.timing_cases]]
    info = {"fold": fold, "cases": cases, "names": names, "timing": [name for name, _, _ in timing]}
    _link_folder(plan.layout.inputs(fold), [x for d in plan.datasets for x in links[d]], info)
    for d in plan.datasets:
        own = links[d] + [t for t in timing if t not in links[d]]
        _link_folder(plan.layout.inputs(fold, d), own, {**info, "dataset": d})
    return info


def _link_folder(target: Path, links: list[tuple[str, str, Path]], info: dict[str, Any]) -> None:
    import shutil

    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for _, rel, image in links:
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image)
        (tmp / INPUTS_FILE).write_text(json.dumps(info, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def held_out_cases(plan: ExperimentPlan) -> dict[str, list[str]]:
    """Dataset -> its held-out case ids (from the inputs step)."""
    path = plan.layout.inputs(plan.job.evaluation.fold) / INPUTS_FILE
    return dict(json.loads(path.read_text())["cases"])


def _train_progress(name: str, log: Log) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        if not isinstance(record, dict) or record.get("event") != "epoch":
            return
        if "validation" in record:
            dice = record["validation"].get("val/dice_mean/class")
            dice_text = f"val Dice {dice:.3f}" if isinstance(dice, float) else "validated"
            log(f"    {name}: iteration {record['iteration']}/{record['total']}, {dice_text}")

    return on_line


def run_plan(
    plan: ExperimentPlan, *, log: Log = print, python: str = sys.executable, stop_after: str | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished step in order; returns the records of all steps.

    ``stop_after``: a step name to end after (tests; a partial experiment).

    Raises:
        ExperimentError: a step failed (its log is named) or a record of another command.
    """
    from multitalent.experiment.report import write_report

    records: list[dict[str, Any]] = []
    n = len(plan.steps)
    t_start = time.perf_counter()
    for i, step in enumerate(plan.steps, 1):
        done = read_record(plan, step)
        if done is not None and step.kind != "report":
            records.append(done)
            log(f"[{i}/{n}] {step.name}: done earlier ({done.get('note') or _seconds(done.get('wall_s'))})")
            continue
        base = {"step": step.name, "kind": step.kind, "command": step.command, "log": None, "note": None}
        if step.kind == "inputs":
            t0, started = time.perf_counter(), _now()
            info = link_inputs(plan)
            counts = {d: len(c) for d, c in info["cases"].items()}
            record = {
                **base,
                "returncode": 0,
                "started": started,
                "finished": _now(),
                "wall_s": round(time.perf_counter() - t0, 2),
                "cpu_s": None,
                "note": "held-out cases: " + ", ".join(f"{d} {k}" for d, k in counts.items()),
            }
        elif step.kind == "report":
            _atomic_json(plan.layout.record(step.name), {**base, "returncode": 0, "started": _now()})
            write_report(plan)
            log(f"[{i}/{n}] report: {plan.layout.results_md}")
            records.append(base)
            continue
        elif step.kind == "evaluate" and not any(held_out_cases(plan).get(d) for d in step.requires):
            record = {**base, "returncode": 0, "started": _now(), "finished": _now(), "wall_s": 0.0}
            record["note"] = f"skipped: no fold-{plan.job.evaluation.fold} case of {', '.join(step.requires)}"
        else:
            log(f"[{i}/{n}] {step.name}: {step.command}")
            on_line = _train_progress(step.name, log) if step.kind == "train" else None
            log_path = plan.layout.log(step.name)
            timing = run_command(step, log_path, python=python, on_line=on_line)
            record = {**base, **timing, "log": str(log_path)}
            if timing["returncode"] != 0:
                raise ExperimentError(
                    f"step {step.name} failed (exit {timing['returncode']}); see {log_path}\n  {step.command}"
                )
        _atomic_json(plan.layout.record(step.name), record)
        records.append(record)
        cpu = "" if record.get("cpu_s") is None else f" (CPU {_seconds(record['cpu_s'])})"
        log(
            f"[{i}/{n}] {step.name}: {record['note'] or 'done'} in {_seconds(record['wall_s'])}{cpu}; "
            f"{_seconds(time.perf_counter() - t_start)} so far"
        )
        if stop_after is not None and step.name == stop_after:
            break
    return records


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    s = round(float(value))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{float(value):.1f}s"


def dry_run_plan(plan: ExperimentPlan) -> tuple[list[str], list[str]]:
    """Describe every step and build what can be built without running anything: each training run's
    job through ``multitalent train --dry-run``'s :func:`~multitalent.train.dry_run` (a collection not
    converted yet is expected: the experiment converts it first) and each convert variant's catalog.

    Returns ``(lines, errors)``; an error is what would stop the real experiment.
    """
    from multitalent.catalog import CatalogError, load_catalog
    from multitalent.jobs import JobError, apply_overrides
    from multitalent.train import dry_run, load_train_job

    lines: list[str] = []
    errors: list[str] = []
    job = plan.job
    b = job.budget
    lines.append(
        f"experiment: arms {', '.join(job.arms)}; seeds {job.seeds}; {len(plan.runs)} training runs, "
        f"{len(plan.steps)} steps; out {plan.layout.out}"
    )
    lines.append(
        f"budget: {b.epochs() * b.iterations_per_epoch} iterations per multi-dataset run, "
        f"{b.epochs(b.single_fraction(len(plan.datasets))) * b.iterations_per_epoch} per single-dataset run "
        f"(single: {b.single}), {b.validations} validations each"
    )
    for step in plan.steps:
        try:
            state = "done" if read_record(plan, step) is not None and step.kind != "report" else "to do"
        except ExperimentError as e:
            errors.append(str(e))
            state = "CONFLICT"
        lines.append(f"  {step.name:44s} {state:8s} {step.command}")
        if step.kind == "convert":
            data = apply_overrides({}, [a for a in step.argv[2:] if a != "--set"])
            if "catalog" in data:
                try:
                    load_catalog(data["catalog"])
                except CatalogError as e:
                    errors.append(f"{step.name}: {e}")
        if step.kind == "train":
            assert step.run is not None
            overrides = [a for a in step.argv[2:] if a not in ("--set", "--jsonl")]
            try:
                report = dry_run(load_train_job(step.argv[1], overrides))
            except (JobError, ValueError) as e:
                errors.append(f"{step.name}: {e}")
                continue
            model = next((ln for ln in report.lines if ln.startswith("model: ")), "")
            lines.append(f"      {model}")
            for problem in report.errors:
                if f"no {PLAN_FILE}" in problem and not (step.run.shards / PLAN_FILE).exists():
                    lines.append(f"      data: {step.run.shards} is converted by an earlier step")
                else:
                    errors.append(f"{step.name}: {problem}")
    return lines, errors
