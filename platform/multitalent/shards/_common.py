"""Shared helpers of the shard writers: id checks, canonical JSON, atomic renames."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"

# Ids become directory names and WebDataset keys; WebDataset splits a key at the first dot of the
# member's basename, so dots (and path separators) are not allowed.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class ShardError(Exception):
    """A store, shard or manifest is missing, incomplete or corrupt. ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def check_id(value: str, *, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid id: use letters, digits, '_' and '-' "
            "(no dots, no slashes, not starting with '_' or '-')"
        )
    return value


def sample_key(dataset_id: str, case_id: str) -> str:
    return f"{dataset_id}__{case_id}"


def _jsonable(value: Any) -> Any:
    """Plain JSON types; numpy scalars/arrays and tuples become what ``json`` gives back on load."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"attribute keys must be strings, got {k!r}")
            out[k] = _jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"attribute value {f} is not finite (not representable in JSON)")
        return f
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} is not JSON-able")


def canonical(value: Any) -> Any:
    """``value`` as it reads back after a JSON round trip (tuples -> lists, numpy -> Python)."""
    return _jsonable(value)


def canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, ASCII only."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def temp_sibling(final: Path) -> Path:
    """A unique, hidden name next to ``final`` (same file system, so a rename is atomic)."""
    return final.with_name(f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an existing one.

    POSIX cannot rename a directory onto a non-empty one, so an old ``final`` is first renamed
    away to a hidden sibling and deleted afterwards. Readers see the old store, then briefly no
    store, then the new one; never a half-written one.
    """
    if final.exists():
        old = temp_sibling(final)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a hidden sibling, fsync it, then rename it over ``path``; for a URL, write
    a hidden temporary object and publish it (:func:`multitalent.storage.write_bytes_atomic`)."""
    from multitalent import storage

    if storage.is_url(path):
        storage.write_bytes_atomic(path, data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temp_entries(out_root: str | Path) -> list[Path] | list[str]:
    """Delete leftovers (``.tmp-*``) of interrupted writers in a collection: in ``out_root``,
    ``out_root/wds`` and every ``out_root/zarr/<dataset_id>``. Returns what was removed (paths, or
    URLs for a URL root).

    ``out_root`` may be a URL (``s3://bucket/collection``). Call only when no writer is running on
    ``out_root`` (e.g. at the start of a conversion).
    """
    from multitalent import storage

    if storage.is_url(out_root):
        root = str(out_root)
        zarr_root = storage.join(root, "zarr")
        datasets = [storage.join(zarr_root, d) for d in storage.list_names(zarr_root)]
        return storage.remove_temp_entries([root, storage.join(root, "wds"), *datasets])
    out_root = Path(out_root)
    folders = [out_root, out_root / "wds"]
    if (out_root / "zarr").is_dir():
        folders += sorted(p for p in (out_root / "zarr").iterdir() if p.is_dir())
    removed: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed
