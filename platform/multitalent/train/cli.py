"""``multitalent train JOB.yaml [--set KEY=VALUE ...] [--address ADDR] [--dry-run]``."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from multitalent.jobs import JobError, resolved_yaml
    from multitalent.train.job import load_train_job

    try:
        job = load_train_job(args.job, args.overrides)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from multitalent.train.launch import dry_run

        print(resolved_yaml(job), end="")
        print("---")
        try:
            report = dry_run(job)
        except ValueError as e:
            print(f"error: {args.job}: {e}", file=sys.stderr)
            return 2
        print(report.text())
        return 0
    from multitalent.train.launch import run_training
    from multitalent.train.loop import NonFiniteLossError

    try:
        result = run_training(job, address=args.address)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {args.job}: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"done: {result.iterations} iterations ({result.optimizer_steps} optimizer steps, "
        f"{result.skipped_nonfinite} skipped as non-finite)\n"
        f"checkpoint: {result.checkpoint}\n"
        f"mlflow: {result.tracking_uri} run {result.mlflow_run_id}\n"
        f"  mlflow ui --backend-store-uri {result.tracking_uri}"
    )
    return 0
