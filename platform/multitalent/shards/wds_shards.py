"""WebDataset tar shards of whole cases: deterministic packing (reading: :mod:`.wds_reader`).

Each sample ``<dataset_id>__<case_id>`` has members ``image.npy.zst`` (int16 (z, y, x)),
``label.npy.zst`` (uint8 (z, y, x)), ``fg_locations.npy.zst`` (int32 (N, 4)) and ``meta.json`` (the
case attributes). ``.npy.zst`` is a standard ``.npy`` file compressed as one zstd frame
(``zstd -d`` gives the ``.npy`` back); with ``zstd_level=None`` members are plain ``.npy``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from multitalent import storage
from multitalent.shards._common import (
    ShardError,
    canonical_json,
)
from multitalent.shards.digest import case_digest, file_sha256
from multitalent.shards.zarr_store import CaseRecord, open_case_zarr

DEFAULT_ZSTD_LEVEL = 3
SHARD_PATTERN = "shard-{:06d}.tar"
_ARRAYS = ("fg_locations", "image", "label")
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_TAR_FORMAT: Literal[2] = tarfile.PAX_FORMAT


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: ``name`` (``shard-000000.tar``, under ``<out_root>/wds/``), its cases' keys
    in tar order, size in bytes and sha256 of the file."""

    name: str
    keys: tuple[str, ...]
    nbytes: int
    sha256: str

    @property
    def path(self) -> str:
        """Relative to the output root."""
        return f"wds/{self.name}"

    @property
    def n_cases(self) -> int:
        return len(self.keys)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    np.lib.format.write_array(buf, little, allow_pickle=False)
    return buf.getvalue()


def _case_members(out_root: str | Path, rec: CaseRecord, zstd_level: int | None) -> list[tuple[str, bytes]]:
    """The tar members of one case, read back from its Zarr store and checked against ``rec.sha256``."""
    from numcodecs import Zstd

    path = storage.join(out_root, rec.zarr_path)
    zc = open_case_zarr(path)
    arrays = {
        "image": np.asarray(zc.image[...]),
        "label": np.asarray(zc.label[...]),
        "fg_locations": zc.fg_locations,
    }
    digest = case_digest(
        image=arrays["image"], label=arrays["label"], fg_locations=arrays["fg_locations"], attrs=zc.meta
    )
    if digest != rec.sha256 or zc.meta.get("sha256") != rec.sha256:
        raise ShardError(
            path, f"content digest {digest[:12]}… differs from the record's sha256 {rec.sha256[:12]}…"
        )
    codec = None if zstd_level is None else Zstd(level=zstd_level)
    members = []
    for name in _ARRAYS:
        data = _npy_bytes(arrays[name])
        if codec is None:
            members.append((f"{rec.key}.{name}.npy", data))
        else:
            members.append((f"{rec.key}.{name}.npy.zst", bytes(codec.encode(data))))
    members.append((f"{rec.key}.meta.json", canonical_json(zc.meta).encode("ascii")))
    return sorted(members)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the bytes depend on content only.
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _member_bytes(name: str, size: int) -> int:
    header = len(_tarinfo(name, size).tobuf(_TAR_FORMAT, "utf-8", "surrogateescape"))
    return header + -(-size // _BLOCK) * _BLOCK


def _file_bytes(content_bytes: int) -> int:
    """Size of a closed tar: content, two zero blocks, padded to a whole record."""
    return -(-(content_bytes + 2 * _BLOCK) // _RECORD) * _RECORD


def _order(records: Sequence[CaseRecord], order: str) -> list[CaseRecord]:
    if order == "sorted":
        return sorted(records, key=lambda r: (r.dataset_id, r.case_id))
    if order == "hashed":
        # A fixed pseudo-random order: every shard mixes datasets, independent of input order.
        return sorted(records, key=lambda r: hashlib.sha256(r.key.encode()).hexdigest())
    raise ValueError(f"order must be 'hashed' or 'sorted', got {order!r}")


class _HashingSink:
    """A write-only file object that hashes and counts what passes through to ``target``."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        self.target.write(data)
        return len(data)

    def tell(self) -> int:
        return self.nbytes


class _ShardWriter:
    """One shard being written under a hidden name: a local file, or an object streamed to a hidden
    key of the store (multipart upload, no local copy) when ``wds_dir`` is a URL."""

    def __init__(self, wds_dir: Path | str, index: int) -> None:
        name = SHARD_PATTERN.format(index)
        self.remote = storage.is_url(wds_dir)
        self.final = storage.join(wds_dir, name)
        self.tmp = storage.join(wds_dir, storage.temp_name(name))
        self.sink: _HashingSink | None = None
        if self.remote:
            self.fs, tmp_path = storage.filesystem(self.tmp)
            self.file: Any = self.fs.open(tmp_path, "wb")
            self.sink = _HashingSink(self.file)
            fileobj: Any = self.sink
        else:
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close()/discard())
            fileobj = self.file
        self.tar = tarfile.TarFile(fileobj=fileobj, mode="w", format=_TAR_FORMAT, encoding="utf-8")
        self.keys: list[str] = []
        self.content_bytes = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self.tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            self.content_bytes += _member_bytes(name, len(data))
        self.keys.append(key)

    def close(self) -> ShardInfo:
        self.tar.close()
        if self.sink is not None:
            self.file.close()  # completes the upload: the hidden object becomes readable
            size, digest = self.sink.nbytes, self.sink.sha256.hexdigest()
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            size, digest = Path(self.tmp).stat().st_size, file_sha256(self.tmp)
        if size != _file_bytes(self.content_bytes):  # our size model decides the packing; keep it honest
            raise RuntimeError(f"{self.tmp}: tar is {size} bytes, expected {_file_bytes(self.content_bytes)}")
        return ShardInfo(name=storage.name_of(self.final), keys=tuple(self.keys), nbytes=size, sha256=digest)

    def discard(self) -> None:
        try:
            if self.remote:
                self.file.discard()  # aborts the multipart upload
                self.file.closed = True  # so that garbage collection commits nothing
            else:
                self.file.close()
        finally:
            storage.remove_tree(self.tmp)

    def publish(self) -> None:
        """Make the finished shard visible under its final name."""
        if self.remote:
            _, final = storage.filesystem(self.final)
            _, tmp = storage.filesystem(self.tmp)
            self.fs.copy(tmp, final)
            self.fs.rm(tmp)
        else:
            Path(self.tmp).replace(self.final)


def write_shards(
    out_root: str | Path,
    records: Sequence[CaseRecord],
    *,
    max_cases_per_shard: int | None,
    max_shard_bytes: int | None,
    zstd_level: int | None = DEFAULT_ZSTD_LEVEL,
    order: Literal["hashed", "sorted"] = "hashed",
) -> list[ShardInfo]:
    """Pack the cases of ``records`` (read back from their Zarr stores) into ``<out_root>/wds/``.

    Shards are filled greedily up to ``max_cases_per_shard`` cases and ``max_shard_bytes`` bytes of
    tar file (``None``: no limit); a single case larger than ``max_shard_bytes`` gets a shard of
    its own. Output is byte-identical across runs: fixed member metadata, a fixed case order
    (``hashed``: sha256 of the key, mixing datasets in every shard; ``sorted``: by dataset, case),
    members sorted within a case. All shards are written to hidden temporary files first and
    renamed at the end; shard files of an earlier run beyond the new count are removed. For a URL
    ``out_root`` each shard streams to a hidden object (no local copy) and is published at the end by
    a copy to its final key.

    Raises:
        ValueError: duplicate keys or non-positive limits.
        ShardError: a store is missing/corrupt or no longer matches its record's sha256.
    """
    for limit, what in ((max_cases_per_shard, "max_cases_per_shard"), (max_shard_bytes, "max_shard_bytes")):
        if limit is not None and limit <= 0:
            raise ValueError(f"{what} must be positive or None, got {limit}")
    dupes = sorted(k for k, n in Counter(r.key for r in records).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate cases in records: {dupes[:5]}")
    wds_dir: Path | str
    if storage.is_url(out_root):
        wds_dir = storage.join(out_root, "wds")
    else:
        out_root = Path(out_root)
        wds_dir = out_root / "wds"
        wds_dir.mkdir(parents=True, exist_ok=True)

    writers: list[_ShardWriter] = []
    infos: list[ShardInfo] = []
    try:
        current: _ShardWriter | None = None
        for rec in _order(records, order):
            members = _case_members(out_root, rec, zstd_level)
            case_bytes = sum(_member_bytes(n, len(d)) for n, d in members)
            if current is not None and (
                (max_cases_per_shard is not None and len(current.keys) >= max_cases_per_shard)
                or (
                    max_shard_bytes is not None
                    and _file_bytes(current.content_bytes + case_bytes) > max_shard_bytes
                )
            ):
                infos.append(current.close())
                current = None
            if current is None:
                current = _ShardWriter(wds_dir, len(writers))
                writers.append(current)
            current.add(rec.key, members)
        if current is not None:
            infos.append(current.close())
    except BaseException:
        for w in writers:
            w.discard()
        raise
    for w in writers:
        w.publish()
    keep = {i.name for i in infos}
    for name in storage.list_names(wds_dir):
        if name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            storage.remove_tree(storage.join(wds_dir, name))
    return infos
