"""Local folders and object storage behind a few small functions (fsspec; s3fs for ``s3://``).

A *location* is a local path or a URL such as ``s3://bucket/prefix``. The object store is found the
usual way: ``AWS_ENDPOINT_URL`` (any S3-compatible store), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or a profile), ``AWS_DEFAULT_REGION``; fsspec's own ``FSSPEC_S3`` (a JSON
object of s3fs arguments, e.g. ``{"config_kwargs": {"read_timeout": 30}}``) tunes the client.

Publishing on object storage, where there is no rename: a single object is written under a hidden
temporary key (``.tmp-<name>-<token>``) and then copied to its final key and the temporary one deleted
(:func:`write_bytes_atomic`); an object becomes visible only once complete, so readers see the old
object or the new one. A tree of objects (a Zarr store) is written with its marker object last (see
:func:`multitalent.shards.write_case_zarr`). Leftover ``.tmp-*`` keys of a killed writer are hidden
from readers and removed by the next run (:func:`remove_temp_entries`).

:func:`preflight` checks a location before any work starts: credentials, endpoint, bucket and (for an
output) write permission, each failure one :class:`StorageError` line naming the location and the cause.

Nothing here imports fsspec or s3fs at import time.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"

# Preflight client: fail in seconds on a wrong endpoint instead of retrying for minutes.
_PREFLIGHT_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 20,
    "retries": {"max_attempts": 2, "mode": "standard"},
}


class StorageError(Exception):
    """A location that cannot be used, or an object store that failed.

    ``str(e) == f"{location}: {cause}"``."""

    def __init__(self, location: str | os.PathLike[str], cause: str) -> None:
        self.location = str(location)
        self.cause = cause
        super().__init__(f"{self.location}: {cause}")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in str(location)


def join(root: str | os.PathLike[str], *parts: str) -> str:
    """``root/part/...``: ``/``-joined for a URL, :class:`~pathlib.Path`-joined for a local path."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root).joinpath(*parts))


def name_of(location: str | os.PathLike[str]) -> str:
    """The last component of a path or URL."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str | os.PathLike[str], **options: Any) -> tuple[Any, str]:
    """``(fsspec file system, path within it)`` of ``location``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(location), **options)
    return fs, path


def url_of(fs: Any, path: str) -> str:
    """The URL of ``path`` on ``fs`` (``bucket/key`` -> ``s3://bucket/key``)."""
    return str(fs.unstrip_protocol(path))


def exists(location: str | os.PathLike[str]) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    return bool(fs.exists(path))


def is_file(location: str | os.PathLike[str]) -> bool:
    if not is_url(location):
        return Path(location).is_file()
    fs, path = filesystem(location)
    return bool(fs.isfile(path))


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The bytes of a file or object (``FileNotFoundError`` when missing)."""
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    return bytes(fs.cat_file(path))


def read_text(location: str | os.PathLike[str]) -> str:
    return read_bytes(location).decode("utf-8")


def temp_name(name: str) -> str:
    """A hidden, unique sibling name for ``name``."""
    return f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"


def write_bytes_atomic(location: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` so that readers see the old content or the new one, never part of it.

    Local: a hidden sibling, fsync, rename. URL: the hidden temporary key, then copy to the final key
    and delete the temporary one. Returns ``location`` as a string.
    """
    if not is_url(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(temp_name(path.name))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return str(path)
    fs, key = filesystem(location)
    parent, _, name = key.rpartition("/")
    tmp_key = f"{parent}/{temp_name(name)}"
    try:
        fs.pipe_file(tmp_key, data)
        fs.copy(tmp_key, key)
    finally:
        _rm_quietly(fs, tmp_key)
    return str(location)


def write_text_atomic(location: str | os.PathLike[str], text: str) -> str:
    return write_bytes_atomic(location, text.encode("utf-8"))


def _rm_quietly(fs: Any, path: str, *, recursive: bool = False) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def list_names(location: str | os.PathLike[str]) -> list[str]:
    """Names of the entries directly under a folder or prefix (empty when it does not exist)."""
    if not is_url(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(name_of(e) for e in entries if name_of(e) != name_of(path))


def remove_tree(location: str | os.PathLike[str]) -> None:
    """Delete a folder/prefix (or a single file/object) and everything under it; no error if absent."""
    if not is_url(location):
        import shutil

        path = Path(location)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path_ = filesystem(location)
    _rm_quietly(fs, path_, recursive=True)


def remove_temp_entries(folders: Iterable[str]) -> list[str]:
    """Delete the ``.tmp-*`` entries directly under each folder/prefix; returns what was removed."""
    removed = []
    for folder in folders:
        for name in list_names(folder):
            if name.startswith(TMP_PREFIX):
                remove_tree(join(folder, name))
                removed.append(join(folder, name))
    return removed


# ------------------------------------------------------------------------------------------ preflight
def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _names(e: BaseException) -> set[str]:
    return {cls.__name__ for err in _chain(e) for cls in type(err).__mro__}


_STORE_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3"}


def is_store_failure(e: BaseException, *, missing_is_failure: bool = False) -> bool:
    """Whether ``e`` comes from talking to an object store (network, timeouts, the store's own errors),
    rather than from our code: what a conversion stops on instead of blaming a case.

    A missing object or bucket (``FileNotFoundError``) is not one unless ``missing_is_failure`` (for a
    location that was there a moment ago, e.g. a store that came back empty): by default the location
    is wrong and retrying will not help.
    """
    chain = _chain(e)
    modules = {type(err).__module__.split(".")[0] for err in chain}
    if any(isinstance(err, FileNotFoundError) for err in chain):
        return missing_is_failure
    if modules & _STORE_MODULES:
        return True
    return isinstance(e, (ConnectionError, TimeoutError, PermissionError))


def describe_failure(e: BaseException, *, endpoint: str | None = None) -> str:
    """A short cause for an object-store exception (the first line of its message)."""
    names = _names(e)
    text = " ".join(str(err) for err in _chain(e))
    where = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return (
            "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the "
            "object store"
        )
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
        "ConnectionRefusedError",
    }:
        return f"cannot reach the object store at {where} (check AWS_ENDPOINT_URL)"
    if names & {"ReadTimeoutError", "ServerTimeoutError"} or isinstance(e, TimeoutError):
        return f"the object store at {where} does not answer (timed out)"
    if any(k in text for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId")):
        return "the object store rejects the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return "bucket does not exist"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _bucket(path: str) -> str:
    return path.split("/", 1)[0]


_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs"}


def preflight(location: str, *, write: bool) -> None:
    """Check a URL location of an object store (``s3://``, ``gs://``, ``az://``) before any work starts
    (no-op for a local path or another kind of URL).

    Reads the bucket (credentials, endpoint, bucket) and, when ``write``, writes and deletes a hidden
    probe object under ``location`` (write permission).

    Raises:
        StorageError: ``"<location>: <cause>"``: no credentials, store unreachable, credentials
            rejected, no such bucket, no read or no write permission.
    """
    if not is_url(location):
        return
    import fsspec

    protocol = location.split("://", 1)[0]
    if protocol not in _BUCKET_PROTOCOLS:
        return  # http(s), memory, file: nothing to check up front; reading says what is wrong
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise StorageError(location, f"no file system for {protocol}:// ({e})") from None
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        options.update(config_kwargs=_PREFLIGHT_CONFIG)
    try:
        fs = cls(**options)
    except Exception as e:
        raise StorageError(location, describe_failure(e)) from None
    path = fs._strip_protocol(location).rstrip("/")
    bucket = _bucket(path)
    if protocol in ("s3", "s3a") and not _has_s3_credentials(fs):
        raise StorageError(location, describe_failure(_NoCredentials()))
    try:
        if hasattr(fs, "call_s3"):  # one request, however large the bucket
            prefix = path[len(bucket) + 1 :]
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        else:
            fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageError(location, f"bucket {bucket!r} does not exist") from None
    except PermissionError as e:
        cause = describe_failure(e)
        raise StorageError(location, f"no permission to list bucket {bucket!r} ({cause})") from None
    except Exception as e:
        raise StorageError(location, describe_failure(e)) from None
    if not write:
        return
    probe = f"{path}/{temp_name('preflight')}"
    try:
        fs.pipe_file(probe, b"")
    except PermissionError:
        raise StorageError(location, "no write permission (writing a probe object was denied)") from None
    except Exception as e:
        raise StorageError(location, f"cannot write: {describe_failure(e)}") from None
    try:
        fs.rm(probe)
    except Exception as e:
        raise StorageError(location, f"cannot delete objects ({describe_failure(e)})") from None


class _NoCredentials(Exception):
    def __str__(self) -> str:
        return "Unable to locate credentials"


def _has_s3_credentials(fs: Any) -> bool:
    """Whether botocore finds credentials, unless the file system is anonymous or was given keys."""
    if getattr(fs, "anon", False) or getattr(fs, "key", None) or getattr(fs, "session", None):
        return True
    try:
        import botocore.session

        return botocore.session.get_session().get_credentials() is not None
    except Exception:
        return True  # let the request say what is wrong
