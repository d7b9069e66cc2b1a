"""Backbones: maintained implementations with their segmentation layers removed.

Each builder returns a :class:`Backbone`: a module mapping ``(B, C_in, z, y, x)`` to decoder features, plus
what the heads and the loss need to know about those features. The dna U-Nets
(``dynamic_network_architectures``) keep their decoder's deep-supervision taps, with the seg layers replaced
by identities, so they return one feature map per decoder level, highest resolution first; SwinUNETR (MONAI)
returns its last decoder features (one level).

Only ``dynamic_network_architectures.architectures.unet`` and ``monai.networks.nets.swin_unetr`` are imported,
lazily: dna's Primus/EVA modules pull in timm -> torchvision, whose PyPI wheel does not load beside the CPU
torch; ``architectures.unet`` imports only dna building blocks and torch (checked: no timm/torchvision in
``sys.modules`` after importing it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from multitalent.models.topology import UNetTopology, cumulative_stride, plan_unet_topology

SIZES = ("paper", "tiny")


@dataclass(frozen=True)
class Backbone:
    """A feature extractor and the facts about its outputs.

    ``module(x_bczyx)`` returns a list of ``(B, feature_channels[i], z / ds_strides_zyx[i] ...)`` tensors,
    highest resolution first, or one tensor when there is a single level.
    """

    module: nn.Module
    feature_channels: tuple[int, ...]
    ds_strides_zyx: tuple[tuple[int, int, int], ...]
    divisible_by_zyx: tuple[int, int, int]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UNetSize:
    """Width and depth of an nnU-Net style CNN; strides and kernels come from the topology planner."""

    base_features: int
    max_features: int
    encoder_units: tuple[int, ...]  # convs (plain) or residual blocks (ResEnc) per stage; last entry repeats
    decoder_convs: int
    max_pools: int | None

    def features(self, n_stages: int) -> list[int]:
        return [min(self.max_features, self.base_features * 2**s) for s in range(n_stages)]

    def units(self, n_stages: int) -> list[int]:
        return [self.encoder_units[min(s, len(self.encoder_units) - 1)] for s in range(n_stages)]


# nnU-Net v1 (the reference code) starts 3-D U-Nets at 30 features, capped at 320: 29.3 M parameters, the
# paper's count (32 would give 30.8 M). ResEnc: blocks per stage 1,2,3,4,4,4 and a one-conv plain decoder, as
# in the reference (68.9 M; the paper says 69.3 M).
# Tiny sizes (tests, CPU demo): 4 stages of 8..64 features and one conv (or block) per stage, because on CPU
# the backward of full-resolution 3-D convs dominates (two convs per stage cost ~3x the time of one).
UNET_SIZES = {
    "paper": UNetSize(
        base_features=30, max_features=320, encoder_units=(2,), decoder_convs=2, max_pools=None
    ),
    "tiny": UNetSize(base_features=8, max_features=64, encoder_units=(1,), decoder_convs=1, max_pools=3),
}
RESENC_SIZES = {
    "paper": UNetSize(
        base_features=30, max_features=320, encoder_units=(1, 2, 3, 4), decoder_convs=1, max_pools=None
    ),
    "tiny": UNetSize(base_features=8, max_features=64, encoder_units=(1,), decoder_convs=1, max_pools=3),
}


@dataclass(frozen=True)
class SwinSize:
    feature_size: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int


# The paper used MONAI's default SwinUNETR topology with feature size 48 (62.2 M parameters).
SWIN_SIZES = {
    "paper": SwinSize(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "tiny": SwinSize(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), window_size=4),
}
SWIN_DIVISIBLE_BY = 32  # patch embedding 2 x four patch mergings


def _check_size(size: str, arch: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for {arch}; choose one of {SIZES}")


def _no_checkpointing(gradient_checkpointing: bool, arch: str) -> None:
    if gradient_checkpointing:
        raise ValueError(f"gradient_checkpointing is only available for swin_unetr, not {arch!r}")


def _check_divisible(patch_size_zyx: Sequence[int], divisible_by_zyx: Sequence[int], arch: str) -> None:
    bad = [int(p) % int(d) != 0 for p, d in zip(patch_size_zyx, divisible_by_zyx)]
    if any(bad):
        raise ValueError(
            f"{arch}: patch_size_zyx {tuple(patch_size_zyx)} must be a multiple of {tuple(divisible_by_zyx)} "
            "on every axis (the product of the encoder strides)"
        )


def _dna_common_kwargs(topology: UNetTopology) -> dict[str, Any]:
    return {
        "conv_op": nn.Conv3d,
        "kernel_sizes": [list(k) for k in topology.kernel_sizes_zyx],
        "strides": [list(s) for s in topology.strides_zyx],
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"negative_slope": 1e-2, "inplace": True},
        "deep_supervision": True,
    }


def _strip_seg_layers(net: Any) -> None:
    """Turn the dna decoder's seg layers into identities: the decoder then returns its features per level."""
    decoder = net.decoder
    decoder.seg_layers = nn.ModuleList(nn.Identity() for _ in decoder.seg_layers)
    decoder.deep_supervision = True


def _dna_backbone(net: Any, topology: UNetTopology, features: list[int], config: dict[str, Any]) -> Backbone:
    _strip_seg_layers(net)
    net.apply(net.initialize)  # nnU-Net's init: He normal (slope 1e-2); ResEnc zeroes the last norms
    n_levels = topology.n_stages - 1
    return Backbone(
        module=net,
        feature_channels=tuple(features[:n_levels]),
        ds_strides_zyx=tuple(cumulative_stride(topology.strides_zyx, s) for s in range(n_levels)),
        divisible_by_zyx=topology.divisible_by_zyx,
        config=config,
    )


def _topology_config(topology: UNetTopology, spacing_zyx_mm: Sequence[float]) -> dict[str, Any]:
    return {
        "spacing_zyx_mm": [float(s) for s in spacing_zyx_mm],
        "strides_zyx": [list(s) for s in topology.strides_zyx],
        "kernel_sizes_zyx": [list(k) for k in topology.kernel_sizes_zyx],
    }


def _build_dna_unet(
    arch: str,
    *,
    size: str,
    in_channels: int,
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    gradient_checkpointing: bool,
) -> Backbone:
    """A dna U-Net planned by nnU-Net's rule: ``PlainConvUNet`` (``n_conv_per_stage`` convs per encoder
    stage) or ``ResidualEncoderUNet`` (``n_blocks_per_stage`` residual blocks); plain decoder."""
    from dynamic_network_architectures.architectures import unet as dna_unet

    cls_name, units_key, sizes = {
        "unet": ("PlainConvUNet", "n_conv_per_stage", UNET_SIZES),
        "resenc_unet": ("ResidualEncoderUNet", "n_blocks_per_stage", RESENC_SIZES),
    }[arch]
    _check_size(size, arch)
    _no_checkpointing(gradient_checkpointing, arch)
    spec = sizes[size]
    topology = plan_unet_topology(patch_size_zyx, spacing_zyx_mm, max_pools=spec.max_pools)
    _check_divisible(patch_size_zyx, topology.divisible_by_zyx, arch)
    n = topology.n_stages
    features = spec.features(n)
    layout = {
        "features_per_stage": features,
        units_key: spec.units(n),
        "n_conv_per_stage_decoder": [spec.decoder_convs] * (n - 1),
    }
    net = getattr(dna_unet, cls_name)(
        input_channels=in_channels,
        n_stages=n,
        num_classes=1,  # placeholder: the seg layers are replaced by MultiTalent head groups
        **layout,
        **_dna_common_kwargs(topology),
    )
    config = {
        "implementation": f"dynamic_network_architectures.{cls_name}",
        **layout,
        **_topology_config(topology, spacing_zyx_mm),
    }
    return _dna_backbone(net, topology, features, config)


def build_plain_unet(
    *,
    size: str,
    in_channels: int,
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    gradient_checkpointing: bool = False,
) -> Backbone:
    """nnU-Net 3-D U-Net (dna ``PlainConvUNet``): 2 convs per stage, InstanceNorm + LeakyReLU(0.01)."""
    return _build_dna_unet(
        "unet",
        size=size,
        in_channels=in_channels,
        patch_size_zyx=patch_size_zyx,
        spacing_zyx_mm=spacing_zyx_mm,
        gradient_checkpointing=gradient_checkpointing,
    )


def build_resenc_unet(
    *,
    size: str,
    in_channels: int,
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    gradient_checkpointing: bool = False,
) -> Backbone:
    """Residual-encoder U-Net (dna ``ResidualEncoderUNet``, BasicBlockD): residual encoder, plain decoder."""
    return _build_dna_unet(
        "resenc_unet",
        size=size,
        in_channels=in_channels,
        patch_size_zyx=patch_size_zyx,
        spacing_zyx_mm=spacing_zyx_mm,
        gradient_checkpointing=gradient_checkpointing,
    )


def build_swin_unetr(
    *,
    size: str,
    in_channels: int,
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    gradient_checkpointing: bool = False,
) -> Backbone:
    """MONAI SwinUNETR (v1 blocks), its ``out`` conv replaced by an identity; one output level."""
    from monai.networks.nets.swin_unetr import SwinUNETR

    _check_size(size, "swin_unetr")
    spec = SWIN_SIZES[size]
    divisible_by = (SWIN_DIVISIBLE_BY,) * 3
    _check_divisible(patch_size_zyx, divisible_by, "swin_unetr")
    net = SwinUNETR(
        in_channels=in_channels,
        out_channels=1,  # placeholder: replaced by MultiTalent head groups
        feature_size=spec.feature_size,
        depths=spec.depths,
        num_heads=spec.num_heads,
        window_size=spec.window_size,
        use_checkpoint=gradient_checkpointing,
        spatial_dims=3,
    )
    net.out = nn.Identity()  # type: ignore[assignment]
    config = {
        "implementation": "monai.networks.nets.SwinUNETR",
        "feature_size": spec.feature_size,
        "depths": list(spec.depths),
        "num_heads": list(spec.num_heads),
        "window_size": spec.window_size,
        "gradient_checkpointing": gradient_checkpointing,
        "spacing_zyx_mm": [float(s) for s in spacing_zyx_mm],
    }
    return Backbone(
        module=net,
        feature_channels=(spec.feature_size,),
        ds_strides_zyx=((1, 1, 1),),
        divisible_by_zyx=(SWIN_DIVISIBLE_BY,) * 3,
        config=config,
    )
