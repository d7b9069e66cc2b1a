"""``multitalent convert JOB.yaml [--set KEY=VALUE ...] [--address ADDR] [--dry-run]``.

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

from multitalent import storage
from multitalent.jobs import JobError, load_job, require_absolute_in_submitted_job

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


def check_locations(job: ConvertJob, *, write: bool) -> None:
    """Before any work: ``raw_root`` must be a local folder; a URL ``out`` must be usable (credentials,
    endpoint, bucket, and write permission when ``write``).

    Raises:
        JobError: ``raw_root`` is a URL.
        StorageError: ``"<out>: <cause>"``.
    """
    if storage.is_url(job.raw_root):
        raise JobError(
            f"raw_root {job.raw_root}: the raw collection is read from a local (or shared) folder; "
            "only the converted output (out) may be on object storage"
        )
    storage.preflight(job.out, write=write)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 all converted, 1 some case or dataset failed (or nothing valid remained; the
    summary and ``report.json`` say which), 2 a mistake in the job (``multitalent.cli.main``)."""
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import _selected_catalog, run_conversion

    job = load_job(args.job, ConvertJob, args.overrides)
    require_absolute_in_submitted_job({"raw_root": job.raw_root, "out": job.out}, where=args.job)
    _selected_catalog(job)  # an unknown preset or a bad catalog file fails before anything is written
    check_locations(job, write=not args.dry_run)
    if args.dry_run:
        return dry_run(job)
    generate_missing_raw(job)
    summary = run_conversion(job, address=args.address)
    out = summary.out
    report = storage.join(out, "report.json")
    print(
        f"\n{summary.cases_found} cases found: {summary.converted} converted, {summary.skipped} up to date, "
        f"{len(summary.failures)} failed; {summary.shards} shards; output in {out}"
    )
    for w in summary.warnings:
        print(f"warning: {w['dataset_id']}/{w['case_id']}: {w['message']}")
    for f in summary.failures:
        whole = " (whole dataset)" if f["case_id"] == "*" else ""
        print(f"FAILED {f['dataset_id']}/{f['case_id']}: {f['file']}: {f['reason']}{whole}", file=sys.stderr)
    if summary.error is not None:
        print(f"error: nothing converted: {summary.error}; see {report}", file=sys.stderr)
        return 1
    if summary.failures:
        print(f"some cases failed; see {report}", file=sys.stderr)
        return 1
    return 0


def dry_run(job: ConvertJob) -> int:
    """Print the cases found per dataset and what is wrong without converting (no Ray, no writes).
    Exit 1 when a problem was found, else 0."""
    from multitalent.convert.pipeline import _selected_catalog, discover

    catalog = _selected_catalog(job)
    raw_root = Path(job.raw_root)
    print(f"catalog {catalog.name}: {len(catalog.datasets)} datasets; raw_root {raw_root.resolve()}")
    if not raw_root.exists() and job.synth is not None:
        print(
            f"raw_root does not exist: the run writes the phantom collection there first "
            f"(synth: seed {job.synth.seed}, scale {job.synth.scale}); nothing else to check"
        )
        return 0
    found = discover(catalog, raw_root)
    w = max(len(d.dataset_id) for d in found)
    for d in found:
        state = f"{len(d.cases):5d} cases" if d.usable else "  not usable"
        print(f"  {d.dataset_id:{w}s}  {d.layout:17s} {state}  {d.root}")
    problems = [f for d in found for f in d.failures]
    for f in problems:
        whole = " (whole dataset)" if f["case_id"] == "*" else ""
        print(f"problem: {f['dataset_id']}/{f['case_id']}: {f['file']}: {f['reason']}{whole}")
    total = sum(len(d.cases) for d in found)
    print(
        f"{total} cases found in {sum(d.usable for d in found)} of {len(found)} datasets; "
        f"{len(problems)} problem(s) found without converting (bad image or label files show only "
        "when converting); "
        f"output would go to {job.out if storage.is_url(job.out) else Path(job.out).resolve()}"
    )
    return 1 if problems else 0
