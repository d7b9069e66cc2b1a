"""``<out_root>/manifest.json``: the cases and shards of a converted collection.

The content is a pure function of the inputs (sorted, no timestamps, no failures), so a run that
was interrupted and resumed writes exactly the manifest of an uninterrupted run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitalent import storage
from multitalent.shards._common import FORMAT_VERSION, ShardError, canonical, write_bytes_atomic
from multitalent.shards.wds_shards import ShardInfo
from multitalent.shards.zarr_store import CaseRecord

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest. ``cases`` sorted by (dataset_id, case_id); ``shard_of`` maps a sample key
    ``<dataset_id>__<case_id>`` to its shard name (absent when no shards were written)."""

    format_version: int
    plan_sha256: str
    catalog_hash: str
    cases: tuple[CaseRecord, ...]
    shards: tuple[ShardInfo, ...]
    shard_of: Mapping[str, str]

    def datasets(self) -> dict[str, int]:
        """Number of cases per dataset id."""
        return dict(sorted(Counter(c.dataset_id for c in self.cases).items()))


def _failed_keys(failures: Iterable[Any]) -> set[str]:
    keys = set()
    for f in failures:
        ds = f.get("dataset_id") if isinstance(f, Mapping) else getattr(f, "dataset_id", None)
        case = f.get("case_id") if isinstance(f, Mapping) else getattr(f, "case_id", None)
        if ds is not None and case is not None:
            keys.add(f"{ds}__{case}")
    return keys


def manifest_dict(
    records: Sequence[CaseRecord], shards: Sequence[ShardInfo], *, plan_sha256: str, catalog_hash: str
) -> dict[str, Any]:
    """The manifest content (see :func:`write_manifest`)."""
    by_key = {r.key: r for r in records}
    if len(by_key) != len(records):
        dupes = sorted(k for k, n in Counter(r.key for r in records).items() if n > 1)
        raise ValueError(f"duplicate cases in records: {dupes[:5]}")
    shard_of: dict[str, str] = {}
    for s in shards:
        for k in s.keys:
            if k in shard_of:
                raise ValueError(f"case {k} is in shards {shard_of[k]} and {s.name}")
            if k not in by_key:
                raise ValueError(f"shard {s.name} holds case {k}, which is not among the records")
            shard_of[k] = s.name
    if shards and len(shard_of) != len(by_key):
        missing = sorted(set(by_key) - set(shard_of))
        raise ValueError(f"{len(missing)} records are in no shard, e.g. {missing[:5]}")
    cases = []
    for r in sorted(records, key=lambda r: (r.dataset_id, r.case_id)):
        cases.append({**r.to_dict(), "shard": shard_of.get(r.key)})
    return canonical(
        {
            "format_version": FORMAT_VERSION,
            "plan_sha256": plan_sha256,
            "catalog_hash": catalog_hash,
            "n_cases": len(cases),
            "datasets": dict(sorted(Counter(r.dataset_id for r in records).items())),
            "cases": cases,
            "shards": [
                {
                    "name": s.name,
                    "path": s.path,
                    "n_cases": s.n_cases,
                    "nbytes": s.nbytes,
                    "sha256": s.sha256,
                    "keys": list(s.keys),
                }
                for s in sorted(shards, key=lambda s: s.name)
            ],
        }
    )


def write_manifest(
    out_root: str | Path,
    records: Sequence[CaseRecord],
    shards: Sequence[ShardInfo],
    *,
    plan_sha256: str,
    catalog_hash: str,
    failures: Iterable[Any] = (),
) -> Path | str:
    """Write ``<out_root>/manifest.json`` atomically and return its path (a URL for a URL root).

    Every case appears once with dataset id, case id, zarr path, shard, sha256, shape, classes,
    nbytes and its extra attributes (``meta``); shards with name, size, sha256 and sample keys in
    tar order. ``failures`` (dicts or objects with ``dataset_id``/``case_id``) are *not* written
    (the converter reports them separately); they are only checked not to overlap ``records``.

    Raises:
        ValueError: duplicate records, a record in no shard or in two, a failed case among records.
    """
    clash = sorted(_failed_keys(failures) & {r.key for r in records})
    if clash:
        raise ValueError(f"cases both converted and failed: {clash[:5]}")
    content = manifest_dict(records, shards, plan_sha256=plan_sha256, catalog_hash=catalog_hash)
    data = (json.dumps(content, indent=1, sort_keys=True) + "\n").encode("ascii")
    if storage.is_url(out_root):
        url = storage.join(out_root, MANIFEST_NAME)
        write_bytes_atomic(url, data)
        return url
    path = Path(out_root) / MANIFEST_NAME
    write_bytes_atomic(path, data)
    return path


def load_manifest(path: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Load ``manifest.json`` from a file, an output root, or an fsspec URL of either.

    Raises:
        ShardError: missing file, invalid JSON, missing fields or an unknown format version.
    """
    where = str(path)
    if not where.endswith(".json"):
        where = f"{where.rstrip('/')}/{MANIFEST_NAME}"
    try:
        if "://" in where:
            import fsspec

            with fsspec.open(where, "rt", **dict(storage_options or {})) as f:
                data = json.load(f)
        else:
            data = json.loads(Path(where).read_text())
    except FileNotFoundError:
        raise ShardError(where, "manifest not found") from None
    except json.JSONDecodeError as e:
        raise ShardError(where, f"not valid JSON ({e})") from None
    try:
        if data["format_version"] != FORMAT_VERSION:
            raise ShardError(
                where, f"format_version {data['format_version']} is not the supported {FORMAT_VERSION}"
            )
        cases = tuple(CaseRecord.from_dict(c) for c in data["cases"])
        shard_of = {f"{c['dataset_id']}__{c['case_id']}": c["shard"] for c in data["cases"] if c.get("shard")}
        shards = tuple(
            ShardInfo(name=s["name"], keys=tuple(s["keys"]), nbytes=int(s["nbytes"]), sha256=str(s["sha256"]))
            for s in data["shards"]
        )
        return Manifest(
            format_version=int(data["format_version"]),
            plan_sha256=str(data["plan_sha256"]),
            catalog_hash=str(data["catalog_hash"]),
            cases=cases,
            shards=shards,
            shard_of=shard_of,
        )
    except ShardError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(where, f"malformed manifest ({type(e).__name__}: {e})") from None
