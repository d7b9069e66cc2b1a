"""Batched nnU-Net "moreDA" augmentation in torch, the same code on CPU and GPU.

nnU-Net v2 augments one sample at a time in a dozen CPU worker processes per GPU. Here a whole batch is
augmented at once with per-sample random parameters, either in the loader (CPU) or inside the training
step (GPU, where it costs milliseconds).

Drawing and applying are split: :func:`sample_params` draws every random decision of a batch into an
:class:`AugmentParams` (small CPU tensors, from a CPU ``torch.Generator``), :func:`apply_params` applies
them. :func:`augment_batch` does both. Tests force exact parameters by building ``AugmentParams`` by hand.

Order of operations follows nnU-Net's training transforms (no elastic deformation, as MultiTalent's
reference); where nnU-Net v1's moreDA (MultiTalent's reference) and v2 differ, v1 is followed (scale
draw, one blur sigma, cubic low-resolution upsampling; docs/fidelity.md lists what remains):

1. spatial: rotation (p 0.2 per sample; when it hits, all three axes get an angle in ±30°) and isotropic
   scaling (p 0.2, factor from 0.7–1.4, below or above 1 with equal odds as in v1; > 1 samples a
   larger region, so structures look smaller), sampled from
   the centre of the (larger) input patch; mirroring on each axis with p 0.5 is folded into the same
   affine (nnU-Net mirrors last; every intensity transform here is mirror-equivariant, so the
   distribution is the same). Image trilinear, labels nearest; outside the input: image 0, label 0.
   With ``config.mirror_swap`` (``laterality: swap``), a sample mirrored along x (the left-right axis)
   gets its lateral pairs' raw label values swapped, and samples of datasets with sided classes are
   not mirrored along x (:mod:`multitalent.data.laterality`).
   Rotated samples share one ``grid_sample`` call; scaled-only samples use the equivalent separable
   1-D interpolation (much cheaper); the others are cropped and flipped, never resampled (exact).
2. Gaussian noise, p 0.1, std ~ U(0, 0.1) shared by the channels (nnU-Net calls it "variance" but uses
   it as the standard deviation).
3. Gaussian blur, p 0.2, then each channel p 0.5, σ ~ U(0.5, 1) drawn per channel, shared by the axes,
   separable, reflect padding, kernel radius ceil(3σ).
4. multiplicative brightness, p 0.15, factor per channel from 0.75–1.25.
5. contrast, p 0.15, factor per channel from 0.75–1.25 about the channel mean, clipped back to the
   channel's previous range.
6. low-resolution simulation, p 0.25, then each channel p 0.5, zoom ~ U(0.5, 1) shared by the axes:
   nearest-exact downsampling, cubic-convolution upsampling (v1: cubic spline).
7. inverted gamma, p 0.1: gamma on the negated image; then 8. gamma, p 0.3; γ per channel from 0.7–1.5;
   both restore the channel's mean and standard deviation.

Brightness, contrast and gamma factors use nnU-Net's "BGContrast" draw: with p 0.5 uniform below 1,
else uniform above 1, so shrinking and growing are equally likely.

nnU-Net's ``do_dummy_2d_data_aug`` (in-plane-only spatial augmentation for strongly anisotropic patches)
is not implemented: the MultiTalent patch [96, 192, 192] at [1.5, 1, 1] mm is nearly isotropic in mm
(and nnU-Net only uses it when the patch's max/min edge ratio exceeds 3).

Determinism: every scalar parameter is drawn on the CPU from the caller's generator, so a seed gives the
same parameters on any device. The noise field is drawn on the data's device from a generator seeded
by a number drawn from the caller's generator: reproducible per device type, not bitwise equal between
CPU and CUDA.
"""

from __future__ import annotations

import math

import torch

from multitalent.data.augment_intensity import (
    apply_blur,
    apply_brightness,
    apply_contrast,
    apply_gamma,
    apply_lowres,
    apply_noise,
)
from multitalent.data.augment_params import (
    AugmentConfig,
    AugmentParams,
    Range,
    all_on_config,
    identity_config,
)
from multitalent.data.augment_spatial import apply_spatial

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "all_on_config",
    "apply_params",
    "augment_batch",
    "augment_split",
    "identity_config",
    "read_shape_zyx",
    "sample_params",
]


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _hits(p: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) < p


def _below_or_above_one(
    rng: Range, shape: tuple[int, ...], generator: torch.Generator, *, float32: bool = True
) -> torch.Tensor:
    """nnU-Net's draw for factors around 1 (contrast, gamma, and v1's scaling): p 0.5 uniform in
    [low, 1), else uniform in [max(low, 1), high)."""
    low, high = rng
    pick_low = _hits(0.5, shape, generator) & (low < 1.0)
    below = _uniform(low, min(1.0, high), shape, generator)
    above = _uniform(max(low, 1.0), high, shape, generator)
    out = torch.where(pick_low, below, above)
    return out.float() if float32 else out


def sample_params(
    config: AugmentConfig, batch_size: int, generator: torch.Generator, *, n_channels: int = 1
) -> AugmentParams:
    """Draw the parameters of one batch from ``generator`` (a CPU generator).

    Every draw happens whatever the probabilities, in a fixed order, so a seed gives the same stream of
    values under any config and changing one probability does not reshuffle the others.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"sample_params: generator must be a CPU generator, got {generator.device}")
    b, c = batch_size, n_channels
    g = generator
    rot_lo, rot_hi = (math.radians(a) for a in config.rotation_deg)
    rotate_b = _hits(config.p_rotation, (b,), g)
    rotation = _uniform(rot_lo, rot_hi, (b, 3), g)
    scale_b = _hits(config.p_scaling, (b,), g)
    # nnU-Net v1 (batchgenerators' augment_spatial): below or above 1 with equal odds, not U(0.7, 1.4).
    scale_factor = _below_or_above_one(config.scaling, (b,), g, float32=False)
    mirror_b3 = torch.rand((b, 3), generator=g, dtype=torch.float64) < torch.tensor(
        config.p_mirror_zyx, dtype=torch.float64
    )
    noise_b = _hits(config.p_noise, (b,), g)
    noise_std = _uniform(*config.noise_std, (b,), g).float()
    blur_b = _hits(config.p_blur, (b,), g)
    blur_bc = blur_b[:, None] & _hits(config.blur_p_per_channel, (b, c), g)
    # nnU-Net v1's moreDA: one sigma per channel, shared by the three axes.
    blur_sigma = _uniform(*config.blur_sigma, (b, c, 1), g).float().expand(b, c, 3).contiguous()
    brightness_b = _hits(config.p_brightness, (b,), g)
    brightness = _below_or_above_one(config.brightness, (b, c), g)
    contrast_b = _hits(config.p_contrast, (b,), g)
    contrast = _below_or_above_one(config.contrast, (b, c), g)
    lowres_b = _hits(config.p_lowres, (b,), g)
    lowres_bc = lowres_b[:, None] & _hits(config.lowres_p_per_channel, (b, c), g)
    lowres_zoom = _uniform(*config.lowres_zoom, (b, c), g).float()
    gamma_inverted_b = _hits(config.p_gamma_inverted, (b,), g)
    gamma_inverted = _below_or_above_one(config.gamma, (b, c), g)
    gamma_b = _hits(config.p_gamma, (b,), g)
    gamma = _below_or_above_one(config.gamma, (b, c), g)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g).item())
    return AugmentParams(
        rotate_b=rotate_b,
        rotation_rad_b3=torch.where(rotate_b[:, None], rotation, torch.zeros_like(rotation)),
        scale_b=scale_b,
        scale_factor_b=torch.where(scale_b, scale_factor, torch.ones_like(scale_factor)),
        mirror_b3=mirror_b3,
        noise_b=noise_b,
        noise_std_b=noise_std,
        blur_bc=blur_bc,
        blur_sigma_bc3=blur_sigma,
        brightness_b=brightness_b,
        brightness_bc=brightness,
        contrast_b=contrast_b,
        contrast_bc=contrast,
        lowres_bc=lowres_bc,
        lowres_zoom_bc=lowres_zoom,
        gamma_inverted_b=gamma_inverted_b,
        gamma_inverted_bc=gamma_inverted,
        gamma_b=gamma_b,
        gamma_bc=gamma,
        noise_seed=noise_seed,
    )


def read_shape_zyx(out_shape_zyx: tuple[int, int, int], config: AugmentConfig) -> tuple[int, int, int]:
    """The input patch a loader should read so rotations rarely pull in padding (nnU-Net's rule).

    The bounding box of the output patch rotated by the largest angle about each axis separately,
    divided by 0.85 as nnU-Net does (it does not use the real scaling range; zooming out by more
    than 1/0.85 reaches padding near the corners, as in nnU-Net). nnU-Net rotates only one diagonal
    of the box and so reads slightly less along x.
    """
    if config.p_rotation == 0 and config.p_scaling == 0:
        return out_shape_zyx
    theta = min(math.radians(max(abs(a) for a in config.rotation_deg)), math.pi / 2)
    if config.p_rotation == 0:
        theta = 0.0
    cos, sin = math.cos(theta), math.sin(theta)
    size = [float(s) for s in out_shape_zyx]
    need = list(size)
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        need[u] = max(need[u], size[u] * cos + size[v] * sin)
        need[v] = max(need[v], size[v] * cos + size[u] * sin)
    zoom = 1 / 0.85 if config.p_scaling > 0 else 1.0
    # An odd patch size gets an odd read size: then the centre crop of the enlarged read starts where a read
    # of the patch itself starts (``c - p // 2``), so samples read at the patch size (the loader's
    # parameters-first path) are the ones reading everything enlarged would give.
    z, y, x = (
        r + 1 if s % 2 and not r % 2 else r
        for r, s in ((max(int(n * zoom), s), s) for n, s in zip(need, out_shape_zyx))
    )
    return (z, y, x)


def apply_params(
    image_bczyx: torch.Tensor,
    label_bzyx: torch.Tensor,
    params: AugmentParams,
    *,
    out_shape_zyx: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn parameters; see :func:`augment_batch` for the shape contract."""
    _check_inputs(image_bczyx, label_bzyx)
    batch, channels = image_bczyx.shape[:2]
    params.validate(batch, channels)
    in_shape = tuple(int(s) for s in image_bczyx.shape[2:])
    out_shape = in_shape if out_shape_zyx is None else tuple(int(s) for s in out_shape_zyx)
    if len(out_shape) != 3 or any(o > i or o < 1 for o, i in zip(out_shape, in_shape)):
        raise ValueError(f"augment: out_shape_zyx {out_shape_zyx} must be 3 sizes in [1, input {in_shape}]")
    with torch.no_grad():
        image, label = apply_spatial(
            image_bczyx,
            label_bzyx,
            params,
            out_shape_zyx=(out_shape[0], out_shape[1], out_shape[2]),
        )
        _apply_intensity(image, params)
    return image, label


def _apply_intensity(image: torch.Tensor, params: AugmentParams) -> None:
    """Transforms 2-8 of the module docstring, in place on the output patch."""
    apply_noise(image, params)
    apply_blur(image, params)
    apply_brightness(image, params)
    apply_contrast(image, params)
    apply_lowres(image, params)
    apply_gamma(image, mask_b=params.gamma_inverted_b, gamma_bc=params.gamma_inverted_bc, invert=True)
    apply_gamma(image, mask_b=params.gamma_b, gamma_bc=params.gamma_bc, invert=False)


def augment_split(
    wide: tuple[torch.Tensor, torch.Tensor] | None,
    narrow: tuple[torch.Tensor, torch.Tensor] | None,
    params: AugmentParams,
    *,
    config: AugmentConfig,
    out_shape_zyx: tuple[int, int, int],
    dataset_idx_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment_batch` of a batch whose parameters were drawn before it was read, so that only the
    samples that need it were read enlarged.

    ``params`` (from :func:`sample_params`) covers the whole batch of B samples; ``wide`` holds the
    ``(image_bczyx, label_bzyx)`` of the samples of ``params.reads_beyond_patch_b``, read enlarged (as
    :func:`read_shape_zyx`), in batch order; ``narrow`` those of the other samples, read at
    ``out_shape_zyx``. Either is None when it has no sample. The result is the whole batch in batch
    order, equal bit for bit to :func:`augment_batch` with these parameters on the batch read enlarged
    (the intensity transforms, the noise field included, run once on the assembled batch).
    """
    b = params.batch_size
    wide_b = params.reads_beyond_patch_b
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for name, group, idx in (
        ("wide", wide, torch.nonzero(wide_b).flatten()),
        ("narrow", narrow, torch.nonzero(~wide_b).flatten()),
    ):
        have = 0 if group is None else int(group[0].shape[0])
        if have != len(idx):
            raise ValueError(
                f"augment_split: {have} {name} samples given; the parameters make {len(idx)} of the "
                f"batch of {b} {name} (params.reads_beyond_patch_b)"
            )
        if group is None:
            continue
        _check_inputs(*group)
        in_shape = tuple(int(s) for s in group[0].shape[2:])
        if any(o > i for o, i in zip(out_shape_zyx, in_shape)):
            raise ValueError(
                f"augment_split: {name} patch {in_shape} is smaller than the output {out_shape_zyx}"
            )
        parts.append((*group, idx))
    swap = config.mirror_swap
    if swap is not None:
        if dataset_idx_b is None or tuple(dataset_idx_b.shape) != (b,):
            raise ValueError("augment_split: config.mirror_swap (laterality: swap) needs dataset_idx_b (B,)")
        params = swap.restrict(params, dataset_idx_b)
    first_image, first_label, _ = parts[0]
    device = first_image.device
    image = torch.empty(
        (b, int(first_image.shape[1]), *out_shape_zyx), dtype=first_image.dtype, device=device
    )
    label = torch.empty((b, *out_shape_zyx), dtype=first_label.dtype, device=device)
    with torch.no_grad():
        for g_image, g_label, idx in parts:
            sub = params.subset(idx)
            sub.validate(len(idx), int(g_image.shape[1]))
            at = idx.to(device)
            image[at], label[at] = apply_spatial(g_image, g_label, sub, out_shape_zyx=out_shape_zyx)
        _apply_intensity(image, params)
    if swap is not None:
        assert dataset_idx_b is not None
        label = swap.swap_labels(label, dataset_idx_b, params.mirror_b3[:, 2])
    return image, label


def augment_batch(
    image_bczyx: torch.Tensor,
    label_bzyx: torch.Tensor,
    *,
    config: AugmentConfig,
    generator: torch.Generator,
    out_shape_zyx: tuple[int, int, int] | None = None,
    params: AugmentParams | None = None,
    dataset_idx_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch; returns new tensors ``(image_bczyx, label_bzyx)`` on the input's device.

    Args:
        image_bczyx: float32 (B, C, Z, Y, X), normalised intensities.
        label_bzyx: integer (B, Z, Y, X) raw label map (uint8 or int64); output keeps its dtype and its
            values are a subset of the input's values plus 0 (background where padding comes in).
        config: probabilities and ranges, used when ``params`` is None.
        generator: CPU generator all parameters are drawn from.
        out_shape_zyx: output patch size, at most the input's; the centre of the input is sampled
            (the loader reads a larger patch, see :func:`read_shape_zyx`). Default: the input shape.
        params: force these parameters instead of drawing them (``generator`` is then unused).
        dataset_idx_b: (B,) index of each sample's dataset in the catalog; required when
            ``config.mirror_swap`` is set (the raw values to swap depend on the dataset).

    Raises:
        ValueError: wrong dtypes, shapes, an out_shape larger than the input, or ``mirror_swap``
            without ``dataset_idx_b``.
    """
    if params is None:
        params = sample_params(
            config, int(image_bczyx.shape[0]), generator, n_channels=int(image_bczyx.shape[1])
        )
    swap = config.mirror_swap
    if swap is None:
        return apply_params(image_bczyx, label_bzyx, params, out_shape_zyx=out_shape_zyx)
    if dataset_idx_b is None or tuple(dataset_idx_b.shape) != (image_bczyx.shape[0],):
        raise ValueError(
            "augment: config.mirror_swap (laterality: swap) needs dataset_idx_b, the (B,) dataset index "
            f"of each sample; got {None if dataset_idx_b is None else tuple(dataset_idx_b.shape)}"
        )
    params = swap.restrict(params, dataset_idx_b)
    image, label = apply_params(image_bczyx, label_bzyx, params, out_shape_zyx=out_shape_zyx)
    return image, swap.swap_labels(label, dataset_idx_b, params.mirror_b3[:, 2])


def _check_inputs(image_bczyx: torch.Tensor, label_bzyx: torch.Tensor) -> None:
    if image_bczyx.ndim != 5 or image_bczyx.dtype != torch.float32:
        raise ValueError(
            f"augment: image must be float32 (B, C, Z, Y, X), "
            f"got {image_bczyx.dtype} {tuple(image_bczyx.shape)}"
        )
    if label_bzyx.dtype.is_floating_point or label_bzyx.dtype == torch.bool or label_bzyx.is_complex():
        raise ValueError(f"augment: label must be an integer tensor, got {label_bzyx.dtype}")
    expected = (image_bczyx.shape[0], *image_bczyx.shape[2:])
    if tuple(label_bzyx.shape) != tuple(expected):
        raise ValueError(
            f"augment: label shape {tuple(label_bzyx.shape)} does not match image {tuple(image_bczyx.shape)} "
            f"(expected {tuple(expected)})"
        )
    if label_bzyx.device != image_bczyx.device:
        raise ValueError(f"augment: image on {image_bczyx.device} but label on {label_bzyx.device}")
