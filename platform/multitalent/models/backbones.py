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

SIZES = ("paper", "planned", "tiny")  # "planned": resenc_unet only (see RESENC_SIZES)


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
    """Width and depth of an nnU-Net style CNN.

    Strides and kernels come from the topology planner, unless ``topology`` fixes them (then a patch must
    be a multiple of its total stride). ``stem_kernel_zyx`` replaces the stem's kernel, which is otherwise
    ``topology.kernel_sizes_zyx[0]``.
    """

    base_features: int
    max_features: int
    encoder_units: tuple[int, ...]  # convs (plain) or residual blocks (ResEnc) per stage; last entry repeats
    decoder_convs: int
    max_pools: int | None
    topology: UNetTopology | None = None
    stem_kernel_zyx: tuple[int, int, int] | None = None

    def features(self, n_stages: int) -> list[int]:
        return [min(self.max_features, self.base_features * 2**s) for s in range(n_stages)]

    def units(self, n_stages: int) -> list[int]:
        return [self.encoder_units[min(s, len(self.encoder_units) - 1)] for s in range(n_stages)]


# nnU-Net v1 (the reference code) starts 3-D U-Nets at 30 features, capped at 320: 29.3 M parameters and
# 0.72 T multiply-adds per 96x192x192 patch, the paper's counts (32 would give 30.8 M).
# ResEnc "paper": the reference's plans (MultiTalent_resenc_bs4_plans_3D.pkl, 3d_fullres) -- an in-plane-only
# first downsampling [1,2,2] and a 1x3x3 kernel at full resolution, then [2,2,2] x 4 with 3x3x3 kernels --
# and FabiansUNet's fixed 3x3x3 stem (its ``initial_conv``); blocks per stage 1,2,3,4,4,4 (basic residual
# blocks), one plain decoder conv per stage: 69.2 M parameters, 1.197 T multiply-adds (paper: 69.3 M, 1.2 T).
# ResEnc "planned": the same widths and depths on the plain U-Net's planned topology (z pooled from the
# first stage, 3x3x3 kernels everywhere): 68.9 M, 0.89 T -- what this platform built before.
RESENC_REFERENCE_TOPOLOGY = UNetTopology(
    strides_zyx=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    kernel_sizes_zyx=((1, 3, 3),) + ((3, 3, 3),) * 5,
)
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
        base_features=30,
        max_features=320,
        encoder_units=(1, 2, 3, 4),
        decoder_convs=1,
        max_pools=None,
        topology=RESENC_REFERENCE_TOPOLOGY,
        stem_kernel_zyx=(3, 3, 3),
    ),
    "planned": UNetSize(
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


def _check_size(size: str, arch: str, available: Sequence[str]) -> None:
    if size not in available:
        raise ValueError(f"unknown size {size!r} for {arch}; choose one of {tuple(available)}")


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
    _check_size(size, arch, tuple(sizes))
    _no_checkpointing(gradient_checkpointing, arch)
    spec = sizes[size]
    topology = spec.topology or plan_unet_topology(patch_size_zyx, spacing_zyx_mm, max_pools=spec.max_pools)
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
    stem_kernel = spec.stem_kernel_zyx or topology.kernel_sizes_zyx[0]
    if spec.stem_kernel_zyx is not None:
        _replace_stem(net, in_channels, features[0], spec.stem_kernel_zyx, topology)
    config = {
        "implementation": f"dynamic_network_architectures.{cls_name}",
        **layout,
        **_topology_config(topology, spacing_zyx_mm),
        "topology": "fixed" if spec.topology is not None else "planned",
        "stem_kernel_size_zyx": list(stem_kernel),
    }
    return _dna_backbone(net, topology, features, config)


def _replace_stem(
    net: Any, in_channels: int, channels: int, kernel_zyx: Sequence[int], topology: UNetTopology
) -> None:
    """Give the dna ResEnc a stem of its own kernel size (dna uses the first stage's kernel).

    The reference FabiansUNet's ``initial_conv`` is a 3x3x3 conv (+ norm + nonlin) whatever the first
    stage's kernel; dna's ``ResidualEncoder`` builds its stem with ``kernel_sizes[0]`` (1x3x3 here).
    """
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    common = _dna_common_kwargs(topology)
    net.encoder.stem = StackedConvBlocks(
        1,
        common["conv_op"],
        in_channels,
        channels,
        list(kernel_zyx),
        1,
        common["conv_bias"],
        common["norm_op"],
        common["norm_op_kwargs"],
        common["dropout_op"],
        common["dropout_op_kwargs"],
        common["nonlin"],
        common["nonlin_kwargs"],
    )


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
    """Residual-encoder U-Net (dna ``ResidualEncoderUNet``, BasicBlockD): residual encoder, plain decoder.

    ``size="paper"``: the reference's fixed topology and 3x3x3 stem (``RESENC_REFERENCE_TOPOLOGY``; a patch
    must be a multiple of (16, 32, 32)); ``"planned"``: the topology planned from the patch, like the U-Net.
    """
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

    _check_size(size, "swin_unetr", tuple(SWIN_SIZES))
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
