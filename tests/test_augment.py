"""Batched nnU-Net-style augmentation: exactness of the spatial part, invariants of the intensity part,
parameter drawing, and the preview rendering."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalent.data.augment import (
    AugmentConfig,
    AugmentParams,
    all_on_config,
    augment_batch,
    identity_config,
    read_shape_zyx,
    sample_params,
)
from multitalent.data.augment_intensity import _std_mean, gaussian_kernels
from multitalent.data.augment_spatial import affine_grid
from multitalent.data.preview import render_grid, run
from multitalent.preprocess.plan import PLAN_FILE, Normalization, Plan

ALL_ON = all_on_config()
INTENSITY_ONLY = dataclasses.replace(ALL_ON, p_rotation=0.0, p_scaling=0.0, p_mirror_zyx=(0.0, 0.0, 0.0))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(
    b: int = 2, c: int = 1, shape: tuple[int, int, int] = (10, 12, 14), seed: int = 0, labels: int = 4
):
    g = _gen(seed)
    image = torch.randn((b, c, *shape), generator=g)
    label = torch.randint(0, labels, (b, *shape), generator=g).to(torch.uint8)
    return image, label


def _augment(image, label, params, out_shape_zyx=None):
    return augment_batch(
        image, label, config=identity_config(), generator=_gen(), params=params, out_shape_zyx=out_shape_zyx
    )


# ----------------------------------------------------------------------------- spatial
def test_identity_returns_input_exactly():
    image, label = _batch(b=3, c=2)
    out_img, out_lab = augment_batch(image, label, config=identity_config(), generator=_gen())
    assert torch.equal(out_img, image) and torch.equal(out_lab, label)
    assert out_img.data_ptr() != image.data_ptr()  # a new tensor, the input is never edited
    forced_img, forced_lab = _augment(image, label, AugmentParams.identity(3, 2))
    assert torch.equal(forced_img, image) and torch.equal(forced_lab, label)


def test_identity_with_out_shape_is_the_centre_crop():
    image, label = _batch(shape=(11, 14, 16))
    out_img, out_lab = _augment(image, label, AugmentParams.identity(2), out_shape_zyx=(6, 8, 9))
    assert torch.equal(out_img, image[:, :, 2:8, 3:11, 3:12])
    assert torch.equal(out_lab, label[:, 2:8, 3:11, 3:12])


@pytest.mark.parametrize(("axis", "dims"), [(0, (1, 2)), (1, (2, 0)), (2, (0, 1))])
def test_rotation_by_90_degrees_equals_rot90(axis, dims):
    image, label = _batch(b=1, c=2, shape=(9, 9, 9))
    params = AugmentParams.identity(1, 2)
    params.rotate_b[0] = True
    params.rotation_rad_b3[0, axis] = math.pi / 2
    out_img, out_lab = _augment(image, label, params)
    assert torch.allclose(out_img, torch.rot90(image, 1, [d + 2 for d in dims]), atol=1e-5)
    assert torch.equal(out_lab, torch.rot90(label, 1, [d + 1 for d in dims]))
    params.rotation_rad_b3[0, axis] = -math.pi / 2
    back_img, back_lab = _augment(out_img, out_lab, params)
    assert torch.allclose(back_img, image, atol=1e-5) and torch.equal(back_lab, label)


@pytest.mark.parametrize("resampled", [False, True])
def test_mirroring_equals_flip(resampled):
    image, label = _batch(b=2, c=2, shape=(8, 10, 12))
    params = AugmentParams.identity(2, 2)
    params.mirror_b3[0] = torch.tensor([True, False, True])
    params.mirror_b3[1] = torch.tensor([False, True, False])
    # a zero-angle rotation sends the sample through grid_sample with the flip folded into the affine
    params.rotate_b[:] = resampled
    out_img, out_lab = _augment(image, label, params)
    expect_img = [image[0].flip([1, 3]), image[1].flip([2])]
    expect_lab = [label[0].flip([0, 2]), label[1].flip([1])]
    for b in range(2):
        if resampled:
            assert torch.allclose(out_img[b], expect_img[b], atol=1e-5)
        else:
            assert torch.equal(out_img[b], expect_img[b])
        assert torch.equal(out_lab[b], expect_lab[b])


def test_scaling_zooms_about_the_centre():
    # scale 2 samples every other voxel around the centre: output voxel p reads input 2 (p - c) + c
    image = torch.arange(17.0)[None, None, :, None, None].expand(1, 1, 17, 17, 17).contiguous()
    label = torch.zeros((1, 17, 17, 17), dtype=torch.uint8)
    params = AugmentParams.identity(1)
    params.scale_b[0], params.scale_factor_b[0] = True, 2.0
    out_img, _ = _augment(image, label, params)
    profile = out_img[0, 0, :, 8, 8]
    assert torch.allclose(profile[4:13], torch.arange(0.0, 17.0, 2.0), atol=1e-4)
    assert profile[0] == 0 and profile[-1] == 0  # outside the input: zero padding


@pytest.mark.parametrize("scale", [0.77, 1.31])
def test_scaling_without_rotation_matches_the_grid_path(scale):
    image, label = _batch(b=1, c=2, shape=(13, 16, 18), labels=6)
    separable = AugmentParams.identity(1, 2)
    separable.scale_b[0], separable.scale_factor_b[0] = True, scale
    separable.mirror_b3[0] = torch.tensor([False, True, True])
    gridded = AugmentParams.identity(1, 2)
    gridded.scale_b[0], gridded.scale_factor_b[0] = True, scale
    gridded.mirror_b3[0] = torch.tensor([False, True, True])
    gridded.rotate_b[0] = True  # zero angles: same affine through grid_sample
    a_img, a_lab = _augment(image, label, separable, out_shape_zyx=(9, 12, 11))
    b_img, b_lab = _augment(image, label, gridded, out_shape_zyx=(9, 12, 11))
    assert torch.allclose(a_img, b_img, atol=1e-5)
    assert torch.equal(a_lab, b_lab)


def test_separable_affine_grid_equals_torch():
    theta = torch.randn((3, 3, 4), generator=_gen(4))
    ours = affine_grid(theta, out_shape_zyx=(5, 6, 7))
    ref = torch.nn.functional.affine_grid(theta, [3, 1, 5, 6, 7], align_corners=False)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_mixed_batch_resamples_only_transformed_samples():
    image, label = _batch(b=3, shape=(12, 12, 12))
    params = AugmentParams.identity(3)
    params.rotate_b[1] = True
    params.rotation_rad_b3[1] = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    out_img, out_lab = _augment(image, label, params, out_shape_zyx=(8, 8, 8))
    crop = (slice(2, 10),) * 3
    for b in (0, 2):
        assert torch.equal(out_img[b], image[b][(slice(None), *crop)])
        assert torch.equal(out_lab[b], label[b][crop])
    assert not torch.equal(out_img[1], image[1][(slice(None), *crop)])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_label_values_stay_in_the_original_set(dtype):
    image, label = _batch(b=4, shape=(12, 14, 16))
    label = (label * 3 + 1).to(dtype)  # values {1, 4, 7, 10}; 0 only from padding
    label[:, :2] = 0
    for seed in range(4):
        _, out_lab = augment_batch(
            image, label, config=ALL_ON, generator=_gen(seed), out_shape_zyx=(8, 10, 12)
        )
        assert out_lab.dtype == dtype and out_lab.shape == (4, 8, 10, 12)
        assert set(out_lab.unique().tolist()) <= {0, 1, 4, 7, 10}


def test_out_shape_and_errors():
    image, label = _batch(b=2, c=3, shape=(10, 12, 14))
    out_img, out_lab = augment_batch(image, label, config=ALL_ON, generator=_gen(), out_shape_zyx=(5, 7, 9))
    assert out_img.shape == (2, 3, 5, 7, 9) and out_lab.shape == (2, 5, 7, 9)
    assert out_img.dtype == torch.float32 and torch.isfinite(out_img).all()
    with pytest.raises(ValueError, match="out_shape_zyx"):
        augment_batch(image, label, config=ALL_ON, generator=_gen(), out_shape_zyx=(11, 7, 9))
    with pytest.raises(ValueError, match="float32"):
        augment_batch(image.double(), label, config=ALL_ON, generator=_gen())
    with pytest.raises(ValueError, match="integer"):
        augment_batch(image, label.float(), config=ALL_ON, generator=_gen())
    with pytest.raises(ValueError, match="does not match"):
        augment_batch(image, label[:, :5], config=ALL_ON, generator=_gen())
    with pytest.raises(ValueError, match="rotate_b"):
        _augment(image, label, AugmentParams.identity(3, 3))


def test_read_shape_covers_the_rotated_patch():
    config = AugmentConfig()
    assert read_shape_zyx((96, 192, 192), identity_config()) == (96, 192, 192)
    z, y, x = read_shape_zyx((96, 192, 192), config)
    # in-plane 30° rotation of a 192 x 192 square: 192 (cos 30° + sin 30°) = 262.3, / 0.85
    assert (y, x) == (308, 308) and z == int((96 * math.cos(math.pi / 6) + 192 * 0.5) / 0.85)


# ----------------------------------------------------------------------------- intensity
def test_intensity_transforms_never_touch_labels():
    image, label = _batch(b=3, c=2)
    out_img, out_lab = augment_batch(image, label, config=INTENSITY_ONLY, generator=_gen(1))
    assert torch.equal(out_lab, label)
    assert not torch.allclose(out_img, image)


def test_brightness_multiplies_selected_samples_only():
    image, label = _batch(b=3, c=2)
    params = AugmentParams.identity(3, 2)
    params.brightness_b[1] = True
    params.brightness_bc[1] = torch.tensor([1.2, 0.8])
    out_img, _ = _augment(image, label, params)
    assert torch.equal(out_img[0], image[0]) and torch.equal(out_img[2], image[2])
    assert torch.allclose(out_img[1, 0], image[1, 0] * 1.2) and torch.allclose(
        out_img[1, 1], image[1, 1] * 0.8
    )


def test_contrast_keeps_the_range_and_gamma_keeps_mean_and_std():
    image, label = _batch(b=3, c=2, shape=(8, 9, 10))
    params = AugmentParams.identity(3, 2)
    params.contrast_b[0] = params.contrast_b[2] = True
    params.contrast_bc[:] = 1.25
    out_img, _ = _augment(image, label, params)
    for b in (0, 2):
        assert out_img[b].amin() >= image[b].amin() and out_img[b].amax() <= image[b].amax()
        assert out_img[b].std() > image[b].std()  # stretched about the mean, clipped at the old range
    for invert in (False, True):
        params = AugmentParams.identity(3, 2)
        (params.gamma_inverted_b if invert else params.gamma_b)[0] = True
        (params.gamma_inverted_bc if invert else params.gamma_bc)[0] = torch.tensor([0.7, 1.5])
        out_img, _ = _augment(image, label, params)
        flat_in, flat_out = image[0].flatten(1), out_img[0].flatten(1)
        assert torch.allclose(flat_out.mean(1), flat_in.mean(1), atol=1e-5)
        assert torch.allclose(flat_out.std(1), flat_in.std(1), atol=1e-5)
        assert not torch.allclose(flat_out, flat_in, atol=1e-3)
        assert torch.equal(out_img[1:], image[1:])


def test_gamma_matches_the_formula_on_a_ramp():
    ramp = torch.linspace(0.0, 1.0, 4 * 4 * 4).reshape(1, 1, 4, 4, 4)
    label = torch.zeros((1, 4, 4, 4), dtype=torch.uint8)
    params = AugmentParams.identity(1)
    params.gamma_b[0], params.gamma_bc[0, 0] = True, 2.0
    out_img, _ = _augment(ramp, label, params)
    z = ramp**2  # range [0, 1] already, so the base is the ramp itself
    expect = (z - z.mean()) * ramp.std() / z.std() + ramp.mean()
    assert torch.allclose(out_img, expect, atol=1e-6)


def test_blur_smooths_selected_channels_and_keeps_a_constant():
    image, label = _batch(b=2, c=2, shape=(12, 12, 12))
    image[1, 1] = 3.0
    params = AugmentParams.identity(2, 2)
    params.blur_bc[0, 1] = params.blur_bc[1, 1] = True
    params.blur_sigma_bc3[0, 1] = torch.tensor([0.5, 0.8, 1.0])
    out_img, _ = _augment(image, label, params)
    assert torch.equal(out_img[:, 0], image[:, 0])
    assert out_img[0, 1].std() < 0.8 * image[0, 1].std()
    assert torch.allclose(out_img[1, 1], torch.full_like(out_img[1, 1], 3.0), atol=1e-5)
    kernels = gaussian_kernels(torch.tensor([0.5, 1.0]), 3)
    assert torch.allclose(kernels.sum(1), torch.ones(2)) and torch.equal(kernels, kernels.flip(1))


def test_fast_std_mean_matches_torch():
    flat = (torch.randn((3, 2, 5000), generator=_gen(2)) * torch.tensor([0.1, 3.0])[:, None] + 2.0).float()
    std, mean = _std_mean(flat)
    ref_std, ref_mean = torch.std_mean(flat, dim=-1)
    assert torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(std, ref_std, rtol=1e-4)
    std0, _ = _std_mean(torch.full((1, 1, 100), 0.0))
    assert float(std0) == 0.0


def test_lowres_and_noise_change_only_selected_volumes():
    image, label = _batch(b=2, c=2, shape=(12, 12, 12))
    params = AugmentParams.identity(2, 2)
    params.lowres_bc[0, 1], params.lowres_zoom_bc[0, 1] = True, 0.5
    params.noise_b[1], params.noise_std_b[1] = True, 0.1
    out_img, _ = _augment(image, label, params)
    assert torch.equal(out_img[0, 0], image[0, 0])
    assert not torch.allclose(out_img[0, 1], image[0, 1])
    noise = out_img[1] - image[1]
    assert 0.07 < float(noise.std()) < 0.13 and abs(float(noise.mean())) < 0.02


# ----------------------------------------------------------------------------- drawing
def test_per_sample_parameters_differ_within_a_batch():
    params = sample_params(ALL_ON, 4, _gen(3), n_channels=2)
    assert len({tuple(r.tolist()) for r in params.rotation_rad_b3}) == 4
    assert len(set(params.scale_factor_b.tolist())) == 4
    assert len(set(params.gamma_bc.flatten().tolist())) == 8
    image, label = _batch(b=1, c=2, shape=(10, 10, 10))
    image, label = image.expand(4, -1, -1, -1, -1).contiguous(), label.expand(4, -1, -1, -1).contiguous()
    out_img, _ = augment_batch(image, label, config=ALL_ON, generator=_gen(3))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out_img[i], out_img[j])


def test_same_seed_same_result_other_seed_differs():
    image, label = _batch(b=4, c=2)
    runs = [
        augment_batch(image, label, config=ALL_ON, generator=_gen(s), out_shape_zyx=(8, 8, 8))
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.allclose(runs[0][0], runs[2][0])


def test_drawn_frequencies_follow_the_config():
    config = AugmentConfig()
    params = sample_params(config, 20000, _gen(7), n_channels=1)
    assert abs(float(params.rotate_b.double().mean()) - 0.2) < 0.015
    assert abs(float(params.mirror_b3.double().mean()) - 0.5) < 0.015
    assert abs(float(params.blur_bc.double().mean()) - 0.1) < 0.01  # p 0.2 per sample x 0.5 per channel
    assert abs(float(params.gamma_b.double().mean()) - 0.3) < 0.015
    deg = torch.rad2deg(params.rotation_rad_b3[params.rotate_b])
    assert deg.abs().max() <= 30.0 and deg.abs().max() > 29.0
    factors = params.brightness_bc.flatten()
    assert factors.min() >= 0.75 and factors.max() <= 1.25
    assert abs(float((factors < 1).double().mean()) - 0.5) < 0.015  # nnU-Net's below/above-one split
    assert torch.equal(
        params.scale_factor_b[~params.scale_b], torch.ones(int((~params.scale_b).sum())).double()
    )


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="p_noise"):
        AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError, match="scaling"):
        AugmentConfig(scaling=(1.4, 0.7))


def test_describe_names_the_transforms():
    params = AugmentParams.identity(2)
    params.rotate_b[0] = True
    params.rotation_rad_b3[0, 0] = math.radians(20)
    params.mirror_b3[0, 2] = True
    assert params.describe(0) == "rot+20/+0/+0 flipx"
    assert params.describe(1) == "none"


# ----------------------------------------------------------------------------- preview
def test_render_grid_shape_and_overlay():
    image = torch.linspace(-1, 1, 20 * 30).reshape(20, 30)
    label = torch.zeros((20, 30), dtype=torch.uint8)
    label[5:12, 8:20] = 2
    picture = render_grid([image, image], [label, torch.zeros_like(label)], ["a", "b"], columns=2)
    zoom = -(-192 // 30)
    assert picture.size == (2 * 30 * zoom + 2, 20 * zoom + 26)
    rgb = np.asarray(picture).astype(int)
    left, right = rgb[26:, : 30 * zoom], rgb[26:, 30 * zoom + 2 :]
    coloured = (np.abs(left[..., 0] - left[..., 1]) > 30).sum()
    assert coloured > 0.5 * 7 * 12 * zoom * zoom  # the label area is tinted
    assert (np.abs(right[..., 0] - right[..., 1]) > 30).sum() == 0  # no label, no colour
    with pytest.raises(ValueError, match="same non-zero number"):
        render_grid([image], [label, label], ["a"])


@dataclass
class _Case:
    image_zyx: np.ndarray
    label_zyx: np.ndarray
    fg_locations: np.ndarray
    spacing_zyx_mm: tuple[float, float, float] = (1.5, 1.0, 1.0)
    geometry: dict = field(default_factory=dict)
    classes_present: list[int] = field(default_factory=lambda: [0])


def test_preview_cli_writes_a_png(tmp_path: Path):
    from PIL import Image

    from multitalent.shards import write_case_zarr

    rng = np.random.default_rng(0)
    image = rng.integers(-900, 200, size=(20, 40, 40)).astype(np.int16)
    label = np.zeros((20, 40, 40), dtype=np.uint8)
    label[6:14, 10:30, 12:28] = 1
    fg = np.argwhere(label == 1)[::50]
    fg = np.concatenate([np.zeros((len(fg), 1), dtype=np.int32), fg.astype(np.int32)], axis=1)
    write_case_zarr(tmp_path, _Case(image, label, fg), dataset_id="d1", case_id="c1")
    Plan(
        catalog_name="test",
        catalog_hash="0" * 64,
        classes=("organ",),
        normalization=Normalization(clip=(-900.0, 200.0), mean=-300.0, std=300.0),
    ).save(tmp_path / PLAN_FILE)
    out = tmp_path / "grid.png"
    args = argparse.Namespace(shards=str(tmp_path), out=str(out), n=3, patch="8,16,16", seed=1)
    assert run(args) == 0
    picture = Image.open(out)
    zoom = 192 // 16
    assert picture.size == (2 * 16 * zoom + 2, 3 * (16 * zoom + 26) + 2 * 2)
    with pytest.raises(FileNotFoundError, match=r"plan\.json"):
        run(argparse.Namespace(shards=str(tmp_path / "missing"), out=str(out), n=1, patch="8,16,16", seed=0))
