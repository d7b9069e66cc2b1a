"""``multitalent evaluate``: Dice and HD95 per case and class, aggregates, CSV + markdown, MLflow."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from multitalent.jobs import JobError


def load_command_job(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from multitalent.evaluation.job import EvaluateJob
    from multitalent.jobs import load_job

    data: dict[str, Any] = load_job(args.job, EvaluateJob, args.overrides).model_dump() if args.job else {}
    for key, field in (
        ("pred", "pred"),
        ("gt", "gt"),
        ("catalog", "catalog"),
        ("datasets", "datasets"),
        ("splits", "splits"),
        ("fold", "fold"),
        ("out", "out"),
        ("mlflow", "mlflow_run"),
        ("tracking_uri", "tracking_uri"),
    ):
        if getattr(args, key, None) is not None:
            data[field] = getattr(args, key)
    try:
        return EvaluateJob.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '-'}: {err['msg']}" for err in e.errors()]
        raise JobError("invalid arguments (--pred and --gt are required)\n" + "\n".join(lines)) from None


def model_catalog(pred: Path) -> Any:
    """The label space named in ``PRED/predictions.json``, checked against its hash."""
    from multitalent.catalog import load_catalog

    path = pred / "predictions.json"
    try:
        named = json.loads(path.read_text())["model"]["catalog"]
    except (OSError, ValueError, KeyError) as e:
        raise JobError(f"{path}: cannot read the model's catalog ({e}); pass --catalog") from None
    catalog = load_catalog(named["name"])
    if catalog.hash != named["hash"]:
        raise JobError(
            f"{path}: the model's label space {named['name']!r} has hash {named['hash']}, the preset now "
            f"{catalog.hash}; pass --catalog with the model's catalog file"
        )
    return catalog


def log_to_mlflow(report: Any, files: list[Path], run_id: str, tracking_uri: str | None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in report.metrics().items():
        client.log_metric(run_id, key, value)
    for f in files:
        client.log_artifact(run_id, str(f), "evaluation")


def run(args: argparse.Namespace) -> int:
    from multitalent.catalog import load_catalog
    from multitalent.data.sampling import fold_keys, load_splits
    from multitalent.evaluation.evaluate import evaluate_folder

    try:
        job = load_command_job(args)
        pred, gt = Path(job.pred), Path(job.gt)
        for what, p in (("--pred", pred), ("--gt", gt)):
            if not p.is_dir():
                raise JobError(f"{what} {p}: no such folder")
        catalog = load_catalog(job.catalog) if job.catalog else model_catalog(pred)
        cases = None
        if job.splits is not None:
            _, val = fold_keys(load_splits(job.splits), job.fold)
            cases = set(val)
            if not cases:
                raise JobError(f"{job.splits}: fold {job.fold} has no validation cases")
    except (JobError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = evaluate_folder(pred, gt, catalog, datasets=job.datasets, cases=cases)
    out = Path(job.out) if job.out else pred
    files = report.write(out)
    s = report.summary
    for key, v in s.per_class.items():
        print(f"{key:40s} Dice {v['dice']:.3f}  HD95 {v['hd95_mm']:8.2f} mm  ({v['cases']} cases)")
    print(
        f"class average Dice {s.class_average['dice']:.3f}, "
        f"dataset average Dice {s.dataset_average['dice']:.3f}; "
        + ", ".join(f"{k} {n}" for k, n in s.status_counts.items())
        + f"; {len(report.missing)} missing; tables in {out}"
    )
    for err in report.errors:
        print(f"error: {err}", file=sys.stderr)
    if job.mlflow_run:
        log_to_mlflow(report, files, job.mlflow_run, job.tracking_uri)
        print(f"logged {len(report.metrics())} metrics to MLflow run {job.mlflow_run}")
    if not report.scores:
        print("error: no case was scored (no prediction matches a ground-truth case)", file=sys.stderr)
        return 1
    return 1 if report.errors else 0
