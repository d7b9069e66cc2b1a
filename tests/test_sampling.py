"""Case sampling ∝ n^-exponent, patch centres, folds, rank/worker splits and patch boxes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import stats

from multitalent.data.patches import crop_box, read_patch
from multitalent.data.sampling import (
    ForegroundSchedule,
    PatchSampler,
    case_probabilities,
    dataset_probabilities,
    draw_center,
    fixed_foreground_slots,
    kfold_split,
    partition,
    random_center,
    split_cases,
    split_keys,
    stream_patch_counts,
    stream_rngs,
)

SIZES = {"a": 4, "b": 16, "c": 64}


def _dataset_ids() -> list[str]:
    return [d for d, n in SIZES.items() for _ in range(n)]


# ------------------------------------------------------------------------------------ case draws
@pytest.mark.parametrize(
    ("exponent", "expected"),
    [
        (0.5, {"a": 2 / 14, "b": 4 / 14, "c": 8 / 14}),  # ∝ √n
        (0.0, {"a": 4 / 84, "b": 16 / 84, "c": 64 / 84}),  # uniform over cases
        (1.0, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),  # uniform over datasets
    ],
)
def test_dataset_frequencies_follow_n_to_the_one_minus_exponent(exponent, expected):
    ids = _dataset_ids()
    assert dataset_probabilities(SIZES, exponent=exponent) == pytest.approx(expected)
    sampler = PatchSampler(ids, patch_zyx=(4, 4, 4), rngs=stream_rngs(7, 0, 0), exponent=exponent)
    draws = 30_000
    counts = np.bincount(sampler.draw_cases(draws), minlength=len(ids))
    per_dataset = dict.fromkeys(SIZES, 0)
    for i, c in enumerate(counts):
        per_dataset[ids[i]] += int(c)
    for d, p in expected.items():
        sigma = np.sqrt(draws * p * (1 - p))
        assert abs(per_dataset[d] - draws * p) < 3.5 * sigma, (d, per_dataset[d], draws * p)
    observed = np.array([per_dataset[d] for d in SIZES])
    chi = stats.chisquare(observed, draws * np.array([expected[d] for d in SIZES]))
    assert chi.pvalue > 1e-3
    # within a dataset every case is equally likely
    c_counts = counts[np.array(ids) == "c"]
    assert stats.chisquare(c_counts).pvalue > 1e-3


def test_case_probabilities_are_inverse_sqrt_n():
    p = case_probabilities(["x"] * 9 + ["y"], exponent=0.5)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[-1] == pytest.approx(1 / 3)  # 9^-0.5 : 1^-0.5


# ------------------------------------------------------------------------------------ centres
def _case(shape=(12, 20, 20)):
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:9, 4:10] = 1  # a big class
    label[8, 15, 15] = 2  # a one-voxel class
    rows = [[c - 1, *idx] for c in (1, 2) for idx in np.argwhere(label == c)]
    return label, np.asarray(rows, dtype=np.int32)


def test_foreground_fraction_and_forced_centres_hit_their_class():
    label, fg = _case()
    rng = stream_rngs(3, 0, 0)[1]
    draws = [
        draw_center(rng, shape_zyx=label.shape, patch_zyx=(8, 8, 8), fg_locations=fg, fg_fraction=1 / 3)
        for _ in range(6000)
    ]
    forced = [d for d in draws if d.fg_class >= 0]
    n = len(draws)
    assert abs(len(forced) - n / 3) < 3.5 * np.sqrt(n * (1 / 3) * (2 / 3))
    for d in forced:  # raw value = local class + 1 in this case
        assert label[d.center_zyx] == d.fg_class + 1
    # classes are picked uniformly, not by voxel count (216 voxels vs 1)
    share_small = np.mean([d.fg_class == 1 for d in forced])
    assert abs(share_small - 0.5) < 3.5 * np.sqrt(0.25 / len(forced))


def test_classes_present_restricts_foreground_and_empty_cases_fall_back():
    label, fg = _case()
    rng = np.random.default_rng(0)
    got = {
        draw_center(
            rng,
            shape_zyx=label.shape,
            patch_zyx=(4, 4, 4),
            fg_locations=fg,
            classes_present=[1],
            fg_fraction=1,
        ).fg_class
        for _ in range(50)
    }
    assert got == {1}
    empty = np.zeros((0, 4), np.int32)
    d = draw_center(rng, shape_zyx=label.shape, patch_zyx=(4, 4, 4), fg_locations=empty, fg_fraction=1.0)
    assert d.fg_class == -1


def _nnunet_v1_do_oversample(batch_size: int, batch_idx: int, percent: float) -> bool:
    """nnU-Net v1 ``DataLoader3D.get_do_oversample``, transcribed."""
    return not batch_idx < round(batch_size * (1 - percent))


def _nnunet_v1_ddp_percents(global_batch: int, world_size: int, percent: float) -> list[float]:
    """nnU-Net v1 ``nnUNetTrainerV2_DDP.set_batch_size_and_oversample`` (distribute_batch_size=True)."""
    per_gpu = int(np.ceil(global_batch / world_size))
    sizes: list[int] = []
    out = []
    for rank in range(world_size):
        size = per_gpu - max((rank + 1) * per_gpu - global_batch, 0)
        sizes.append(size)
        low, high = sum(sizes[:-1]), sum(sizes)
        if high / global_batch < 1 - percent:
            out.append(0.0)
        elif low / global_batch > 1 - percent:
            out.append(1.0)
        else:
            out.append(1 - ((1 - percent) - low / global_batch) / ((high - low) / global_batch))
    return out


@pytest.mark.parametrize("percent", [1 / 3, 0.33])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 6, 8, 12])
def test_fixed_foreground_slots_follow_nnunet_v1(batch_size, percent):
    want = tuple(_nnunet_v1_do_oversample(batch_size, i, percent) for i in range(batch_size))
    assert fixed_foreground_slots(batch_size, percent) == want


@pytest.mark.parametrize(("local_batch", "world"), [(2, 2), (1, 4), (3, 2)])
def test_fixed_foreground_slots_across_ranks_match_nnunet_v1_ddp(local_batch, world):
    percents = _nnunet_v1_ddp_percents(local_batch * world, world, 0.33)
    for rank in range(world):
        want = tuple(_nnunet_v1_do_oversample(local_batch, i, percents[rank]) for i in range(local_batch))
        assert fixed_foreground_slots(local_batch, 0.33, rank=rank, world_size=world) == want, rank
    # the paper's 2 GPUs x 2: one forced patch per global batch of 4, the last slot of rank 1
    assert fixed_foreground_slots(2, 1 / 3, rank=0, world_size=2) == (False, False)
    assert fixed_foreground_slots(2, 1 / 3, rank=1, world_size=2) == (False, True)


def test_fixed_mode_forces_the_same_count_in_every_batch_and_coin_mode_does_not():
    label, fg = _case()
    batch = 4

    def forced_per_batch(mode: str) -> list[int]:
        sampler = PatchSampler(
            ["a"], patch_zyx=(4, 4, 4), rngs=stream_rngs(5, 0, 0), fg_mode=mode, batch_size=batch
        )
        flags = [
            sampler.draw_center(shape_zyx=label.shape, fg_locations=fg).fg_class >= 0
            for _ in range(400 * batch)
        ]
        return [sum(flags[i : i + batch]) for i in range(0, len(flags), batch)]

    fixed = forced_per_batch("fixed")
    assert set(fixed) == {1}  # round(4 * 2/3) = 3: exactly the last of four
    coin = forced_per_batch("coin")
    # a coin per patch: P(no forced patch in a batch of 4) = (2/3)^4 = 0.198
    share_none = np.mean([c == 0 for c in coin])
    assert abs(share_none - (2 / 3) ** 4) < 3.5 * np.sqrt(0.198 * 0.802 / len(coin))
    schedule = ForegroundSchedule(mode="fixed", batch_size=3, rank=1, world_size=2)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert [schedule.next(rng) for _ in range(6)] == [False, True, True] * 2  # global slots 3..5 of 6
    assert rng.bit_generator.state == state  # the fixed mode draws no random number
    with pytest.raises(ValueError, match="fg_mode"):
        ForegroundSchedule(mode="sometimes")  # type: ignore[arg-type]


def test_coin_mode_stream_is_unchanged_by_the_schedule():
    """The coin moved into ForegroundSchedule draws the same number at the same point as before."""
    label, fg = _case()
    sampler = PatchSampler(["a"], patch_zyx=(4, 4, 4), rngs=stream_rngs(9, 0, 0))
    got = [sampler.draw_center(shape_zyx=label.shape, fg_locations=fg) for _ in range(200)]
    rng = stream_rngs(9, 0, 0)[1]
    want = [
        draw_center(rng, shape_zyx=label.shape, patch_zyx=(4, 4, 4), fg_locations=fg, fg_fraction=1 / 3)
        for _ in range(200)
    ]
    assert got == want


def test_random_centres_cover_the_volume_and_keep_the_patch_inside():
    rng = np.random.default_rng(1)
    shape, patch = (10, 30, 7), (4, 8, 12)
    corners = []
    for _ in range(3000):
        c = random_center(rng, shape_zyx=shape, patch_zyx=patch)
        corners.append([ci - p // 2 for ci, p in zip(c, patch)])
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    # large axes: every in-volume position, including both ends
    assert (lo[0], hi[0]) == (0, 10 - 4) and (lo[1], hi[1]) == (0, 30 - 8)
    # volume smaller than the patch (7 < 12, need = 5): the volume lies inside the padded patch
    assert (lo[2], hi[2]) == (-3, -2)
    for corner in corners:
        box = crop_box([c + p // 2 for c, p in zip(corner, patch)], patch, shape)
        assert box.source[0] == slice(corner[0], corner[0] + 4)
        assert box.source[2] == slice(0, 7)


# ------------------------------------------------------------------------------------ determinism
def test_streams_are_reproducible_and_distinct_per_rank_and_worker():
    def seq(seed, rank, worker, epoch=0):
        case_rng, center_rng = stream_rngs(seed, rank, worker, epoch=epoch)
        return case_rng.integers(0, 1 << 30, 8).tolist() + center_rng.integers(0, 1 << 30, 8).tolist()

    assert seq(1, 0, 0) == seq(1, 0, 0)
    distinct = {tuple(seq(*k)) for k in [(1, 0, 0), (1, 1, 0), (1, 0, 1), (2, 0, 0), (1, 0, 0, 1)]}
    assert len(distinct) == 5
    a = stream_rngs(1, 0, 0)
    assert a[0].integers(0, 1 << 30, 8).tolist() != a[1].integers(0, 1 << 30, 8).tolist()


def test_stochastic_rounding_keeps_the_mean():
    rng = np.random.default_rng(5)
    counts = stream_patch_counts(rng, np.full(20_000, 1.3))
    assert set(np.unique(counts)) == {1, 2}
    assert abs(counts.mean() - 1.3) < 3.5 * np.sqrt(0.21 / 20_000)


# ------------------------------------------------------------------------------------ partitions
@pytest.mark.parametrize(("n", "world", "workers"), [(10, 2, 2), (7, 3, 1), (3, 2, 2), (64, 4, 3), (0, 1, 2)])
def test_partition_is_disjoint_and_complete(n, world, workers):
    items = [f"shard-{i}" for i in range(n)]
    parts = [partition(items, r, world, w, workers) for r in range(world) for w in range(workers)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_partition_rejects_bad_slots():
    with pytest.raises(ValueError, match="rank 2"):
        partition([1, 2], 2, 2)
    with pytest.raises(ValueError, match="worker 1"):
        partition([1, 2], 0, 1, 1, 1)


# ------------------------------------------------------------------------------------ folds
def test_kfold_folds_are_disjoint_complete_balanced_and_shuffled():
    ids = [f"case_{i:03d}" for i in range(23)][::-1]
    vals = [kfold_split(ids, f)[1] for f in range(5)]
    assert sorted(x for v in vals for x in v) == sorted(ids)
    assert sorted(map(len, vals)) == [4, 4, 5, 5, 5]
    for f in range(5):
        train, val = kfold_split(ids, f)
        assert not set(train) & set(val) and len(train) + len(val) == 23
        assert train == sorted(train) and val == sorted(val)
    assert vals[0] != sorted(ids)[:5]  # shuffled, not contiguous
    assert kfold_split(ids, 2) == kfold_split(sorted(ids), 2)  # input order does not matter
    assert kfold_split(ids, 2, seed=1) != kfold_split(ids, 2)


def test_split_keys_is_per_dataset():
    keys = [("big", f"c{i}") for i in range(10)] + [("tiny", "t0"), ("tiny", "t1")]
    train, val = split_keys(keys, 0)
    assert len([k for k in val if k[0] == "big"]) == 2
    assert ("tiny", "t0") in train and ("tiny", "t1") in train  # too few cases to split
    assert split_keys(keys, None) == (sorted(keys), [])
    # the same split over manifest-like entries returns the entries themselves
    entries = [{"dataset_id": d, "case_id": c, "zarr_path": f"zarr/{d}/{c}.zarr"} for d, c in keys]
    e_train, e_val = split_cases(entries, 0)
    assert [(e["dataset_id"], e["case_id"]) for e in e_val] == val
    assert [(e["dataset_id"], e["case_id"]) for e in e_train] == train
    assert split_cases([f"{d}__{c}" for d, c in keys], 0)[1] == [f"{d}__{c}" for d, c in val]


# ------------------------------------------------------------------------------------ patch boxes
@pytest.mark.parametrize(
    ("center", "patch", "shape", "source", "dest"),
    [
        ((5,), (4,), (10,), [(3, 7)], [(0, 4)]),  # interior
        ((1,), (4,), (10,), [(0, 3)], [(1, 4)]),  # lower border: one voxel of padding
        ((9,), (4,), (10,), [(7, 10)], [(0, 3)]),  # upper border
        ((3,), (8,), (5,), [(0, 5)], [(1, 6)]),  # volume smaller than the patch: padded both sides
        ((30,), (4,), (10,), [(0, 0)], [(0, 0)]),  # no overlap
    ],
)
def test_crop_box_table(center, patch, shape, source, dest):
    box = crop_box(center * 3, patch * 3, shape * 3)
    assert [(s.start, s.stop) for s in box.source] == source * 3
    assert [(s.start, s.stop) for s in box.dest] == dest * 3


def test_read_patch_matches_padded_numpy_for_zarr_and_numpy(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(9, 13, 11)).astype(np.int16)
    z = zarr.create_array(tmp_path / "v.zarr", shape=vol.shape, chunks=(4, 4, 4), dtype="int16")
    z[:] = vol
    patch = (6, 8, 16)
    padded = np.pad(vol, [(p, p) for p in patch], constant_values=-7)
    for center in [(0, 0, 0), (4, 6, 5), (8, 12, 10), (2, 11, 1)]:
        lo = [c - p // 2 + p for c, p in zip(center, patch)]
        ref = padded[tuple(slice(a, a + p) for a, p in zip(lo, patch))]
        for arr in (vol, z):
            got = read_patch(arr, center, patch, pad_value=-7)
            assert got.dtype == np.int16 and got.shape == patch
            np.testing.assert_array_equal(got, ref)
    # an unpadded patch of a numpy volume is a copy, never a view
    inner = read_patch(vol, (4, 6, 5), (4, 4, 4))
    inner[...] = 0
    assert vol[2:6, 4:8, 3:7].any()
    # a transform applies to the volume voxels only; padding keeps the pad value exactly
    got = read_patch(vol, (0, 0, 0), patch, pad_value=0.0, dtype=np.float32, transform=lambda r: r + 0.5)
    assert got.dtype == np.float32 and got[0, 0, 0] == 0.0 and got[3, 4, 8] == vol[0, 0, 0] + 0.5
