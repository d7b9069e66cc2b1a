"""``multitalent convert JOB.yaml``."""

from __future__ import annotations

import argparse
import sys

from multitalent.jobs import JobError, load_job


def run(args: argparse.Namespace) -> int:
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion

    try:
        job = load_job(args.job, ConvertJob, args.overrides)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_conversion(job, address=args.address)
    print(
        f"\n{summary.converted} converted, {summary.skipped} up to date, {len(summary.failures)} failed; "
        f"{summary.shards} shards; output in {summary.out}"
    )
    for w in summary.warnings:
        print(f"warning: {w}")
    for f in summary.failures:
        print(f"FAILED {f['dataset_id']}/{f['case_id']}: {f['file']}: {f['reason']}", file=sys.stderr)
    if summary.failures:
        print(f"some cases failed; see {summary.out / 'report.json'}", file=sys.stderr)
        return 1
    return 0
