"""``multitalent train JOB.yaml [--set KEY=VALUE ...] [--address ADDR] [--dry-run] [--quiet | --jsonl]``.

Output (stdout): a start line, one line per epoch (loss, lr, samples/s, ETA; validation Dice per
dataset when it ran), then the result: per-class validation Dice grouped by dataset, the checkpoint and
the MLflow UI command (:mod:`multitalent.train.progress`). ``--jsonl``: the same as JSON objects, one
per line, the last one ``{"event": "done", ...}``. ``--quiet``: nothing but errors.

Exit status: 0 done; 1 stopped by non-finite losses; 2 a mistake in the job, its paths or its resources
(one ``error:`` line, also from ``--dry-run``, which checks the same things).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from multitalent.jobs import UserError

if TYPE_CHECKING:
    from multitalent.train.job import TrainJob


def run(args: argparse.Namespace) -> int:
    from multitalent.train.job import load_train_job

    job = load_train_job(args.job, args.overrides)
    if args.dry_run:
        return _dry_run(job, args)
    from multitalent.catalog import load_catalog
    from multitalent.train import progress
    from multitalent.train.launch import run_training
    from multitalent.train.loop import NonFiniteLossError

    quiet, jsonl = getattr(args, "quiet", False), getattr(args, "jsonl", False)
    printer = None if quiet else progress.jsonl_printer() if jsonl else progress.text_printer()
    try:
        result = run_training(
            job,
            address=args.address,
            on_progress=printer,
            wait_for_resources=getattr(args, "wait_for_resources", False),
        )
    except (FileNotFoundError, ValueError, UserError) as e:
        raise UserError(f"{args.job}: {e}") from None
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jsonl:
        print(json.dumps(progress.done_record(result)))
    elif not quiet:
        print()
        print(progress.result_text(result, load_catalog(job.catalog)))
    return 0


def _dry_run(job: TrainJob, args: argparse.Namespace) -> int:
    from multitalent.jobs import resolved_yaml
    from multitalent.train.launch import cluster_for_dry_run, dry_run

    print(resolved_yaml(job), end="")
    print("---")
    nodes, which = cluster_for_dry_run(args.address)
    try:
        report = dry_run(job, cluster=nodes)
    except ValueError as e:
        raise UserError(f"{args.job}: {e}") from None
    print(report.text())
    print(f"(resources checked against {which})")
    for error in report.errors:
        print(f"error: {args.job}: {error}", file=sys.stderr)
    return 2 if report.errors else 0
