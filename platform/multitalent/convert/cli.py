"""``multitalent convert JOB.yaml``.

The command, not the pipeline, honours the job's ``synth:`` section: when ``raw_root`` does not exist
it writes the phantom collection there first, so ``multitalent convert jobs/convert.yaml`` works on a
fresh clone while :func:`~multitalent.convert.pipeline.run_conversion` only ever converts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from multitalent.jobs import JobError, load_job

if TYPE_CHECKING:
    from multitalent.convert.job import ConvertJob


def generate_missing_raw(job: ConvertJob, *, log: Callable[[str], None] = print) -> bool:
    """Write the phantom collection into ``job.raw_root`` when the job has a ``synth:`` section and
    that folder does not exist. Returns whether it wrote one."""
    raw_root = Path(job.raw_root)
    if job.synth is None or raw_root.exists():
        return False
    from multitalent.synth import write_phantom_collection

    log(f"raw data {raw_root} missing: writing the phantom collection (seed {job.synth.seed})")
    write_phantom_collection(raw_root, seed=job.synth.seed, scale=job.synth.scale)
    return True


def run(args: argparse.Namespace) -> int:
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion

    try:
        job = load_job(args.job, ConvertJob, args.overrides)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generate_missing_raw(job)
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
