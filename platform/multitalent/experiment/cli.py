"""``multitalent experiment JOB.yaml [--set KEY=VALUE ...] [--dry-run | --report-only]``.

Runs (or, with ``--dry-run``, describes and builds without running) the steps of an experiment job
(``jobs/experiment.yaml``); a rerun skips finished steps. ``--report-only`` rewrites the report from
the steps finished so far.
"""

from __future__ import annotations

import argparse
import sys

from multitalent.cli import overrides_arg


def experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="experiment job YAML (see jobs/experiment.yaml)")
    overrides_arg(
        p, help_text="override a job field, dotted path (repeatable), e.g. --set budget.iterations=80"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="list every step with its command and state, dry-run every training job; run nothing",
    )
    mode.add_argument(
        "--report-only", action="store_true", help="write results.md/.json from the steps finished so far"
    )


def run(args: argparse.Namespace) -> int:
    from multitalent.experiment.job import load_experiment_job
    from multitalent.experiment.plan import plan_steps
    from multitalent.experiment.report import write_report
    from multitalent.experiment.runner import ExperimentError, dry_run_plan, run_plan

    plan = plan_steps(load_experiment_job(args.job, args.overrides))
    if args.dry_run:
        lines, errors = dry_run_plan(plan)
        print("\n".join(lines))
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2 if errors else 0
    if args.report_only:
        write_report(plan)
        print(f"report: {plan.layout.results_md}")
        return 0
    try:
        run_plan(plan)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"results: {plan.layout.results_md} ({plan.layout.results_json})")
    return 0
