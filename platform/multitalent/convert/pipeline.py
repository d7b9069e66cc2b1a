"""The conversion job: raw datasets -> plan, per-case Zarr stores, WebDataset shards, manifest.

Passes, each resumable:

1. discover the raw cases of every dataset of the catalog;
2. scan (only for collection-wide normalisation): validate each case and draw a foreground
   intensity sample, cached per case, then compute the statistics and save the plan
   (:meth:`~multitalent.preprocess.Plan.save`, ``plan.json``);
3. convert each case in a Ray task into its Zarr store, skipping stores whose checksum verifies
   and whose inputs and plan are unchanged;
4. pack the WebDataset shards and write ``manifest.json``; failures go to ``report.json``.

Failures never stop other datasets: a dataset that cannot be read at all (missing folder, a
``dataset.json`` declaring labels the catalog lacks, no label files) is one failure with case id
``*``; a bad case is one failure; a case whose task raised unexpectedly is one failure too. When no
valid case remains, ``report.json`` is still written and the summary says so (``summary.error``).

No pass leaves a partial file visible: every file is written to a temporary name and renamed.
The raw collection must exist; ``multitalent convert`` generates the phantom one first when the job
asks for it (``synth:``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multitalent.catalog import Catalog, load_catalog
from multitalent.convert.job import ConvertJob

if TYPE_CHECKING:
    from multitalent.preprocess import Plan


@dataclass
class ConvertSummary:
    """``failures``: ``{dataset_id, case_id ("*" for the whole dataset), file, reason}``;
    ``warnings``: ``{dataset_id, case_id, message}``; ``error``: why nothing was converted, if so."""

    converted: int = 0
    skipped: int = 0
    cases_found: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    shards: int = 0
    out: str = ""  # the output root: a local path (absolute) or a URL
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.error is None

    def report(self) -> dict[str, Any]:
        """What ``report.json`` holds."""
        return {
            "cases_found": self.cases_found,
            "converted": self.converted,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "error": self.error,
            "failures": sorted(self.failures, key=lambda f: (f["dataset_id"], f["case_id"])),
            "warnings": sorted(self.warnings, key=lambda w: (w["dataset_id"], w["case_id"], w["message"])),
        }


@dataclass
class DatasetFound:
    """What discovery found for one dataset: its cases, and problems visible without converting
    (``failures`` with case id ``*`` exclude the whole dataset; others are per case)."""

    dataset_id: str
    layout: str
    root: Path
    cases: list[Any] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not any(f["case_id"] == "*" for f in self.failures)


def _atomic_write_text(path: str, text: str) -> None:
    """Readers see the old file or the new one (a hidden temporary name, then a rename or a publish)."""
    from multitalent import storage

    storage.write_text_atomic(path, text)


def _selected_catalog(job: ConvertJob) -> Catalog:
    catalog = load_catalog(job.catalog)
    return catalog.subset(job.datasets) if job.datasets else catalog


def _failure(dataset_id: str, case_id: str, file: Path | str, reason: str) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "case_id": case_id, "file": str(file), "reason": reason}


def discover(catalog: Catalog, raw_root: Path) -> list[DatasetFound]:
    """The raw cases of every dataset, and what is wrong without reading an image: a missing raw root
    or dataset folder, an unreadable layout (``dataset.json``, ``meta.csv``), no cases, no label
    files at all (whole dataset), a missing label file (one case)."""
    from multitalent.rawio import CaseError, discover_cases
    from multitalent.rawio.layouts import expected_label_path

    found: list[DatasetFound] = []
    for dataset in catalog.datasets:
        root = raw_root / dataset.location
        entry = DatasetFound(dataset.id, dataset.layout, root)
        found.append(entry)
        if not root.is_dir():
            why = f"raw_root {raw_root} does not exist" if not raw_root.is_dir() else "dataset folder missing"
            entry.failures.append(_failure(dataset.id, "*", root, f"{why} (layout {dataset.layout})"))
            continue
        try:
            cases = discover_cases(dataset, root)
        except CaseError as e:
            entry.failures.append(_failure(dataset.id, "*", e.path, e.reason))
            continue
        if not cases:
            why = f"no cases found (layout {dataset.layout})"
            entry.failures.append(_failure(dataset.id, "*", root, why))
            continue
        labels = {c.case_id: c.label_path or expected_label_path(c, dataset) for c in cases}
        missing = [c for c in cases if not labels[c.case_id].exists()]
        if len(missing) == len(cases):
            folder = labels[cases[0].case_id].parent
            entry.failures.append(
                _failure(dataset.id, "*", folder, f"no label files for any of the {len(cases)} cases")
            )
            continue
        entry.failures += [
            _failure(c.dataset_id, c.case_id, labels[c.case_id], f"missing label file for case {c.case_id!r}")
            for c in missing
        ]
        entry.cases = cases
    return found


def _run_tasks(
    ray: Any,
    fn: Callable[..., dict[str, Any]],
    calls: Iterable[tuple[Any, ...]],
    *,
    cpus: float,
    desc: str,
    kwargs: dict[str, Any],
    out: str,
) -> list[dict[str, Any]]:
    """Run ``fn(*call, **kwargs)`` as Ray tasks with a progress bar; results in completion order.

    ``call[0]`` is the case: a task that raised (a bug, not a bad case: those are returned as
    failures) becomes a failure of that case, so it never stops the others. A task that raised because
    the object store of a URL ``out`` failed becomes a ``store_failure`` result and stops the others.
    """
    from tqdm import tqdm

    from multitalent import storage

    remote = ray.remote(fn).options(num_cpus=cpus, max_retries=1)
    case_of = {remote.remote(*call, **kwargs): call[0] for call in calls}
    pending = list(case_of)
    results: list[dict[str, Any]] = []
    with tqdm(total=len(pending), desc=desc, unit="case", file=sys.stderr, disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    results.append(ray.get(ref))
                except Exception as e:  # RayTaskError wrapping the task's exception
                    case = case_of[ref]
                    cause = getattr(e, "cause", None) or e
                    if _store_failed(cause, out):
                        reason = storage.describe_failure(cause)
                        failure = _failure(case.dataset_id, case.case_id, case.image_path, reason)
                        results.append({"status": "store_failure", **failure})
                        continue
                    reason = f"unexpected error ({type(cause).__name__}: {cause}); a bug, please report it"
                    failure = _failure(case.dataset_id, case.case_id, case.image_path, reason)
                    results.append({"status": "failed", **failure})
            bar.update(len(done))
            if any(r["status"] == "store_failure" for r in results):
                # The store is gone: the other tasks would only wait for it too. Finished cases stay.
                for ref in pending:
                    ray.cancel(ref)
                break
    return results


def _store_failed(e: BaseException, out: str) -> bool:
    """Whether a task's exception is the object store of a URL ``out`` failing, a vanished bucket or
    key under ``out`` included (the store came back empty), rather than a bug."""
    from multitalent import storage

    if not storage.is_url(out):
        return False
    bucket = out.split("://", 1)[1].split("/", 1)[0]
    return storage.is_store_failure(e, missing_is_failure=bucket in str(e))


def _make_plan(job: ConvertJob, catalog: Catalog, samples: list[np.ndarray]) -> Plan:
    from multitalent.preprocess import IntensityStats, Normalization, Plan

    norm = job.preprocess.normalization
    if norm.source == "fixed":
        assert norm.clip is not None and norm.mean is not None and norm.std is not None
        normalization = Normalization(clip=(norm.clip[0], norm.clip[1]), mean=norm.mean, std=norm.std)
    else:
        if not samples:
            raise RuntimeError("no valid case to compute the collection's intensity statistics from")
        normalization = Normalization.from_stats(IntensityStats.from_samples(samples))
    plan = Plan.for_catalog(
        catalog,
        normalization=normalization,
        target_spacing_zyx_mm=job.preprocess.target_spacing_zyx_mm,
        fg_locations_per_class=job.preprocess.fg_locations_per_class,
    )
    return dataclasses.replace(plan, anisotropy_threshold=job.preprocess.anisotropy_threshold)


def _package_plan(job: ConvertJob, catalog: Catalog, log: Callable[[str], None]) -> Plan:
    """The plan of the package ``job.plan`` names, made for this job's catalog."""
    from multitalent.registry.store import load_package

    assert job.plan is not None
    package = load_package(job.plan, tracking_uri=job.tracking_uri)
    p = package.plan
    log(f"plan from {package.source}: {p.sha256[:12]} (catalog part replaced by {catalog.name})")
    return dataclasses.replace(
        p, catalog_name=catalog.name, catalog_hash=catalog.hash, classes=tuple(c.key for c in catalog.classes)
    )


def run_conversion(
    job: ConvertJob, *, address: str | None = None, log: Callable[[str], None] = print
) -> ConvertSummary:
    """Convert ``job.raw_root`` (which must exist; see ``convert.cli.generate_missing_raw``) into
    ``job.out``, a local folder or a URL (``s3://bucket/prefix``).

    Raises:
        StorageError: the object store of a URL ``out`` failed mid-run (naming ``out`` and the cause);
            what was finished is kept and a rerun continues from there.
    """
    from multitalent import storage

    try:
        return _run_conversion(job, address=address, log=log)
    except storage.StorageError:
        raise
    except Exception as e:
        if storage.is_url(job.out) and storage.is_store_failure(e):
            raise storage.StorageError(
                job.out, f"the object store failed: {storage.describe_failure(e)}"
            ) from e
        raise


def _run_conversion(job: ConvertJob, *, address: str | None, log: Callable[[str], None]) -> ConvertSummary:
    from multitalent import storage
    from multitalent.raycluster import ray_session
    from multitalent.shards import CaseRecord, remove_temp_entries, write_manifest, write_shards

    catalog = _selected_catalog(job)
    raw_root = Path(job.raw_root)
    out = job.out if storage.is_url(job.out) else str(Path(job.out).resolve())
    cache = storage.join(out, ".work", "samples")
    if not storage.is_url(out):
        Path(cache).mkdir(parents=True, exist_ok=True)
    try:
        # Leftovers of an interrupted run; no writer of ours runs on `out` now.
        remove_temp_entries(out)
        storage.remove_temp_entries([cache])
    except Exception as e:
        if storage.is_store_failure(e):
            raise storage.StorageError(out, storage.describe_failure(e)) from None
        raise
    summary = ConvertSummary(out=out)
    found = discover(catalog, raw_root)
    cases = [c for d in found for c in d.cases]
    summary.failures = [f for d in found for f in d.failures]
    summary.cases_found = sum(len(d.cases) for d in found)
    missing_label = {(f["dataset_id"], f["case_id"]) for f in summary.failures}
    cases = [c for c in cases if (c.dataset_id, c.case_id) not in missing_label]
    log(f"{summary.cases_found} cases in {len(catalog.datasets)} datasets under {raw_root}")
    if not cases:
        return _nothing_valid(summary, "no valid case found in any dataset")
    by_id = {d.id: d for d in catalog.datasets}
    calls = [(c, by_id[c.dataset_id]) for c in cases]
    cpus = job.ray.cpus_per_task

    with ray_session(address=address or job.ray.address, num_cpus=job.ray.num_cpus) as ray:
        valid = cases
        samples: list[np.ndarray] = []
        if job.plan is None and job.preprocess.normalization.source == "collection":
            scanned = _run_tasks(
                ray,
                _scan,
                calls,
                cpus=cpus,
                desc="scan",
                out=out,
                kwargs={
                    "rule": job.preprocess.normalization.rule,
                    "samples": job.preprocess.normalization.samples_per_case,
                    "every_nth": job.preprocess.normalization.every_nth,
                    "cache_dir": str(cache),
                },
            )
            _stop_on_store_failure(scanned, out)
            scanned.sort(key=lambda r: (r["dataset_id"], r["case_id"]))
            bad = {(r["dataset_id"], r["case_id"]) for r in scanned if r["status"] == "failed"}
            summary.failures += [_without_status(r) for r in scanned if r["status"] == "failed"]
            samples = [_load_sample(r["sample"]) for r in scanned if r["status"] == "ok"]
            valid = [c for c in cases if (c.dataset_id, c.case_id) not in bad]
            if not samples:
                return _nothing_valid(
                    summary, "no valid case to compute the collection's intensity statistics from"
                )
        plan = _package_plan(job, catalog, log) if job.plan else _make_plan(job, catalog, samples)
        _save_plan(plan, out)
        n = plan.normalization
        clip = f"[{n.clip[0]:.0f}, {n.clip[1]:.0f}]"
        log(f"plan {plan.sha256[:12]}: clip {clip} HU, mean {n.mean:.2f}, std {n.std:.2f}")

        results = _run_tasks(
            ray,
            _convert,
            [(c, by_id[c.dataset_id]) for c in valid],
            cpus=cpus,
            desc="convert",
            out=out,
            kwargs={"plan": plan, "out": out},
        )
    _stop_on_store_failure(results, out)
    records = []
    for r in results:
        summary.warnings += [
            {"dataset_id": r["dataset_id"], "case_id": r["case_id"], "message": w}
            for w in r.get("warnings", [])
        ]
        if r["status"] == "failed":
            summary.failures.append(_without_status(r))
            continue
        summary.converted += r["status"] == "converted"
        summary.skipped += r["status"] == "skipped"
        records.append(CaseRecord.from_dict(r["record"]))
    records.sort(key=lambda rec: (rec.dataset_id, rec.case_id))
    if not records:
        return _nothing_valid(summary, "every case failed")
    shards = write_shards(
        out,
        records,
        max_cases_per_shard=job.shards.max_cases_per_shard,
        max_shard_bytes=job.shards.max_shard_bytes,
    )
    summary.shards = len(shards)
    write_manifest(out, records, shards, plan_sha256=plan.sha256, catalog_hash=catalog.hash)
    # the folds training validates on and evaluation scores, fixed with the collection
    from multitalent.data.sampling import write_splits

    write_splits(out, [(rec.dataset_id, rec.case_id) for rec in records])
    summary.failures.sort(key=lambda f: (f["dataset_id"], f["case_id"]))
    _atomic_write_text(storage.join(out, "report.json"), json.dumps(summary.report(), indent=1))
    return summary


def _save_plan(plan: Plan, out: str) -> None:
    from multitalent import storage
    from multitalent.preprocess import PLAN_FILE

    if storage.is_url(out):
        storage.write_text_atomic(storage.join(out, PLAN_FILE), plan.to_json())
    else:
        plan.save(Path(out) / PLAN_FILE)


def _load_sample(location: str) -> np.ndarray:
    import io

    from multitalent import storage

    if not storage.is_url(location):
        return np.load(location)
    return np.load(io.BytesIO(storage.read_bytes(location)), allow_pickle=False)


def _stop_on_store_failure(results: list[dict[str, Any]], out: str) -> None:
    """A task that could not talk to the object store stops the conversion (one clear error); cases
    finished so far are kept and a rerun skips them."""
    from multitalent import storage

    failed = [r for r in results if r["status"] == "store_failure"]
    if failed:
        first = failed[0]
        raise storage.StorageError(
            out,
            f"the object store failed while writing {first['dataset_id']}/{first['case_id']} "
            f"({first['reason']}); {len(failed)} case(s) affected. Finished cases are kept: run the "
            "same command again to continue",
        )


def _without_status(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "status"}


def _nothing_valid(summary: ConvertSummary, why: str) -> ConvertSummary:
    """No plan, no manifest: the report says why (every failure listed)."""
    from multitalent import storage

    summary.error = why
    summary.failures.sort(key=lambda f: (f["dataset_id"], f["case_id"]))
    _atomic_write_text(storage.join(summary.out, "report.json"), json.dumps(summary.report(), indent=1))
    return summary


# Ray pickles these by reference; keep them module-level.
def _scan(case: Any, dataset: Any, **kw: Any) -> dict[str, Any]:
    from multitalent.convert.tasks import scan_case

    return scan_case(case, dataset, **kw)


def _convert(case: Any, dataset: Any, **kw: Any) -> dict[str, Any]:
    from multitalent.convert.tasks import convert_case

    return convert_case(case, dataset, **kw)
