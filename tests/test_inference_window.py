"""Sliding window and mirroring against direct implementations and MONAI's ``sliding_window_inference``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from multitalent.inference.sliding_window import (
    SlidingWindowSettings,
    gaussian_importance_map,
    mirror_combinations,
    mirrored_probabilities,
    sliding_window,
    window_starts,
)


def small_net(seed: int = 0, k: int = 3) -> torch.nn.Module:
    """Not translation invariant at the borders (zero padding), so window placement matters."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, k, 3, padding=1)
    ).eval()


@pytest.mark.parametrize(
    ("size", "patch", "step", "expected"),
    [
        (16, 16, 0.5, [0]),
        (24, 16, 0.5, [0, 8]),
        (25, 16, 0.5, [0, 4, 9]),  # ceil(9 / 8) + 1 = 3 windows, spread evenly
        (40, 16, 0.5, [0, 8, 16, 24]),
        (40, 16, 1.0, [0, 12, 24]),
    ],
)
def test_window_starts_follow_nnunet(size, patch, step, expected):
    assert window_starts(size, patch, step) == expected


def test_gaussian_map_matches_direct_formula_and_monai():
    from monai.data.utils import compute_importance_map

    patch = (6, 9, 12)
    got = gaussian_importance_map(patch).numpy()
    direct = np.ones(())
    for p in patch:
        d = np.arange(p) - (p - 1) / 2
        direct = direct[..., None] * np.exp(-(d**2) / (2 * (p / 8) ** 2))
    direct = np.maximum(direct, max(direct.min(), 1e-3))
    assert np.allclose(got, direct, rtol=1e-6, atol=0)
    monai = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125).numpy()
    assert np.allclose(got, monai, rtol=1e-5, atol=1e-7)
    for axis in range(3):  # centred on the patch: symmetric under every flip
        assert np.allclose(got, np.flip(got, axis))


def test_one_window_equals_a_whole_volume_forward():
    net = small_net()
    x = torch.randn(1, 8, 12, 16)
    out = sliding_window(net, x, SlidingWindowSettings(patch_zyx=(8, 12, 16)))
    with torch.no_grad():
        direct = net(x[None])[0]
    assert out.shape == direct.shape
    assert torch.allclose(out, direct, atol=1e-6)


def test_mirroring_matches_a_direct_average_of_flips_with_lr_permutation():
    net = small_net(k=3)
    x = torch.randn(2, 1, 8, 12, 16)
    perm = [0, 2, 1]  # channels 1 and 2 are a left/right pair
    predict = mirrored_probabilities(net, mirror_axes=(0, 1, 2), lr_permutation=perm, channels=[2, 0])
    with torch.no_grad():
        got = predict(x)
        expected = torch.zeros(2, 3, 8, 12, 16)
        flips = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]
        assert len(flips) == 8
        for dims in flips:
            y = net(torch.flip(x, dims)) if dims else net(x)
            y = torch.flip(y, dims) if dims else y
            if 4 in dims:
                y = y[:, perm]
            expected += torch.sigmoid(y)
        expected /= 8
    assert torch.allclose(got, expected[:, [2, 0]], atol=1e-6)
    assert mirror_combinations(()) == [()]
    assert len(mirror_combinations((2, 0))) == 4
    with pytest.raises(ValueError, match="spatial axes"):
        mirror_combinations((3,))


@pytest.mark.parametrize("shape", [(20, 24, 48), (8, 30, 16), (5, 12, 40)])
def test_logits_equal_monai_sliding_window_inference(shape):
    """Same network, patch, overlap 0.5, Gaussian sigma 1/8, batch: MONAI's stitched logits.

    Shapes where both window rules place the same windows (MONAI: every int(p / 2), the last one
    moved back; nnU-Net: evenly spread): ``n = p + m p / 2``, or smaller than the patch (padded,
    centred, with the same constant)."""
    from monai.inferers import sliding_window_inference

    patch = (8, 12, 16)
    net = small_net(1, k=5)
    x = torch.randn(1, *shape)
    ours = sliding_window(net, x, SlidingWindowSettings(patch_zyx=patch, batch_size=3, pad_value=-1.5))
    with torch.no_grad():
        theirs = sliding_window_inference(
            x[None],
            roi_size=patch,
            sw_batch_size=3,
            predictor=net,
            overlap=0.5,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=-1.5,
        )[0]
    assert ours.shape == theirs.shape == (5, *shape)
    assert float((ours - theirs).abs().max()) < 1e-4


def test_many_windows_and_float16_accumulation_stay_close():
    net = small_net(2)
    x = torch.randn(1, 21, 27, 35)
    settings = SlidingWindowSettings(patch_zyx=(8, 12, 16), batch_size=4)
    predict = mirrored_probabilities(net, mirror_axes=(2,))
    full = sliding_window(predict, x, settings)
    half = sliding_window(
        predict, x, SlidingWindowSettings(patch_zyx=(8, 12, 16), accumulate_dtype=torch.float16)
    )
    assert half.dtype == torch.float16
    assert float((full - half.float()).abs().max()) < 2e-3
    assert float(full.min()) >= 0 and float(full.max()) <= 1


def test_bad_input_and_settings_raise():
    with pytest.raises(ValueError, match="step"):
        SlidingWindowSettings(patch_zyx=(8, 8, 8), step=0)
    with pytest.raises(ValueError, match=r"\(C, z, y, x\)"):
        sliding_window(small_net(), torch.zeros(8, 8, 8), SlidingWindowSettings(patch_zyx=(8, 8, 8)))


def _dense_reference(predict, x, patch, step=0.5):
    """The blend written out over the whole volume: sum_w g * y / sum_w g (no ring, no slabs)."""
    from multitalent.inference.sliding_window import window_slices

    g = gaussian_importance_map(patch).clone()
    out, weight = None, torch.zeros(x.shape[1:])
    for w in window_slices(x.shape[1:], patch, step):
        y = predict(x[(slice(None), *w)][None])[0]
        out = torch.zeros((y.shape[0], *x.shape[1:])) if out is None else out
        out[(slice(None), *w)] += y * g
        weight[w] += g
    return out / weight


@pytest.mark.parametrize("shape", [(45, 20, 24), (8, 12, 16), (13, 12, 16)])
def test_ring_of_patch_rows_equals_the_whole_volume_blend(shape):
    """Deep volumes wrap the ring of patch_z rows many times; slabs come out in order and complete."""
    from multitalent.inference.sliding_window import divide_slab, stitch

    net = small_net(3, k=4)
    x = torch.randn(1, *shape)
    patch = (8, 12, 16)
    with torch.no_grad():
        expected = _dense_reference(net, x, patch)
    slabs = []
    k = stitch(
        net,
        x,
        SlidingWindowSettings(patch_zyx=patch, batch_size=2),
        sink=lambda z0, s, w: slabs.append((z0, divide_slab(s, w))),
    )
    assert k == 4
    assert [z0 for z0, _ in slabs] == sorted(z0 for z0, _ in slabs)
    assert sum(p.shape[1] for _, p in slabs) == shape[0]
    got = torch.cat([p for _, p in slabs], dim=1)
    assert float((got - expected).abs().max()) < 1e-5


def test_sparse_store_keeps_each_class_inside_its_box_only():
    from multitalent.inference.probability_store import SparseProbabilities
    from multitalent.inference.sliding_window import stitch

    # class 0: a blob (logits high near the centre, very negative elsewhere); class 1: nothing anywhere
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (40, 24, 28)), indexing="ij")
    blob = 8.0 - 0.2 * ((zz - 20) ** 2 + (yy - 10) ** 2 + (xx - 14) ** 2)

    def net(b):  # a window of the blob field, read from the window's first channel
        return torch.stack([b[:, 0], torch.full_like(b[:, 0], -30.0)], dim=1)

    x = blob[None]
    settings = SlidingWindowSettings(patch_zyx=(8, 12, 16))
    predict = mirrored_probabilities(net, mirror_axes=())
    store = SparseProbabilities.empty(2, x.shape[1:])
    stitch(predict, x, settings, sink=store.add_slab)
    dense = sliding_window(predict, x, settings).numpy()
    got = store.dense()
    kept = dense > store.floor
    assert np.abs(got[kept] - dense[kept]).max() < 5e-4  # float16 inside the boxes
    assert np.all(got[~kept] <= store.floor)  # below the floor: zero, or kept inside a box
    assert np.all(store[1] == 0)
    # the blob's boxes hold far fewer values than the dense volume
    assert store.nbytes < 0.2 * dense[0].size * 2
    view = store.select([1, 0])
    assert len(view) == 2 and np.array_equal(view[1], store[0])
    with pytest.raises(IndexError):
        store[2]
