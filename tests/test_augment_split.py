"""Parameters first, then the read: only rotated or scaled samples read the enlarged patch
(``augment_split``), and the batch equals reading every sample enlarged and augmenting it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from multitalent.data.augment import (
    AugmentConfig,
    all_on_config,
    augment_batch,
    augment_split,
    read_shape_zyx,
    sample_params,
)

OUT = (8, 12, 12)


def _centre(t: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The centre ``shape`` of the last three axes, as a loader reading that size at the same centre."""
    offsets = [(i - o) // 2 for i, o in zip(t.shape[-3:], shape)]
    return t[(..., *(slice(f, f + o) for f, o in zip(offsets, shape)))].contiguous()


def _batch(b: int, read: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((b, 1, *read), generator=g)
    label = torch.randint(0, 5, (b, *read), generator=g, dtype=torch.uint8)
    return image, label


@pytest.mark.parametrize(
    "config", [AugmentConfig(), all_on_config(), AugmentConfig(p_rotation=0.5, p_scaling=0.5)]
)
@pytest.mark.parametrize("seed", range(6))
def test_split_equals_the_enlarged_read_bit_for_bit(config, seed):
    b = 5
    read = read_shape_zyx(OUT, config)
    image, label = _batch(b, read, seed)
    params = sample_params(config, b, torch.Generator().manual_seed(100 + seed))
    wide_b = params.reads_beyond_patch_b
    expected = augment_batch(
        image, label, config=config, generator=torch.Generator(), out_shape_zyx=OUT, params=params
    )
    wide = (image[wide_b], label[wide_b]) if bool(wide_b.any()) else None
    narrow = (_centre(image[~wide_b], OUT), _centre(label[~wide_b], OUT)) if bool((~wide_b).any()) else None
    got = augment_split(wide, narrow, params, config=config, out_shape_zyx=OUT)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("out", [(8, 12, 12), (7, 11, 13), (9, 10, 11)])
def test_the_loaders_reads_at_one_centre_agree_for_odd_and_even_patch_sizes(out):
    """What the loader does: read the enlarged patch and the patch itself around the same voxel
    (``read_patch``); the narrow read equals the enlarged one's centre crop, odd sizes included (the read
    size keeps the patch size's parity)."""
    import numpy as np

    from multitalent.data.patches import read_patch

    config = AugmentConfig()
    read = read_shape_zyx(out, config)
    assert all(r >= o and (r - o) % 2 == 0 for r, o in zip(read, out) if o % 2)
    volume = np.random.default_rng(1).normal(size=(40, 50, 60)).astype(np.float32)
    for centre in [(20, 25, 30), (3, 4, 58)]:  # inside, and at the border (padding)
        wide = torch.from_numpy(read_patch(volume, centre, read, pad_value=-9.0))
        narrow = torch.from_numpy(read_patch(volume, centre, out, pad_value=-9.0))
        assert torch.equal(_centre(wide, out), narrow), (out, centre)


def test_the_default_config_reads_the_enlarged_patch_for_about_a_third():
    """p 0.2 rotation, p 0.2 scaling: 1 - 0.8 * 0.8 = 0.36 of the samples need the enlarged read."""
    params = sample_params(AugmentConfig(), 20_000, torch.Generator().manual_seed(0))
    share = float(params.reads_beyond_patch_b.double().mean())
    assert abs(share - 0.36) < 0.015


def test_a_group_of_the_wrong_size_is_refused_with_the_counts():
    config = all_on_config()  # every sample rotates: all of them are wide
    params = sample_params(config, 3, torch.Generator().manual_seed(0))
    image, label = _batch(2, read_shape_zyx(OUT, config), 0)
    with pytest.raises(ValueError, match="2 wide samples given; the parameters make 3"):
        augment_split((image, label), None, params, config=config, out_shape_zyx=OUT)
    small = (_centre(image, (4, 4, 4)), _centre(label, (4, 4, 4)))
    with pytest.raises(ValueError, match="smaller than the output"):
        augment_split(small, None, params.subset(torch.tensor([0, 1])), config=config, out_shape_zyx=OUT)


def test_subset_keeps_the_chosen_samples_in_order():
    params = sample_params(all_on_config(), 4, torch.Generator().manual_seed(3))
    sub = params.subset(torch.tensor([2, 0]))
    sub.validate(2, 1)
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(sub, f.name), value[[2, 0]]), f.name
    assert sub.noise_seed == params.noise_seed
    assert sub.describe(0) == params.describe(2)
