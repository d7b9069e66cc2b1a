"""One Zarr v3 group per preprocessed case: write atomically, open for crop reads, verify by digest.

Layout of ``<out_root>/zarr/<dataset_id>/<case_id>.zarr``::

    image         int16 (z, y, x)  HU, resampled and clipped; normalise with plan.json when reading
    label         uint8 (z, y, x)  raw label values of the dataset, 0 = background
    fg_locations  int32 (N, 4)     rows [local_class, z, y, x]
    attrs         dataset_id, case_id, spacing_zyx_mm, geometry, classes_present, labels_present,
                  shape_zyx, sha256, format_version, plus the caller's extra attributes
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from multitalent import storage
from multitalent.shards._common import (
    FORMAT_VERSION,
    TMP_PREFIX,
    ShardError,
    canonical,
    check_id,
    replace_dir,
    sample_key,
    temp_sibling,
)
from multitalent.shards.digest import case_digest

if TYPE_CHECKING:
    import zarr

CORE_ATTRS = (
    "dataset_id",
    "case_id",
    "spacing_zyx_mm",
    "geometry",
    "classes_present",
    "labels_present",
    "shape_zyx",
    "sha256",
    "format_version",
)
ROOT_MARKER = "zarr.json"  # a store is finished when its root metadata exists (written/copied last)
ARRAY_DTYPES = {"image": np.dtype(np.int16), "label": np.dtype(np.uint8), "fg_locations": np.dtype(np.int32)}


class CaseLike(Protocol):
    """What :func:`write_case_zarr` reads; ``multitalent.preprocess.PreprocessedCase`` fits."""

    # Read-only properties, so that plain (mutable) dataclass fields of narrower types fit.
    @property
    def image_zyx(self) -> np.ndarray: ...
    @property
    def label_zyx(self) -> np.ndarray: ...
    @property
    def fg_locations(self) -> np.ndarray: ...
    @property
    def spacing_zyx_mm(self) -> Sequence[float]: ...
    @property
    def geometry(self) -> Mapping[str, Any]: ...
    @property
    def classes_present(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class ZarrLayout:
    """Chunking and codecs of the case arrays.

    Codec specs: ``"blosc:<cname>:<level>:<shuffle|bitshuffle|noshuffle>"``, ``"zstd:<level>"``,
    ``"none"``. ``shards_zyx`` (a multiple of ``chunks_zyx``) packs chunks into fewer files with the
    Zarr sharding codec; ``None`` writes one file per chunk.
    """

    # Chosen for the training read: the loader reads an enlarged patch (210x308x308 for 96x192x192)
    # so that rotations stay inside real data; 64x128x128 lz4 chunks read it ~1.26x faster than 64^3
    # zstd-3 at +24 % bytes (bench/bench_read_layouts.py; docs/benchmarks.md, "Shards").
    chunks_zyx: tuple[int, int, int] = (64, 128, 128)
    image_codec: str = "blosc:lz4:5:bitshuffle"
    label_codec: str = "blosc:zstd:3:bitshuffle"
    shards_zyx: tuple[int, int, int] | None = None


# Chosen by bench/bench_shards.py (docs/benchmarks.md, "Shards"): 64³ chunks fit random
# 96x192x192 crops as well as anisotropic chunkings do and stay good for other patch shapes;
# blosc zstd-3 bitshuffle stores a CT 26 % smaller than lz4 for ~10 % more CPU per crop.
DEFAULT_LAYOUT = ZarrLayout()


@dataclass(frozen=True)
class CaseRecord:
    """What the converter and the manifest keep of a written case.

    ``zarr_path`` is relative to the output root (POSIX separators). ``nbytes`` is the uncompressed
    size of the three arrays. ``meta`` holds the caller's extra attributes (e.g. ``plan_sha256``).
    """

    dataset_id: str
    case_id: str
    zarr_path: str
    sha256: str
    shape_zyx: tuple[int, int, int]
    classes_present: tuple[int, ...]
    nbytes: int
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """The WebDataset sample key ``<dataset_id>__<case_id>``."""
        return sample_key(self.dataset_id, self.case_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "case_id": self.case_id,
            "zarr_path": self.zarr_path,
            "sha256": self.sha256,
            "shape_zyx": list(self.shape_zyx),
            "classes_present": list(self.classes_present),
            "nbytes": self.nbytes,
            "meta": canonical(dict(self.meta)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CaseRecord:
        try:
            shape = tuple(int(s) for s in d["shape_zyx"])
            if len(shape) != 3:
                raise ValueError(f"shape_zyx must have 3 entries, got {shape}")
            return cls(
                dataset_id=str(d["dataset_id"]),
                case_id=str(d["case_id"]),
                zarr_path=str(d["zarr_path"]),
                sha256=str(d["sha256"]),
                shape_zyx=(shape[0], shape[1], shape[2]),
                classes_present=tuple(int(c) for c in d["classes_present"]),
                nbytes=int(d["nbytes"]),
                meta=dict(d.get("meta", {})),
            )
        except KeyError as e:
            raise ValueError(f"case record lacks field {e.args[0]!r}") from None


@dataclass
class ZarrCase:
    """An opened case store. ``image``/``label`` are lazy zarr arrays (z, y, x): slicing reads only
    the chunks it touches. ``fg_locations`` (N, 4) int32 is loaded; ``meta`` is the attribute dict."""

    image: zarr.Array
    label: zarr.Array
    fg_locations: np.ndarray
    meta: dict[str, Any]
    path: str

    @property
    def key(self) -> str:
        return sample_key(self.meta["dataset_id"], self.meta["case_id"])

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        z, y, x = self.image.shape
        return (z, y, x)

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        z, y, x = self.meta["spacing_zyx_mm"]
        return (float(z), float(y), float(x))


def zarr_relpath(dataset_id: str, case_id: str) -> str:
    return f"zarr/{dataset_id}/{case_id}.zarr"


def zarr_case_path(out_root: Path, dataset_id: str, case_id: str) -> Path:
    """``<out_root>/zarr/<dataset_id>/<case_id>.zarr`` (a local output root)."""
    return Path(out_root) / zarr_relpath(
        check_id(dataset_id, what="dataset_id"), check_id(case_id, what="case_id")
    )


def zarr_case_location(out_root: str | Path, dataset_id: str, case_id: str) -> str:
    """:func:`zarr_case_path` for a local output root or a URL (``s3://bucket/collection``)."""
    rel = zarr_relpath(check_id(dataset_id, what="dataset_id"), check_id(case_id, what="case_id"))
    return storage.join(out_root, rel)


def _codecs(spec: str) -> list[Any]:
    from zarr.codecs import BloscCodec, ZstdCodec

    parts = spec.split(":")
    if parts == ["none"]:
        return []
    if parts[0] == "zstd" and len(parts) == 2:
        return [ZstdCodec(level=int(parts[1]))]
    if parts[0] == "blosc" and len(parts) == 4:
        return [BloscCodec(cname=parts[1], clevel=int(parts[2]), shuffle=parts[3])]  # type: ignore[arg-type]
    raise ValueError(
        f"unknown codec spec {spec!r} (expected 'blosc:cname:level:shuffle', 'zstd:level' or 'none')"
    )


def _validated_arrays(case: CaseLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, label = np.asarray(case.image_zyx), np.asarray(case.label_zyx)
    if image.ndim != 3:
        raise ValueError(f"image_zyx must be 3-D (z, y, x), got shape {image.shape}")
    if image.dtype != np.int16:
        raise ValueError(f"image_zyx must be int16 HU, got {image.dtype}")
    if label.shape != image.shape:
        raise ValueError(f"label_zyx shape {label.shape} differs from image_zyx shape {image.shape}")
    if label.dtype != np.uint8:
        raise ValueError(f"label_zyx must be uint8, got {label.dtype}")
    fg = np.asarray(case.fg_locations)
    if fg.size == 0:
        fg = fg.reshape(0, 4)
    if fg.ndim != 2 or fg.shape[1] != 4 or not np.issubdtype(fg.dtype, np.integer):
        raise ValueError(f"fg_locations must be integer (N, 4) [class, z, y, x], got {fg.dtype} {fg.shape}")
    if len(fg):
        lo, hi = fg.min(axis=0), fg.max(axis=0)
        if lo.min() < 0 or any(hi[1:] >= np.asarray(image.shape)):
            raise ValueError(f"fg_locations out of range for shape {image.shape}: min {lo}, max {hi}")
    return image, label, fg.astype(np.int32, copy=False)


def _case_attrs(
    case: CaseLike, label: np.ndarray, *, dataset_id: str, case_id: str, extra_attrs: Mapping[str, Any] | None
) -> dict[str, Any]:
    spacing = [float(s) for s in case.spacing_zyx_mm]
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx_mm must be three positive numbers, got {case.spacing_zyx_mm}")
    if not isinstance(case.geometry, Mapping):
        raise ValueError(f"geometry must be a JSON-able dict, got {type(case.geometry).__name__}")
    classes = sorted({int(c) for c in case.classes_present})
    if classes and classes[0] < 0:
        raise ValueError(f"classes_present must be non-negative local class indices, got {classes}")
    counts = np.bincount(label.reshape(-1), minlength=256)
    attrs: dict[str, Any] = {
        "dataset_id": dataset_id,
        "case_id": case_id,
        "spacing_zyx_mm": spacing,
        "geometry": case.geometry,
        "classes_present": classes,
        "labels_present": [int(v) for v in np.flatnonzero(counts[1:]) + 1],
        "shape_zyx": list(label.shape),
        "format_version": FORMAT_VERSION,
    }
    clash = sorted(set(extra_attrs or {}) & set(CORE_ATTRS))
    if clash:
        raise ValueError(f"extra_attrs may not override the core attributes {clash}")
    attrs.update(extra_attrs or {})
    return canonical(attrs)


def _create(
    group: Any, name: str, data: np.ndarray, *, chunks: Any, shards: Any, codec: str, dims: Any
) -> None:
    arr = group.create_array(
        name=name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=_codecs(codec),
        fill_value=0,
        dimension_names=dims,
    )
    arr[...] = data


class _UrlPrefix:
    """Creates arrays under a URL prefix (zarr's fsspec store) without writing the group's own zarr.json."""

    def __init__(self, url: str) -> None:
        self.url = url

    def create_array(self, *, name: str, **kwargs: Any) -> Any:
        import zarr

        return zarr.create_array(store=f"{self.url}/{name}", zarr_format=3, **kwargs)


def _write_marker(url: str, attrs: Mapping[str, Any]) -> None:
    """The group's root ``zarr.json`` with the case attributes: written last, it makes the store visible."""
    import zarr

    zarr.create_group(store=url, zarr_format=3, attributes=dict(attrs))


def write_case_zarr(
    out_root: str | Path,
    case: CaseLike,
    *,
    dataset_id: str,
    case_id: str,
    extra_attrs: Mapping[str, Any] | None = None,
    layout: ZarrLayout = DEFAULT_LAYOUT,
) -> CaseRecord:
    """Write ``case`` to ``<out_root>/zarr/<dataset_id>/<case_id>.zarr`` and return its record.

    The store is built in a hidden ``.tmp-*`` sibling and renamed into place, replacing an existing
    store; readers never see a half-written one. ``out_root`` may be a URL (``s3://bucket/prefix``):
    the arrays are then written through zarr's fsspec store under the final prefix and the root
    ``zarr.json``, which readers require, last. ``extra_attrs`` (JSON-able, e.g. ``plan_sha256``)
    are stored beside the core attributes, enter the digest and come back as ``CaseRecord.meta``.

    Raises:
        ValueError: wrong dtypes/shapes (image int16 (z, y, x), label uint8 same shape,
            fg_locations integer (N, 4)), bad ids, non-JSON-able attributes.
    """
    import zarr

    check_id(dataset_id, what="dataset_id")
    check_id(case_id, what="case_id")
    image, label, fg = _validated_arrays(case)
    attrs = _case_attrs(case, label, dataset_id=dataset_id, case_id=case_id, extra_attrs=extra_attrs)
    attrs["sha256"] = case_digest(image=image, label=label, fg_locations=fg, attrs=attrs)

    def fill(parent: Any) -> None:
        vol: dict[str, Any] = {
            "chunks": layout.chunks_zyx,
            "shards": layout.shards_zyx,
            "dims": ("z", "y", "x"),
        }
        _create(parent, "image", image, codec=layout.image_codec, **vol)
        _create(parent, "label", label, codec=layout.label_codec, **vol)
        _create(
            parent,
            "fg_locations",
            fg,
            chunks=(max(1, len(fg)), 4),
            shards=None,
            codec="zstd:3",
            dims=("point", "czyx"),
        )

    if storage.is_url(out_root):
        # Object storage has no rename: write the arrays through zarr's fsspec store straight under the
        # final prefix and the group's root zarr.json (the marker readers require) last; an old store
        # loses its marker first, so readers see the old store, then none, then the new one.
        final_url = zarr_case_location(out_root, dataset_id, case_id)
        storage.remove_tree(storage.join(final_url, ROOT_MARKER))
        storage.remove_tree(final_url)
        try:
            fill(_UrlPrefix(final_url))
            _write_marker(final_url, attrs)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort; without its marker it is invisible anyway
                storage.remove_tree(final_url)
            raise
        return _record(attrs, image.nbytes + label.nbytes + fg.nbytes)
    final = zarr_case_path(Path(out_root), dataset_id, case_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        fill(zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _record(attrs, image.nbytes + label.nbytes + fg.nbytes)


def _record(attrs: Mapping[str, Any], nbytes: int) -> CaseRecord:
    z, y, x = (int(s) for s in attrs["shape_zyx"])
    return CaseRecord(
        dataset_id=attrs["dataset_id"],
        case_id=attrs["case_id"],
        zarr_path=zarr_relpath(attrs["dataset_id"], attrs["case_id"]),
        sha256=attrs["sha256"],
        shape_zyx=(z, y, x),
        classes_present=tuple(int(c) for c in attrs["classes_present"]),
        nbytes=int(nbytes),
        meta={k: v for k, v in attrs.items() if k not in CORE_ATTRS},
    )


def open_case_zarr(path: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> ZarrCase:
    """Open a case store read-only; ``path`` may be local or an fsspec URL (``s3://...``).

    Raises:
        ShardError: the store is missing, is not a case store, or has an unknown format version.
    """
    import zarr

    try:
        kwargs: dict[str, Any] = {"storage_options": dict(storage_options)} if storage_options else {}
        group = zarr.open_group(store=str(path), mode="r", zarr_format=3, **kwargs)
        meta = dict(group.attrs)
        image, label, fg = group["image"], group["label"], group["fg_locations"]
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(path, f"cannot open case store ({type(e).__name__}: {e})") from e
    missing = [k for k in CORE_ATTRS if k not in meta]
    if missing:
        raise ShardError(path, f"case store lacks attributes {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ShardError(
            path, f"format_version {meta['format_version']} is not the supported {FORMAT_VERSION}"
        )
    arrays = {"image": image, "label": label, "fg_locations": fg}
    for name, arr in arrays.items():
        if not isinstance(arr, zarr.Array) or arr.dtype != ARRAY_DTYPES[name]:
            raise ShardError(path, f"{name} is not a {ARRAY_DTYPES[name]} array")
    assert isinstance(image, zarr.Array) and isinstance(label, zarr.Array) and isinstance(fg, zarr.Array)
    return ZarrCase(image=image, label=label, fg_locations=np.asarray(fg[...]), meta=meta, path=str(path))


def check_case_zarr(path: str | Path) -> CaseRecord:
    """Re-read a case store (local or a URL), recompute its digest and return its record.

    Raises:
        ShardError: missing or half-written store, missing attribute or array, wrong shapes or
            dtypes, unreadable chunk, or a digest that differs from the stored ``sha256``.
    """
    where = str(path).rstrip("/")
    name = storage.name_of(where)
    parent = storage.name_of(where[: -len(name)])
    if name.startswith(TMP_PREFIX):
        raise ShardError(where, "is a temporary store of an unfinished write")
    try:
        finished = storage.is_file(storage.join(where, ROOT_MARKER))
    except Exception as e:
        if storage.is_store_failure(e):
            raise ShardError(where, f"cannot read ({storage.describe_failure(e)})") from e
        raise
    if not finished:
        raise ShardError(where, f"no {ROOT_MARKER}: not a (finished) Zarr v3 store")
    case = open_case_zarr(where)
    meta = case.meta
    if name != f"{meta['case_id']}.zarr" or parent != meta["dataset_id"]:
        raise ShardError(where, f"path does not match attributes {meta['dataset_id']}/{meta['case_id']}")
    shape = tuple(meta["shape_zyx"])
    if case.image.shape != shape or case.label.shape != shape:
        raise ShardError(
            where, f"array shapes {case.image.shape}/{case.label.shape} differ from shape_zyx {shape}"
        )
    if case.fg_locations.ndim != 2 or case.fg_locations.shape[1] != 4:
        raise ShardError(where, f"fg_locations has shape {case.fg_locations.shape}, expected (N, 4)")
    try:
        digest = case_digest(image=case.image, label=case.label, fg_locations=case.fg_locations, attrs=meta)
    except Exception as e:
        raise ShardError(where, f"unreadable chunk ({type(e).__name__}: {e})") from e
    if digest != meta["sha256"]:
        raise ShardError(
            where, f"content digest {digest[:12]}… differs from stored sha256 {str(meta['sha256'])[:12]}…"
        )
    fg_bytes = case.fg_locations.nbytes
    return _record(meta, case.image.nbytes + case.label.nbytes + fg_bytes)


def verify_case_zarr(path: str | Path) -> CaseRecord | None:
    """The record of a complete, intact store at ``path``, or ``None`` (use :func:`check_case_zarr`
    to learn why). A resumed converter skips cases whose store verifies."""
    try:
        return check_case_zarr(path)
    except ShardError:
        return None
