"""What the batch augmentation draws and how it is configured: :class:`AugmentConfig` (probabilities and
ranges) and :class:`AugmentParams` (every random decision of one batch).

The transforms (:mod:`.augment_spatial`, :mod:`.augment_intensity`) read the parameters from here
rather than from :mod:`.augment`, which calls them, so imports run one way:
``augment -> augment_spatial / augment_intensity -> augment_params``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from multitalent.data.laterality import MirrorSwap

Range = tuple[float, float]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; defaults are nnU-Net v2's training augmentation (MultiTalent's)."""

    p_rotation: float = 0.2
    rotation_deg: Range = (-30.0, 30.0)  # per axis; all three axes rotate when p_rotation hits
    p_scaling: float = 0.2
    scaling: Range = (0.7, 1.4)  # isotropic; below or above 1 with equal odds; > 1 = zoom out
    p_mirror_zyx: tuple[float, float, float] = (0.5, 0.5, 0.5)
    p_noise: float = 0.1
    noise_std: Range = (0.0, 0.1)
    p_blur: float = 0.2
    blur_p_per_channel: float = 0.5
    blur_sigma: Range = (0.5, 1.0)  # voxels, per channel (shared by the axes, as nnU-Net v1)
    p_brightness: float = 0.15
    brightness: Range = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: Range = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_p_per_channel: float = 0.5
    lowres_zoom: Range = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: Range = (0.7, 1.5)
    # Laterality (``data.augmentation.laterality: swap``): swap lateral pairs in samples mirrored along
    # x; None keeps the labels. Built from the catalog (multitalent.data.laterality), not a job setting.
    mirror_swap: MirrorSwap | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mirror_swap":
                continue
            if f.name == "p_mirror_zyx":
                if len(value) != 3 or not all(0.0 <= p <= 1.0 for p in value):
                    raise ValueError(
                        f"AugmentConfig.p_mirror_zyx: need 3 probabilities in [0, 1], got {value}"
                    )
            elif f.name.startswith("p_") or f.name.endswith("_p_per_channel"):
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"AugmentConfig.{f.name}: probability {value} is outside [0, 1]")
            elif len(value) != 2 or value[0] > value[1]:
                raise ValueError(
                    f"AugmentConfig.{f.name}: need a range (low, high) with low <= high, got {value}"
                )
        for name in ("scaling", "brightness", "contrast", "gamma", "lowres_zoom", "blur_sigma"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"AugmentConfig.{name}: range must be positive, got {getattr(self, name)}")
        if self.noise_std[0] < 0:
            raise ValueError(f"AugmentConfig.noise_std: must be >= 0, got {self.noise_std}")


def identity_config() -> AugmentConfig:
    """A config under which every probability is 0: the output is the centre crop of the input."""
    return AugmentConfig(
        p_rotation=0.0,
        p_scaling=0.0,
        p_mirror_zyx=(0.0, 0.0, 0.0),
        p_noise=0.0,
        p_blur=0.0,
        p_brightness=0.0,
        p_contrast=0.0,
        p_lowres=0.0,
        p_gamma_inverted=0.0,
        p_gamma=0.0,
    )


def all_on_config() -> AugmentConfig:
    """Every transform applied to every sample (mirroring keeps its default per-axis probability):
    for tests, previews and worst-case timings."""
    return AugmentConfig(
        p_rotation=1.0,
        p_scaling=1.0,
        p_noise=1.0,
        p_blur=1.0,
        blur_p_per_channel=1.0,
        p_brightness=1.0,
        p_contrast=1.0,
        p_lowres=1.0,
        lowres_p_per_channel=1.0,
        p_gamma_inverted=1.0,
        p_gamma=1.0,
    )


@dataclass
class AugmentParams:
    """Every random decision of one batch; CPU tensors, ``b`` = sample, ``c`` = image channel.

    A transform applies to a sample where its mask is true; the value tensors are ignored elsewhere.
    Build one with :func:`sample_params`, or :meth:`identity` and set fields to force a transform.
    """

    rotate_b: torch.Tensor  # bool (B,)
    rotation_rad_b3: torch.Tensor  # float64 (B, 3): about z, y, x; +90° about z == rot90(dims=(y, x))
    scale_b: torch.Tensor  # bool (B,)
    scale_factor_b: torch.Tensor  # float64 (B,)
    mirror_b3: torch.Tensor  # bool (B, 3): flip z, y, x
    noise_b: torch.Tensor  # bool (B,)
    noise_std_b: torch.Tensor  # float32 (B,)
    blur_bc: torch.Tensor  # bool (B, C)
    blur_sigma_bc3: torch.Tensor  # float32 (B, C, 3) voxels along z, y, x
    brightness_b: torch.Tensor  # bool (B,)
    brightness_bc: torch.Tensor  # float32 (B, C)
    contrast_b: torch.Tensor  # bool (B,)
    contrast_bc: torch.Tensor  # float32 (B, C)
    lowres_bc: torch.Tensor  # bool (B, C)
    lowres_zoom_bc: torch.Tensor  # float32 (B, C)
    gamma_inverted_b: torch.Tensor  # bool (B,)
    gamma_inverted_bc: torch.Tensor  # float32 (B, C)
    gamma_b: torch.Tensor  # bool (B,)
    gamma_bc: torch.Tensor  # float32 (B, C)
    noise_seed: int = field(default=0)

    @classmethod
    def identity(cls, batch_size: int, n_channels: int = 1) -> AugmentParams:
        """Parameters that change nothing (all masks false, neutral values)."""
        b, c = batch_size, n_channels
        no_b = torch.zeros(b, dtype=torch.bool)
        no_bc = torch.zeros(b, c, dtype=torch.bool)
        one_bc = torch.ones(b, c, dtype=torch.float32)
        return cls(
            rotate_b=no_b.clone(),
            rotation_rad_b3=torch.zeros(b, 3, dtype=torch.float64),
            scale_b=no_b.clone(),
            scale_factor_b=torch.ones(b, dtype=torch.float64),
            mirror_b3=torch.zeros(b, 3, dtype=torch.bool),
            noise_b=no_b.clone(),
            noise_std_b=torch.zeros(b, dtype=torch.float32),
            blur_bc=no_bc.clone(),
            blur_sigma_bc3=torch.ones(b, c, 3, dtype=torch.float32),
            brightness_b=no_b.clone(),
            brightness_bc=one_bc.clone(),
            contrast_b=no_b.clone(),
            contrast_bc=one_bc.clone(),
            lowres_bc=no_bc.clone(),
            lowres_zoom_bc=one_bc.clone(),
            gamma_inverted_b=no_b.clone(),
            gamma_inverted_bc=one_bc.clone(),
            gamma_b=no_b.clone(),
            gamma_bc=one_bc.clone(),
        )

    @property
    def batch_size(self) -> int:
        return int(self.rotate_b.shape[0])

    @property
    def reads_beyond_patch_b(self) -> torch.Tensor:
        """bool (B,): the samples whose spatial transform samples outside the output patch (rotated or
        scaled). The others are a crop and flip of the patch itself, so a loader that knows the
        parameters reads only the output patch for them (:func:`~multitalent.data.augment.augment_split`)."""
        return self.rotate_b | self.scale_b

    def subset(self, idx: torch.Tensor) -> AugmentParams:
        """The parameters of samples ``idx`` (a 1-D index or bool mask over the batch), in that order."""
        values = {
            f.name: getattr(self, f.name)[idx]
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return AugmentParams(**values)

    @property
    def n_channels(self) -> int:
        return int(self.blur_bc.shape[1])

    def describe(self, b: int) -> str:
        """A short text naming the transforms applied to sample ``b`` (for previews and logs)."""
        parts: list[str] = []
        if self.rotate_b[b]:
            deg = [round(math.degrees(float(a))) for a in self.rotation_rad_b3[b]]
            parts.append(f"rot{deg[0]:+d}/{deg[1]:+d}/{deg[2]:+d}")
        if self.scale_b[b]:
            parts.append(f"scale{float(self.scale_factor_b[b]):.2f}")
        flips = "".join(a for a, m in zip("zyx", self.mirror_b3[b].tolist()) if m)
        if flips:
            parts.append(f"flip{flips}")
        if self.noise_b[b]:
            parts.append(f"noise{float(self.noise_std_b[b]):.2f}")
        if self.blur_bc[b].any():
            parts.append(f"blur{float(self.blur_sigma_bc3[b][self.blur_bc[b]].mean()):.2f}")
        if self.brightness_b[b]:
            parts.append(f"bright{float(self.brightness_bc[b, 0]):.2f}")
        if self.contrast_b[b]:
            parts.append(f"contr{float(self.contrast_bc[b, 0]):.2f}")
        if self.lowres_bc[b].any():
            parts.append(f"lowres{float(self.lowres_zoom_bc[b][self.lowres_bc[b]].min()):.2f}")
        if self.gamma_inverted_b[b]:
            parts.append(f"invgamma{float(self.gamma_inverted_bc[b, 0]):.2f}")
        if self.gamma_b[b]:
            parts.append(f"gamma{float(self.gamma_bc[b, 0]):.2f}")
        return " ".join(parts) if parts else "none"

    def validate(self, batch_size: int, n_channels: int) -> None:
        """Raise ``ValueError`` if a field's shape does not match a batch of this size."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor):
                continue
            suffix = f.name.rsplit("_", 1)[-1]
            expected = {"b": (batch_size,), "b3": (batch_size, 3), "bc": (batch_size, n_channels)}.get(
                suffix, (batch_size, n_channels, 3)
            )
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"AugmentParams.{f.name}: shape {tuple(value.shape)} does not fit a batch of "
                    f"{batch_size} samples x {n_channels} channels (expected {expected})"
                )
