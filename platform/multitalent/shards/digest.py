"""Digests: a case's content (independent of chunking, compression and write time) and a file's bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from os import PathLike
from typing import Any, Protocol

import numpy as np

from multitalent.shards._common import canonical_json

DIGEST_SCHEME = "multitalent-case-digest/1"
# Attributes left out of the digest: the digest itself.
DIGEST_EXCLUDED_ATTRS = frozenset({"sha256"})
_SLAB_BYTES = 16 << 20


class ArrayLike(Protocol):
    """numpy arrays and zarr arrays both qualify: ``shape``, ``dtype`` and basic slicing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


def _slab_rows(arr: ArrayLike) -> int:
    """Rows of axis 0 per read: about 16 MiB, a multiple of the chunk height for zarr arrays."""
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize)
    rows = max(1, _SLAB_BYTES // row_bytes)
    chunk_rows = getattr(arr, "chunks", None)
    if chunk_rows:
        step = int(chunk_rows[0])
        rows = max(step, rows // step * step)
    return rows


def case_digest(
    *, image: ArrayLike, label: ArrayLike, fg_locations: ArrayLike, attrs: Mapping[str, Any]
) -> str:
    """sha256 (hex) of a case's canonical content.

    Hashes, in order: a JSON header (sorted keys) with the scheme, each array's little-endian dtype
    and shape, and ``attrs`` minus ``sha256``; then the C-order little-endian bytes of ``image``
    (z, y, x), ``label`` (z, y, x) and ``fg_locations`` (N, 4). Arrays may be numpy or zarr arrays;
    zarr arrays are read in z-slabs so memory stays bounded. The result does not depend on chunk
    shapes, codecs or when the store was written.
    """
    arrays = {"image": image, "label": label, "fg_locations": fg_locations}
    header = {
        "scheme": DIGEST_SCHEME,
        "arrays": [
            {"name": name, "dtype": np.dtype(a.dtype).newbyteorder("<").str, "shape": list(a.shape)}
            for name, a in arrays.items()
        ],
        "attrs": {k: v for k, v in attrs.items() if k not in DIGEST_EXCLUDED_ATTRS},
    }
    h = hashlib.sha256(canonical_json(header).encode("ascii"))
    h.update(b"\0")
    for a in arrays.values():
        little = np.dtype(a.dtype).newbyteorder("<")
        if not a.shape or a.shape[0] == 0:
            continue
        rows = _slab_rows(a)
        for start in range(0, a.shape[0], rows):
            slab = np.ascontiguousarray(np.asarray(a[start : start + rows]), dtype=little)
            h.update(slab.data)
    return h.hexdigest()


def file_sha256(path: str | PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, read in blocks so memory stays bounded."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
