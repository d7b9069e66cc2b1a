"""Reading WebDataset tar shards (written by :mod:`.wds_shards`): listing, opening, iterating, decoding.

Shards are read as plain sequential streams from local paths, ``file://``, ``http(s)://`` (streamed,
no range requests, so any static server works), any fsspec URL such as ``s3://``, and ``pipe:``
commands (webdataset's opener). Every fsspec open goes through one function, so the training sources
and webdataset's own pipeline (:func:`enable_fsspec_urls`) open a URL the same way.

Which cases a reader takes from which shard, and how patches are drawn, is the data loader's business
(:mod:`multitalent.data.sources`); this module only yields whole samples.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np

from multitalent.shards._common import TMP_PREFIX, ShardError
from multitalent.shards.digest import case_digest
from multitalent.shards.zarr_store import ARRAY_DTYPES


# ----------------------------------------------------------------------------- listing
def shard_urls(out_root: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The shard files under ``<out_root>/wds/`` in order, as paths or URLs for ``webdataset``.

    ``out_root`` may be an fsspec URL (``s3://bucket/collection``); the shards are then listed
    through fsspec (register the scheme for webdataset with :func:`enable_fsspec_urls`).
    """
    root = str(out_root)
    if "://" not in root:
        return [str(p) for p in sorted((Path(root) / "wds").glob("shard-*.tar"))]
    import fsspec

    fs, base = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    paths = sorted(
        p for p in fs.glob(f"{base.rstrip('/')}/wds/shard-*.tar") if not Path(p).name.startswith(TMP_PREFIX)
    )
    return [fs.unstrip_protocol(p) for p in paths]


def expand_shard_urls(urls: str | Path | Iterable[str]) -> list[str]:
    """A list of URLs; a single string may be a brace pattern (``shard-{000000..000009}.tar``)."""
    if isinstance(urls, str | Path):
        import braceexpand

        return list(braceexpand.braceexpand(str(urls)))
    return [str(u) for u in urls]


# ----------------------------------------------------------------------------- opening
def _fsspec_open(url: str, storage_options: Mapping[str, Any] | None, *, mode: str = "rb") -> Any:
    """The one fsspec opener: an open file object of ``url`` (HTTP streamed, no Range requests)."""
    import fsspec

    options = dict(storage_options or {})
    if urlparse(url).scheme in ("http", "https"):
        options.setdefault("block_size", 0)  # streaming; no Range support needed
    return fsspec.open(url, mode, **options).open()


def open_shard(url: str, *, storage_options: Mapping[str, Any] | None = None) -> BinaryIO:
    """A binary, sequentially readable stream of a shard.

    Local paths and ``file://`` open directly; ``pipe:`` goes through webdataset's ``gopen``; anything
    else through fsspec.

    Raises:
        ShardError: naming ``url``, when it cannot be opened.
    """
    scheme = urlparse(url).scheme
    try:
        if scheme in ("", "file") or (len(scheme) == 1 and Path(url).exists()):  # windows drive letters
            path = urlparse(url).path if scheme == "file" else url
            return open(path, "rb")
        stream: BinaryIO
        if scheme == "pipe":
            import webdataset

            stream = webdataset.gopen(url, "rb")
        else:
            stream = _fsspec_open(url, storage_options)
        return stream
    except Exception as e:
        raise ShardError(url, f"cannot open shard ({type(e).__name__}: {e})") from e


READ_RETRIES = 5  # reopenings of a remote shard whose read failed mid-way
RETRY_BACKOFF_S = 1.0  # waits 1, 2, 4, 8, 16 s between them (plus the client's own retries)


def iter_shard_samples(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = READ_RETRIES,
    backoff_s: float = RETRY_BACKOFF_S,
) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples (``__key__`` plus member bytes) of one tar shard, in file order.

    Decode the ones you keep with :func:`decode_wds_sample`. A shard on object storage (a URL other than
    ``file://`` and ``pipe:``) whose open or read fails because of the store (network, timeouts, the
    store's errors) is reopened after ``backoff_s``, ``2 * backoff_s``, ... and read on after the
    samples already yielded, up to ``retries`` times: the samples come out exactly once, in order.

    Raises:
        ShardError: naming ``url``, when the shard cannot be opened or is not a readable tar, or the
            store still fails after ``retries`` reopenings (the message says so).
    """
    import time

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from multitalent import storage

    retryable = urlparse(url).scheme not in ("", "file", "pipe") and not Path(url).exists()
    yielded = 0
    attempt = 0
    opened = False
    while True:
        stream: BinaryIO | None = None
        seen = 0
        try:
            stream = open_shard(url, storage_options=storage_options)
            opened = True
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                seen += 1
                if seen <= yielded:
                    continue  # read again after a reopening; already given out
                yielded += 1
                yield sample
            return
        except Exception as e:
            # a shard that opened and then is "not found" is the store failing (restarted empty, say)
            store_failure = storage.is_store_failure(e, missing_is_failure=opened)
            if retryable and attempt < retries and store_failure:
                attempt += 1
                time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            if retryable and attempt and store_failure:
                raise ShardError(
                    url,
                    f"the object store failed {attempt + 1} times in a row, last after {yielded} sample(s) "
                    f"({storage.describe_failure(e)})",
                ) from e
            if isinstance(e, ShardError):
                raise
            raise ShardError(url, f"unreadable shard ({type(e).__name__}: {e})") from e
        finally:
            if stream is not None:
                stream.close()


# ----------------------------------------------------------------------------- decoding
@dataclass
class CaseArrays:
    """A decoded sample: ``image`` int16 (z, y, x), ``label`` uint8 (z, y, x), ``fg_locations`` int32
    (N, 4) rows [local_class, z, y, x], ``meta`` the case attributes (see data_shards/README.md)."""

    key: str
    image: np.ndarray
    label: np.ndarray
    fg_locations: np.ndarray
    meta: dict[str, Any]


def _payload(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected raw bytes, got {type(value).__name__}")


def _decode_array(sample: Mapping[str, Any], name: str, where: str) -> np.ndarray:
    if f"{name}.npy.zst" in sample:
        from numcodecs import Zstd

        raw = bytes(Zstd().decode(_payload(sample[f"{name}.npy.zst"])))
        return np.load(io.BytesIO(raw), allow_pickle=False)
    if f"{name}.npy" in sample:
        value = sample[f"{name}.npy"]
        if isinstance(value, np.ndarray):  # already decoded by a webdataset .decode() stage
            return value
        return np.load(io.BytesIO(_payload(value)), allow_pickle=False)
    raise ShardError(where, f"sample has no {name}.npy.zst or {name}.npy member")


def decode_wds_sample(sample: Mapping[str, Any], *, verify: bool = False) -> CaseArrays:
    """Decode one raw WebDataset sample (a dict of member extension -> bytes) into arrays.

    Use as ``webdataset.WebDataset(urls, shardshuffle=...).map(decode_wds_sample)``; a preceding
    ``.decode()`` stage is tolerated (decoded ``.npy``/``.json`` values are accepted).
    ``verify=True`` recomputes the content digest and compares it with ``meta["sha256"]``.

    Raises:
        ShardError: a member is missing, or dtypes/shapes/keys disagree with ``meta.json``.
    """
    key = str(sample.get("__key__", ""))
    where = f"{sample.get('__url__', '<sample>')}:{key}"
    try:
        image, label, fg = (_decode_array(sample, n, where) for n in ("image", "label", "fg_locations"))
        meta_raw = sample["meta.json"]
        meta = dict(meta_raw) if isinstance(meta_raw, Mapping) else json.loads(_payload(meta_raw))
    except ShardError:
        raise
    except KeyError as e:
        raise ShardError(where, f"sample has no {e.args[0]} member") from None
    except Exception as e:
        raise ShardError(where, f"cannot decode sample ({type(e).__name__}: {e})") from e
    for name, arr in (("image", image), ("label", label), ("fg_locations", fg)):
        if arr.dtype != ARRAY_DTYPES[name]:
            raise ShardError(where, f"{name} has dtype {arr.dtype}, expected {ARRAY_DTYPES[name]}")
    shape = tuple(meta.get("shape_zyx", ()))
    if image.shape != shape or label.shape != shape or fg.ndim != 2 or fg.shape[1] != 4:
        raise ShardError(
            where, f"shapes image {image.shape}, label {label.shape}, fg {fg.shape} vs shape_zyx {shape}"
        )
    meta_key = f"{meta.get('dataset_id')}__{meta.get('case_id')}"
    if key and key != meta_key:
        raise ShardError(where, f"sample key differs from meta.json's {meta_key}")
    if verify and case_digest(image=image, label=label, fg_locations=fg, attrs=meta) != meta.get("sha256"):
        raise ShardError(where, "content digest differs from meta.json's sha256")
    return CaseArrays(key=meta_key, image=image, label=label, fg_locations=fg, meta=meta)


def enable_fsspec_urls(*schemes: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Let ``webdataset`` open ``<scheme>://`` URLs through fsspec (e.g. ``"s3"``, ``"gs"``, ``"az"``).

    webdataset 1.0 opens http(s) with curl and knows no s3; this registers an fsspec opener in
    ``webdataset.gopen.gopen_schemes`` for each scheme (call it in every dataloader worker process
    that is not forked from the caller).
    """
    import importlib

    # ``webdataset.gopen`` the attribute is the function; the dispatch table lives in the module.
    gopen = importlib.import_module("webdataset.gopen")
    opts = dict(storage_options or {})

    def _open(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return _fsspec_open(url, opts, mode=mode)

    for scheme in schemes or ("s3", "gs", "az", "abfs"):
        gopen.gopen_schemes[scheme] = _open
