"""The work done for one case, as plain functions that run inside Ray tasks.

Each returns a small JSON-able dict, never raises for bad input: a ``CaseError`` becomes
``{"status": "failed", "file": ..., "reason": ...}`` so one bad case never stops the others.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multitalent.catalog import DatasetSpec

if TYPE_CHECKING:
    from multitalent.preprocess import Plan


def _failed(case: Any, path: Path | str, reason: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "dataset_id": case.dataset_id,
        "case_id": case.case_id,
        "file": str(path),
        "reason": reason,
    }


def source_digest(case: Any) -> str:
    """sha256 over the raw files of a case (names and bytes), to notice changed inputs."""
    h = hashlib.sha256()
    paths = [case.image_path, case.label_path, *sorted((case.structure_paths or {}).values())]
    for p in paths:
        if p is None or not Path(p).is_file():
            continue
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            hashlib.file_digest(f, lambda: h)  # feeds the file into the running hash
    return h.hexdigest()


def case_plan_sha256(plan: Plan, dataset: DatasetSpec) -> str:
    """What decides a converted case's bytes besides its raw files: the plan without its catalog part,
    and the case's own dataset (its labels and classes).

    Independent of the other datasets of the catalog, so appending datasets to a catalog reconverts
    only the new ones (``plan.sha256`` covers the whole catalog and is kept for the collection).
    """
    import json

    spec = dataset.to_dict()
    data = {
        "plan": {k: v for k, v in plan.to_dict().items() if k != "catalog"},
        "dataset": {"id": spec["id"], "labels": spec["labels"], "classes": spec["classes"]},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def scan_case(
    case: Any,
    dataset: DatasetSpec,
    *,
    cache_dir: str,
    rule: str = "every_nth",
    samples: int = 10_000,
    every_nth: int = 10,
) -> dict[str, Any]:
    """Validate a case and take its foreground intensity sample (cached on disk for reruns).

    ``rule``: ``every_nth`` (nnU-Net v1: every ``every_nth``-th foreground voxel) or ``draws``
    (``samples`` random draws).
    """
    from multitalent import storage
    from multitalent.preprocess import foreground_intensity_sample
    from multitalent.preprocess.stats import foreground_intensity_every_nth
    from multitalent.rawio import CaseError, load_case

    key = f"{case.dataset_id}__{case.case_id}"
    digest = source_digest(case)
    what = f"every{every_nth}" if rule == "every_nth" else f"draws{samples}"
    cached = storage.join(cache_dir, f"{key}.{what}.{digest[:16]}.npy")
    if storage.is_file(cached):
        return {"status": "ok", "dataset_id": case.dataset_id, "case_id": case.case_id, "sample": cached}
    try:
        loaded = load_case(case, dataset)
    except CaseError as e:
        return _failed(case, e.path, e.reason)
    if rule == "every_nth":
        sample = foreground_intensity_every_nth(loaded.image, loaded.label, step=every_nth).astype(np.float32)
    else:
        sample = foreground_intensity_sample(loaded.image, loaded.label, n=samples, seed=key)
    if storage.is_url(cached):
        buf = io.BytesIO()
        np.save(buf, sample)
        storage.write_bytes_atomic(cached, buf.getvalue())
    else:
        path = Path(cached)
        tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}.npy")
        np.save(tmp, sample)
        tmp.replace(path)
    return {
        "status": "ok",
        "dataset_id": case.dataset_id,
        "case_id": case.case_id,
        "sample": cached,
        "warnings": list(loaded.warnings),
    }


def convert_case(case: Any, dataset: DatasetSpec, *, plan: Plan, out: str) -> dict[str, Any]:
    """Preprocess one case into its Zarr store, unless a verified store of the same inputs exists.

    ``out`` is a local folder or a URL; an object-store error propagates (the pipeline stops on it).

    The store is stamped with :func:`case_plan_sha256` (and, for information, the ``plan.sha256`` it
    was converted under); a store with another ``case_plan_sha256`` is converted again.
    """
    from multitalent import storage
    from multitalent.preprocess import preprocess_case
    from multitalent.rawio import CaseError, load_case
    from multitalent.shards import verify_case_zarr, write_case_zarr, zarr_case_location

    out_root = out if storage.is_url(out) else Path(out)
    plan_sha256 = plan.sha256
    identity = case_plan_sha256(plan, dataset)
    digest = source_digest(case)
    store = zarr_case_location(out_root, case.dataset_id, case.case_id)
    if storage.exists(store):
        record = verify_case_zarr(store)
        if (
            record is not None
            and record.meta.get("source_sha256") == digest
            and record.meta.get("case_plan_sha256") == identity
        ):
            return {
                "status": "skipped",
                "dataset_id": case.dataset_id,
                "case_id": case.case_id,
                "record": record.to_dict(),
            }
    try:
        loaded = load_case(case, dataset)
    except CaseError as e:
        return _failed(case, e.path, e.reason)
    key = f"{case.dataset_id}/{case.case_id}"
    pre = preprocess_case(loaded.image, loaded.label, loaded.affine, plan=plan, dataset=dataset, seed_key=key)
    record = write_case_zarr(
        out_root,
        pre,
        dataset_id=case.dataset_id,
        case_id=case.case_id,
        extra_attrs={"source_sha256": digest, "plan_sha256": plan_sha256, "case_plan_sha256": identity},
    )
    return {
        "status": "converted",
        "dataset_id": case.dataset_id,
        "case_id": case.case_id,
        "record": record.to_dict(),
        "warnings": list(loaded.warnings),
    }
