"""Zarr stores, WebDataset shards, digests and the manifest (multitalent.shards)."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from multitalent.shards import (
    CaseRecord,
    ShardError,
    ZarrLayout,
    case_digest,
    check_case_zarr,
    decode_wds_sample,
    file_sha256,
    load_manifest,
    open_case_zarr,
    shard_urls,
    verify_case_zarr,
    write_case_zarr,
    write_manifest,
    write_shards,
    zarr_case_path,
)

SMALL = ZarrLayout(chunks_zyx=(4, 8, 8))


@dataclass
class Case:
    image_zyx: np.ndarray
    label_zyx: np.ndarray
    fg_locations: np.ndarray
    spacing_zyx_mm: tuple[float, float, float] = (2.5, 0.75, 0.75)
    geometry: dict = field(
        default_factory=lambda: {"bbox_zyx": [[1, 11], [0, 20], [2, 26]], "shape_zyx": [12, 20, 24]}
    )
    classes_present: list[int] = field(default_factory=lambda: [0, 2])


def make_case(seed: int, shape: tuple[int, int, int] = (10, 20, 24)) -> Case:
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1500, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:9, 4:10] = 1
    label[5:8, 10:15, 12:20] = 3
    fg = np.array([[0, 3, 4, 5], [0, 2, 3, 4], [1, 6, 11, 13]], np.int32)
    return Case(image, label, fg)


def tmp_entries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_zarr_round_trip(tmp_path: Path) -> None:
    case = make_case(0)
    rec = write_case_zarr(
        tmp_path, case, dataset_id="ds01", case_id="case_7", extra_attrs={"plan_sha256": "p1"}
    )
    assert rec.zarr_path == "zarr/ds01/case_7.zarr"
    assert (tmp_path / rec.zarr_path).is_dir() and zarr_case_path(
        tmp_path, "ds01", "case_7"
    ) == tmp_path / rec.zarr_path
    assert rec.key == "ds01__case_7" and rec.shape_zyx == (10, 20, 24) and rec.classes_present == (0, 2)
    assert rec.nbytes == case.image_zyx.nbytes + case.label_zyx.nbytes + case.fg_locations.nbytes
    assert dict(rec.meta) == {"plan_sha256": "p1"}

    zc = open_case_zarr(tmp_path / rec.zarr_path)
    assert zc.image.dtype == np.int16 and zc.label.dtype == np.uint8 and zc.fg_locations.dtype == np.int32
    np.testing.assert_array_equal(zc.image[...], case.image_zyx)
    np.testing.assert_array_equal(zc.label[...], case.label_zyx)
    np.testing.assert_array_equal(zc.fg_locations, case.fg_locations)
    np.testing.assert_array_equal(zc.image[3:9, 5:17, 2:20], case.image_zyx[3:9, 5:17, 2:20])
    assert zc.meta["spacing_zyx_mm"] == [2.5, 0.75, 0.75] and zc.spacing_zyx_mm == (2.5, 0.75, 0.75)
    assert zc.meta["geometry"] == case.geometry
    assert zc.meta["classes_present"] == [0, 2] and zc.meta["labels_present"] == [1, 3]
    assert zc.meta["shape_zyx"] == [10, 20, 24] and zc.meta["sha256"] == rec.sha256
    assert (
        zc.meta["dataset_id"] == "ds01" and zc.meta["case_id"] == "case_7" and zc.meta["plan_sha256"] == "p1"
    )
    assert verify_case_zarr(tmp_path / rec.zarr_path) == rec
    assert CaseRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    assert tmp_entries(tmp_path) == []


def test_empty_fg_locations_and_rewrite_replaces(tmp_path: Path) -> None:
    first = write_case_zarr(tmp_path, make_case(1), dataset_id="ds", case_id="c")
    second_case = make_case(2)
    second_case.fg_locations = np.zeros((0, 4), np.int64)
    second = write_case_zarr(tmp_path, second_case, dataset_id="ds", case_id="c", layout=SMALL)
    assert second.sha256 != first.sha256
    zc = open_case_zarr(tmp_path / second.zarr_path)
    np.testing.assert_array_equal(zc.image[...], second_case.image_zyx)
    assert zc.fg_locations.shape == (0, 4)
    assert verify_case_zarr(tmp_path / second.zarr_path) == second
    assert sorted(p.name for p in (tmp_path / "zarr/ds").iterdir()) == ["c.zarr"]


def test_failed_write_leaves_old_store_and_no_temp(tmp_path: Path) -> None:
    rec = write_case_zarr(tmp_path, make_case(3), dataset_id="ds", case_id="c")
    with pytest.raises(ValueError, match="codec"):
        write_case_zarr(
            tmp_path, make_case(4), dataset_id="ds", case_id="c", layout=ZarrLayout(image_codec="bogus")
        )
    assert tmp_entries(tmp_path) == []
    assert verify_case_zarr(tmp_path / rec.zarr_path) == rec


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: setattr(c, "image_zyx", c.image_zyx.astype(np.float32)), "int16"),
        (lambda c: setattr(c, "label_zyx", c.label_zyx[:, :, :5]), "shape"),
        (lambda c: setattr(c, "fg_locations", np.array([[0, 99, 0, 0]])), "out of range"),
        (lambda c: setattr(c, "spacing_zyx_mm", (1.0, 0.0, 1.0)), "spacing"),
    ],
)
def test_bad_case_is_rejected(tmp_path: Path, mutate, match: str) -> None:
    case = make_case(5)
    mutate(case)
    with pytest.raises(ValueError, match=match):
        write_case_zarr(tmp_path, case, dataset_id="ds", case_id="c")
    assert not (tmp_path / "zarr/ds/c.zarr").exists()


@pytest.mark.parametrize("bad", ["a.b", "a/b", "_x", ""])
def test_bad_ids_are_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid id"):
        write_case_zarr(tmp_path, make_case(0), dataset_id="ds", case_id=bad)


def test_extra_attrs_cannot_override_core(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="core attributes"):
        write_case_zarr(tmp_path, make_case(0), dataset_id="ds", case_id="c", extra_attrs={"sha256": "x"})


def test_digest_independent_of_chunking_and_codec(tmp_path: Path) -> None:
    case = make_case(6)
    a = write_case_zarr(tmp_path / "a", case, dataset_id="ds", case_id="c")
    b = write_case_zarr(
        tmp_path / "b", case, dataset_id="ds", case_id="c", layout=ZarrLayout((3, 7, 5), "zstd:1", "none")
    )
    c = write_case_zarr(
        tmp_path / "c",
        case,
        dataset_id="ds",
        case_id="c",
        layout=ZarrLayout((4, 8, 8), shards_zyx=(8, 16, 16)),
    )
    assert a.sha256 == b.sha256 == c.sha256
    zc = open_case_zarr(tmp_path / "b" / b.zarr_path)
    from_numpy = case_digest(
        image=case.image_zyx, label=case.label_zyx, fg_locations=case.fg_locations, attrs=zc.meta
    )
    assert from_numpy == a.sha256
    # ... but sensitive to content and to the attributes.
    changed = case.image_zyx.copy()
    changed[9, 19, 23] += 1
    assert (
        case_digest(image=changed, label=case.label_zyx, fg_locations=case.fg_locations, attrs=zc.meta)
        != a.sha256
    )
    attrs = {**zc.meta, "spacing_zyx_mm": [2.5, 0.75, 0.8]}
    assert (
        case_digest(image=case.image_zyx, label=case.label_zyx, fg_locations=case.fg_locations, attrs=attrs)
        != a.sha256
    )


def _chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),  # FIPS 180-2 vectors
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (b"a" * 1_000_000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
    ],
)
def test_file_sha256_matches_published_vectors(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    assert file_sha256(path) == file_sha256(str(path)) == expected


def test_verify_detects_corrupt_chunk(tmp_path: Path) -> None:
    rec = write_case_zarr(tmp_path, make_case(7), dataset_id="ds", case_id="c", layout=SMALL)
    store = tmp_path / rec.zarr_path
    chunk = _chunk_files(store, "image")[3]
    chunk.write_bytes(b"\x00garbage" + chunk.read_bytes()[8:])
    assert verify_case_zarr(store) is None
    with pytest.raises(ShardError, match="unreadable chunk"):
        check_case_zarr(store)


def test_verify_detects_missing_chunk(tmp_path: Path) -> None:
    rec = write_case_zarr(tmp_path, make_case(8), dataset_id="ds", case_id="c", layout=SMALL)
    store = tmp_path / rec.zarr_path
    _chunk_files(store, "image")[-1].unlink()
    with pytest.raises(ShardError, match="digest"):
        check_case_zarr(store)
    assert verify_case_zarr(store) is None


@pytest.mark.parametrize("attr", ["geometry", "sha256", "classes_present"])
def test_verify_detects_missing_attr(tmp_path: Path, attr: str) -> None:
    rec = write_case_zarr(tmp_path, make_case(9), dataset_id="ds", case_id="c")
    meta_file = tmp_path / rec.zarr_path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"][attr]
    meta_file.write_text(json.dumps(meta))
    assert verify_case_zarr(tmp_path / rec.zarr_path) is None
    with pytest.raises(ShardError, match=attr):
        check_case_zarr(tmp_path / rec.zarr_path)


def test_verify_detects_changed_attr_and_missing_store(tmp_path: Path) -> None:
    rec = write_case_zarr(
        tmp_path, make_case(10), dataset_id="ds", case_id="c", extra_attrs={"plan_sha256": "p"}
    )
    meta_file = tmp_path / rec.zarr_path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["plan_sha256"] = "other"
    meta_file.write_text(json.dumps(meta))
    assert verify_case_zarr(tmp_path / rec.zarr_path) is None
    assert verify_case_zarr(tmp_path / "zarr/ds/absent.zarr") is None
    (tmp_path / rec.zarr_path / "label" / "zarr.json").unlink()
    assert verify_case_zarr(tmp_path / rec.zarr_path) is None


def _write_cases(root: Path, n: int, *, sizes: tuple[int, ...] = (10,)) -> list[CaseRecord]:
    records = []
    for i in range(n):
        case = make_case(100 + i, shape=(sizes[i % len(sizes)], 20, 24))
        ds = "dsA" if i % 2 else "dsB"
        records.append(
            write_case_zarr(root, case, dataset_id=ds, case_id=f"case{i:02d}", extra_attrs={"i": i})
        )
    return records


@pytest.mark.parametrize("zstd_level", [3, None])
def test_wds_round_trip(tmp_path: Path, zstd_level: int | None) -> None:
    import webdataset as wds

    records = _write_cases(tmp_path, 3)
    shards = write_shards(
        tmp_path, records, max_cases_per_shard=2, max_shard_bytes=None, zstd_level=zstd_level
    )
    urls = shard_urls(tmp_path)
    assert (
        [Path(u).name for u in urls] == [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    )
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
    suffix = ".npy.zst" if zstd_level else ".npy"
    key = shards[0].keys[0]
    assert names[:4] == [
        f"{key}.fg_locations{suffix}",
        f"{key}.image{suffix}",
        f"{key}.label{suffix}",
        f"{key}.meta.json",
    ]

    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).map(lambda s: decode_wds_sample(s, verify=True)):
        seen[sample.key] = sample
    assert sorted(seen) == sorted(r.key for r in records)
    for rec in records:
        zc = open_case_zarr(tmp_path / rec.zarr_path)
        got = seen[rec.key]
        assert (
            got.image.dtype == np.int16 and got.label.dtype == np.uint8 and got.fg_locations.dtype == np.int32
        )
        np.testing.assert_array_equal(got.image, zc.image[...])
        np.testing.assert_array_equal(got.label, zc.label[...])
        np.testing.assert_array_equal(got.fg_locations, zc.fg_locations)
        assert got.meta == zc.meta


def test_decode_rejects_missing_and_tampered_members(tmp_path: Path) -> None:
    import webdataset as wds

    records = _write_cases(tmp_path, 1)
    write_shards(tmp_path, records, max_cases_per_shard=None, max_shard_bytes=None, zstd_level=None)
    sample = next(iter(wds.WebDataset(shard_urls(tmp_path), shardshuffle=False)))
    decode_wds_sample(sample, verify=True)
    with pytest.raises(ShardError, match="label"):
        decode_wds_sample({k: v for k, v in sample.items() if not k.startswith("label")})
    raw = bytearray(sample["image.npy"])
    raw[-1] ^= 1
    with pytest.raises(ShardError, match="digest"):
        decode_wds_sample({**sample, "image.npy": bytes(raw)}, verify=True)
    # A pipeline with webdataset's default .decode() stage hands over decoded npy/json members.
    decoded = next(iter(wds.WebDataset(shard_urls(tmp_path), shardshuffle=False).decode()))
    np.testing.assert_array_equal(
        decode_wds_sample(decoded, verify=True).image, decode_wds_sample(sample).image
    )


def test_shard_limits_and_byte_identical_runs(tmp_path: Path) -> None:
    recs_a = _write_cases(tmp_path / "a", 7, sizes=(10, 30, 8))
    recs_b = _write_cases(tmp_path / "b", 7, sizes=(10, 30, 8))
    assert recs_a == recs_b

    by_count = write_shards(tmp_path / "a", recs_a, max_cases_per_shard=3, max_shard_bytes=None)
    assert [s.n_cases for s in by_count] == [3, 3, 1]

    limit = 70_000
    shards_a = write_shards(tmp_path / "a", recs_a, max_cases_per_shard=None, max_shard_bytes=limit)
    shards_b = write_shards(
        tmp_path / "b", list(reversed(recs_b)), max_cases_per_shard=None, max_shard_bytes=limit
    )
    assert len(shards_a) > 1
    keys = [k for s in shards_a for k in s.keys]
    assert sorted(keys) == sorted(r.key for r in recs_a) and len(set(keys)) == len(keys)
    for s in shards_a:
        size = (tmp_path / "a" / s.path).stat().st_size
        assert size == s.nbytes
        assert size <= limit or s.n_cases == 1
    # Stale shards of the count-limited run are gone; the two roots hold identical bytes.
    assert [Path(u).name for u in shard_urls(tmp_path / "a")] == [s.name for s in shards_a]
    assert shards_a == shards_b
    for s in shards_a:
        assert (tmp_path / "a" / s.path).read_bytes() == (tmp_path / "b" / s.path).read_bytes()
    assert tmp_entries(tmp_path) == []


def test_write_shards_rejects_changed_store(tmp_path: Path) -> None:
    records = _write_cases(tmp_path, 2)
    write_case_zarr(tmp_path, make_case(999), dataset_id=records[0].dataset_id, case_id=records[0].case_id)
    with pytest.raises(ShardError, match="sha256"):
        write_shards(tmp_path, records, max_cases_per_shard=None, max_shard_bytes=None)
    assert tmp_entries(tmp_path) == []
    with pytest.raises(ValueError, match="positive"):
        write_shards(tmp_path, records, max_cases_per_shard=0, max_shard_bytes=None)


def test_manifest_deterministic_and_round_trip(tmp_path: Path) -> None:
    records = _write_cases(tmp_path, 5)
    shards = write_shards(tmp_path, records, max_cases_per_shard=2, max_shard_bytes=None)
    failure = {"dataset_id": "dsA", "case_id": "broken", "reason": "truncated"}
    path = write_manifest(
        tmp_path, records, shards, plan_sha256="p" * 64, catalog_hash="c1", failures=[failure]
    )
    first = path.read_bytes()
    write_manifest(
        tmp_path, list(reversed(records)), list(reversed(shards)), plan_sha256="p" * 64, catalog_hash="c1"
    )
    assert path.read_bytes() == first
    assert b"broken" not in first and tmp_entries(tmp_path) == []

    data = json.loads(first)
    assert [(c["dataset_id"], c["case_id"]) for c in data["cases"]] == sorted(
        (r.dataset_id, r.case_id) for r in records
    )
    assert data["datasets"] == {"dsA": 2, "dsB": 3} and data["n_cases"] == 5
    m = load_manifest(tmp_path)
    assert list(m.cases) == sorted(records, key=lambda r: (r.dataset_id, r.case_id))
    assert list(m.shards) == shards and m.plan_sha256 == "p" * 64 and m.catalog_hash == "c1"
    assert dict(m.shard_of) == {k: s.name for s in shards for k in s.keys}


def test_manifest_rejects_inconsistent_input(tmp_path: Path) -> None:
    records = _write_cases(tmp_path, 3)
    shards = write_shards(tmp_path, records, max_cases_per_shard=1, max_shard_bytes=None)
    with pytest.raises(ValueError, match="in no shard"):
        write_manifest(tmp_path, records, shards[:2], plan_sha256="p", catalog_hash="c")
    with pytest.raises(ValueError, match="failed"):
        write_manifest(tmp_path, records, shards, plan_sha256="p", catalog_hash="c", failures=[records[0]])
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ShardError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ShardError, match="malformed"):
        load_manifest(tmp_path / "manifest.json")


def test_fsspec_urls_for_shards_manifest_and_zarr(tmp_path: Path) -> None:
    import importlib

    import fsspec
    import webdataset as wds

    from multitalent.shards import enable_fsspec_urls

    records = _write_cases(tmp_path, 3)
    shards = write_shards(tmp_path, records, max_cases_per_shard=2, max_shard_bytes=None)
    write_manifest(tmp_path, records, shards, plan_sha256="p", catalog_hash="c")
    mem = fsspec.filesystem("memory")
    remote = f"/{tmp_path.name}"
    mem.put(str(tmp_path), remote, recursive=True)
    gopen = importlib.import_module("webdataset.gopen")
    saved = dict(gopen.gopen_schemes)
    try:
        enable_fsspec_urls("memory")
        urls = shard_urls(f"memory://{remote}")
        assert [u.rsplit("/", 1)[1] for u in urls] == [s.name for s in shards]
        keys = [s.key for s in wds.WebDataset(urls, shardshuffle=False).map(decode_wds_sample)]
        assert keys == [k for s in shards for k in s.keys]
        assert list(load_manifest(f"memory://{remote}").shards) == shards
        zc = open_case_zarr(f"memory://{remote}/{records[0].zarr_path}")
        local = open_case_zarr(tmp_path / records[0].zarr_path)
        np.testing.assert_array_equal(zc.image[2:7, 3:15, 4:20], local.image[2:7, 3:15, 4:20])
    finally:
        gopen.gopen_schemes.clear()
        gopen.gopen_schemes.update(saved)
        mem.rm(remote, recursive=True)


def test_remove_temp_entries_keeps_finished_outputs(tmp_path: Path) -> None:
    from multitalent.shards import remove_temp_entries

    records = _write_cases(tmp_path, 2)
    write_shards(tmp_path, records, max_cases_per_shard=None, max_shard_bytes=None)
    leftovers = [
        tmp_path / "zarr/dsA/.tmp-case01.zarr-0123abcd",
        tmp_path / "wds/.tmp-shard-000000.tar-0123abcd",
        tmp_path / ".tmp-manifest.json-0123abcd",
    ]
    (leftovers[0] / "image").mkdir(parents=True)
    for p in leftovers[1:]:
        p.write_bytes(b"partial")
    assert sorted(remove_temp_entries(tmp_path)) == sorted(leftovers)
    assert tmp_entries(tmp_path) == []
    assert all(verify_case_zarr(tmp_path / r.zarr_path) == r for r in records)
    assert len(shard_urls(tmp_path)) == 1
