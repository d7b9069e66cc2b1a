"""Batch sources over Zarr stores and WebDataset shards (local and over HTTP), and the Batch type."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from multitalent.catalog import Catalog, ClassSpec, DatasetSpec
from multitalent.data.batch import Batch, PatchSample, collate
from multitalent.data.sources import (
    WebDatasetPatchSource,
    ZarrPatchSource,
    case_key,
    case_ref,
)
from multitalent.preprocess.plan import Normalization
from multitalent.shards import (
    ShardError,
    decode_wds_sample,
    iter_shard_samples,
    shard_urls,
    write_case_zarr,
    write_manifest,
    write_shards,
)

SIZES = {"a": 1, "b": 4, "c": 9}
PATCH = (4, 8, 8)
NORM = Normalization(clip=(-500.0, 300.0), mean=40.0, std=120.0)


def _catalog() -> Catalog:
    def spec(i: str) -> DatasetSpec:
        return DatasetSpec(
            id=i,
            name=i,
            layout="msd",
            labels={1: "organ", 2: "tumour"},
            classes=(ClassSpec("organ", (1, 2)), ClassSpec("tumour", (2,))),
        )

    return Catalog("test", tuple(spec(i) for i in SIZES))


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> SimpleNamespace:
    image = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    z, y, x = (s // 2 for s in shape)
    label[max(z - 1, 0) : z + 1, y - 2 : y + 2, x - 2 : x + 2] = 1
    label[z, y, x] = 2
    classes = [(0, (1, 2)), (1, (2,))]  # local class -> raw values
    fg = np.array([[c, *v] for c, raw in classes for v in np.argwhere(np.isin(label, raw))], dtype=np.int32)
    return SimpleNamespace(
        image_zyx=image,
        label_zyx=label,
        fg_locations=fg,
        spacing_zyx_mm=(1.5, 1.0, 1.0),
        geometry={"shape": list(shape)},
        classes_present=[0, 1],
    )


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    records, arrays = [], {}
    for d, n in SIZES.items():
        for i in range(n):
            shape = (
                (3, 6, 10) if (d, i) == ("b", 0) else (int(rng.integers(6, 9)), 12, int(rng.integers(10, 14)))
            )
            case = _case(rng, shape)  # ("b", 0) is smaller than the patch on two axes
            records.append(write_case_zarr(root, case, dataset_id=d, case_id=f"case{i:02d}"))
            arrays[case_key(d, f"case{i:02d}")] = case
    shards = write_shards(root, records, max_cases_per_shard=3, max_shard_bytes=None)
    write_manifest(root, records, shards, plan_sha256="0" * 64, catalog_hash=_catalog().hash)
    return SimpleNamespace(
        root=root, records=records, arrays=arrays, urls=shard_urls(root), catalog=_catalog()
    )


def _common_args(col) -> dict:
    return {
        "catalog": col.catalog,
        "normalization": NORM,
        "cases": col.records,
        "patch_zyx": PATCH,
        "batch_size": 3,
        "seed": 1,
    }


def _zarr(col, **kw) -> ZarrPatchSource:
    return ZarrPatchSource(col.root, **(_common_args(col) | kw))


def _wds(col, urls=None, **kw) -> WebDatasetPatchSource:
    return WebDatasetPatchSource(col.urls if urls is None else urls, **(_common_args(col) | kw))


def _take(it, n):
    return [x for _, x in zip(range(n), it)]


# ------------------------------------------------------------------------------------ batches
def test_batch_shapes_dtypes_and_annotation(collection):
    for source in (_zarr(collection, num_batches=2), _wds(collection, num_batches=2)):
        batches = list(source)
        assert len(batches) == 2
        b = batches[0]
        assert isinstance(b, Batch) and len(b) == 3
        assert b.image_bczyx.shape == (3, 1, *PATCH) and b.image_bczyx.dtype == torch.float32
        assert b.label_bzyx.shape == (3, *PATCH) and b.label_bzyx.dtype == torch.uint8
        assert b.dataset_idx_b.dtype == torch.int64 and b.annotated_bk.dtype == torch.bool
        mask = collection.catalog.annotated_mask()
        np.testing.assert_array_equal(b.annotated_bk.numpy(), mask[b.dataset_idx_b.numpy()])
        for k, d in zip(b.keys, b.dataset_idx_b.tolist()):
            assert k in collection.arrays and collection.catalog.dataset_index(case_ref(k)[0]) == d
        moved = b.to("cpu")
        assert torch.equal(moved.image_bczyx, b.image_bczyx) and moved.keys == b.keys


def test_collate_rejects_mixed_shapes():
    a = PatchSample(np.zeros((1, 2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), 0, "a__x", (0, 0, 0))
    b = PatchSample(np.zeros((1, 2, 2, 3), np.float32), np.zeros((2, 2, 3), np.uint8), 0, "a__y", (0, 0, 0))
    with pytest.raises(ValueError, match="differ in shape"):
        collate([a, b], annotated_dk=np.ones((1, 2), bool))


def test_normalisation_apply_is_float32_clip_then_standardise():
    n = Normalization(clip=(-927.0, 275.0), mean=63.44, std=175.48)
    x = np.array([-2000, 0, 275, 1000], np.int16)
    out = n.apply(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, (np.clip(x, -927, 275) - 63.44) / 175.48, rtol=1e-6)
    assert x.tolist() == [-2000, 0, 275, 1000]  # input untouched
    y = np.zeros(3, np.float32)
    assert n.apply(y) is not y  # a copy even for float32 input (readers hand in zarr buffers)
    assert n.air == pytest.approx((-927 - 63.44) / 175.48, rel=1e-6)


# ------------------------------------------------------------------------------------ same patches
def test_zarr_and_webdataset_give_identical_patches(collection):
    zsrc, wsrc = _zarr(collection), _wds(collection)
    index = {case_key(*case_ref(r)): i for i, r in enumerate(collection.records)}
    seen = set()
    for url in collection.urls:
        for raw in iter_shard_samples(url):
            case = decode_wds_sample(raw)
            seen.add(case.key)
            ref = collection.arrays[case.key]
            shape = ref.image_zyx.shape
            for center in [(0, 0, 0), tuple(s // 2 for s in shape), tuple(s - 1 for s in shape), (1, 5, 2)]:
                a = zsrc.read_sample(index[case.key], center)
                b = wsrc.read_sample(case, center)
                np.testing.assert_array_equal(a.image_czyx, b.image_czyx)
                np.testing.assert_array_equal(a.label_zyx, b.label_zyx)
                assert a.key == b.key and a.dataset_idx == b.dataset_idx
            # against the written arrays: normalised interior, air (normalised lower clip) outside
            s = zsrc.read_sample(index[case.key], (0, 0, 0))
            np.testing.assert_allclose(
                s.image_czyx[0, 2:, 4:, 4:], NORM.apply(ref.image_zyx[:2, :4, :4]), rtol=1e-6
            )
            air = NORM.air
            assert air < -1 and (s.image_czyx[0, :2] == air).all() and (s.label_zyx[:2] == 0).all()
    assert seen == set(collection.arrays)


def test_forced_foreground_patches_hold_their_class_at_the_centre(collection):
    catalog = collection.catalog
    for source in (_zarr(collection, fg_fraction=1.0), _wds(collection, fg_fraction=1.0)):
        for s in _take(source.samples(), 40):
            assert s.fg_class in (0, 1)
            centre = tuple(p // 2 for p in PATCH)  # the centre voxel's place in the patch
            raw = catalog.datasets[s.dataset_idx].classes[s.fg_class].raw_values
            assert s.label_zyx[centre] in raw
            assert collection.arrays[s.key].label_zyx[s.center_zyx] in raw


def test_zarr_source_draws_datasets_proportional_to_sqrt_n_and_one_third_foreground(collection):
    samples = _take(_zarr(collection, batch_size=16).samples(), 720)
    draws = Counter(case_ref(s.key)[0] for s in samples)
    for d, p in {"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}.items():  # √1 : √4 : √9
        assert abs(draws[d] - 720 * p) < 3.5 * np.sqrt(720 * p * (1 - p)), (d, draws)
    share = np.mean([s.fg_class >= 0 for s in samples])
    assert abs(share - 1 / 3) < 3.5 * np.sqrt((2 / 9) / len(samples))


@pytest.mark.parametrize(
    ("exponent", "expected"),
    [
        (0.5, {"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}),
        (0.0, {"a": 1 / 14, "b": 4 / 14, "c": 9 / 14}),
        (1.0, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),
    ],
)
def test_stream_weights_give_n_to_the_one_minus_exponent(collection, exponent, expected):
    epochs = 40
    src = _wds(collection, exponent=exponent, patches_per_case=2.0, epochs=epochs)
    assert np.mean([src.expected_patches[case_ref(r)[0]] for r in collection.records]) == pytest.approx(2.0)
    patches = Counter(case_ref(s.key)[0] for s in src.samples())
    total = sum(patches.values())
    # only the stochastic rounding of the budgets is random: var <= 1/4 per case and epoch
    assert abs(total - 2.0 * 14 * epochs) < 3.5 * np.sqrt(14 * epochs / 4)
    for d, p in expected.items():
        assert abs(patches[d] / total - p) < 0.03, (exponent, patches)


def test_dataset_sizes_instead_of_cases_and_skipping_other_cases(collection):
    keep = [r for r in collection.records if r.dataset_id != "c"]
    src = _wds(collection, cases=keep, epochs=1, patches_per_case=50)
    assert {case_ref(s.key)[0] for s in src.samples()} == {"a", "b"}
    src = _wds(collection, cases=None, dataset_sizes={"c": 9}, epochs=1, patches_per_case=5)
    assert {case_ref(s.key)[0] for s in src.samples()} == {"c"}
    with pytest.raises(ValueError, match="dataset_sizes"):
        _wds(collection, cases=None)
    with pytest.raises(KeyError, match="zz"):
        _wds(collection, cases=["zz__case00"])


# ------------------------------------------------------------------------------------ splits
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (4, 2)])  # 5 shards; (4, 2) splits by case
def test_stream_rank_worker_shares_are_disjoint_and_complete(collection, world, workers):
    for epoch in (0, 1):
        shares = [
            [
                c.key
                for c in _wds(collection, rank=r, world_size=world).slot_cases(
                    epoch, worker=w, num_workers=workers
                )
            ]
            for r in range(world)
            for w in range(workers)
        ]
        flat = [k for s in shares for k in s]
        assert sorted(flat) == sorted(collection.arrays) and len(set(flat)) == len(flat)
    src = _wds(collection)
    assert src.shard_plan(0)[0] != src.shard_plan(1)[0]  # shards reshuffled per epoch
    assert sorted(src.shard_plan(0)[0]) == sorted(collection.urls)


def test_determinism_per_seed_rank_worker(collection):
    def keys_and_images(src, worker=0):
        samples = _take(src.samples(worker=worker, num_workers=2), 12)
        return [s.key for s in samples], np.stack([s.image_czyx for s in samples])

    for make in (_zarr, _wds):
        k1, i1 = keys_and_images(make(collection))
        k2, i2 = keys_and_images(make(collection))
        assert k1 == k2 and np.array_equal(i1, i2)
        others = [
            keys_and_images(make(collection, seed=2)),
            keys_and_images(make(collection, rank=1, world_size=2)),
        ]
        others.append(keys_and_images(make(collection), worker=1))
        for k, i in others:
            assert k != k1 or not np.array_equal(i, i1)


def test_dataloader_workers_yield_the_requested_batches(collection):
    loader = torch.utils.data.DataLoader(_zarr(collection, num_batches=5), batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == 5 and all(isinstance(b, Batch) for b in batches)
    # worker 0 made batches 0, 2, 4 and worker 1 batches 1, 3: different streams
    assert not torch.equal(batches[0].image_bczyx, batches[1].image_bczyx)


# ------------------------------------------------------------------------------------ sources of data
def test_zarr_source_reads_the_manifest_when_no_cases_are_given(collection):
    src = ZarrPatchSource(
        collection.root,
        catalog=collection.catalog,
        normalization=NORM,
        patch_zyx=PATCH,
        batch_size=2,
        num_batches=1,
    )
    assert sorted(case_key(*r) for r in src.refs) == sorted(collection.arrays)
    assert len(list(src)) == 1


@pytest.fixture
def http_root(collection):
    handler = functools.partial(_QuietHandler, directory=str(collection.root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_streaming_over_http_matches_local_files(collection, http_root):
    urls = [f"{http_root}/wds/{Path(u).name}" for u in collection.urls]
    remote = list(_wds(collection, urls=urls, num_batches=4))
    local = list(_wds(collection, num_batches=4))
    assert len(remote) == 4
    for r, loc in zip(remote, local):
        assert r.keys == loc.keys
        assert torch.equal(r.image_bczyx, loc.image_bczyx) and torch.equal(r.label_bzyx, loc.label_bzyx)


def test_missing_shard_names_the_url(collection, http_root, tmp_path):
    with pytest.raises(ShardError, match=r"shard-999999\.tar"):
        next(iter_shard_samples(str(tmp_path / "shard-999999.tar")))
    with pytest.raises(ShardError, match=r"shard-999999\.tar"):
        next(iter_shard_samples(f"{http_root}/wds/shard-999999.tar"))
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"not a tar file" * 100)
    with pytest.raises(ShardError, match=re.escape(str(bad))):
        next(iter_shard_samples(str(bad)))
