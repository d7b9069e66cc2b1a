"""MultiTalent networks: paper configurations, head groups, deep supervision, fine-tuning split, MAC count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multitalent.catalog import load_preset
from multitalent.models import (
    MultiTalentNet,
    available_architectures,
    build_network,
    count_forward_macs,
    plan_unet_topology,
)

ARCHS = ("unet", "resenc_unet", "swin_unetr")
# Small patches each tiny variant accepts (CNN: 3 poolings; Swin: multiples of 32, with more than one voxel in
# its 1/32 bottleneck, which instance norm needs).
TINY_PATCH = {"unet": (16, 32, 32), "resenc_unet": (16, 32, 32), "swin_unetr": (32, 32, 64)}
HEADS = (2, 1, 3)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def _tiny(arch: str, heads=HEADS, **kwargs) -> MultiTalentNet:
    torch.manual_seed(0)
    return build_network(arch, heads, size="tiny", patch_size_zyx=TINY_PATCH[arch], **kwargs)


def _outputs(out) -> list[torch.Tensor]:
    return out if isinstance(out, list) else [out]


def test_planner_gives_nnunet_topology_for_the_paper_patch() -> None:
    topo = plan_unet_topology((96, 192, 192), (1.5, 1.0, 1.0))
    # 1.5 mm is within 2x of 1 mm, so z is pooled from the start; it stops at 6 voxels (< 8) after 4 pools.
    assert topo.strides_zyx == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert topo.kernel_sizes_zyx == ((3, 3, 3),) * 6
    assert topo.divisible_by_zyx == (16, 32, 32)
    assert topo.bottleneck_size_zyx((96, 192, 192)) == (6, 6, 6)


def test_planner_handles_anisotropic_spacing() -> None:
    topo = plan_unet_topology((20, 320, 256), (5.0, 0.7, 0.7))
    # In-plane only until y/x spacing reaches 2.8 mm (5 / 2.8 < 2); z kernels are 1 while z is > 2x coarser.
    assert topo.strides_zyx == (
        (1, 1, 1),
        (1, 2, 2),
        (1, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
        (1, 2, 2),
        (1, 2, 2),
    )
    assert topo.kernel_sizes_zyx[:2] == ((1, 3, 3), (1, 3, 3))
    assert topo.kernel_sizes_zyx[2:] == ((3, 3, 3),) * 5


@pytest.mark.parametrize(
    ("arch", "paper_params"), [("unet", 29.3e6), ("resenc_unet", 69.3e6), ("swin_unetr", 62.2e6)]
)
def test_paper_configurations_match_the_paper_parameter_counts(arch: str, paper_params: float) -> None:
    heads = load_preset("multitalent13").classes_per_dataset()
    assert sum(heads) == 47
    if arch == "swin_unetr":  # MONAI's constructor calls .item(), which the meta device refuses
        net = build_network(arch, heads)
    else:
        with torch.device("meta"):
            net = build_network(arch, heads)
    info = net.describe()
    n_params = sum(p.numel() for p in net.parameters())
    assert info["parameters"]["total"] == n_params
    assert abs(n_params - paper_params) / paper_params < 0.05
    assert info["num_classes"] == 47
    # heads: one 1x1x1 conv (weights + bias) per level per dataset
    expected_heads = sum((c + 1) * 47 for c in info["feature_channels"])
    assert info["parameters"]["heads"] == expected_heads
    if arch != "swin_unetr":
        assert info["ds_levels"] == 5
    if arch == "unet":  # nnU-Net's planner: in-plane-only pooling last
        assert info["backbone"]["strides_zyx"][-1] == [1, 2, 2]


# The paper's Table 4 (MD networks, 47 classes): parameters and multiply-adds per 96x192x192 patch.
@pytest.mark.parametrize(
    ("arch", "size", "paper_params", "paper_macs"),
    [("unet", "paper", 29.3e6, 0.72e12), ("resenc_unet", "paper", 69.3e6, 1.2e12)],
)
def test_paper_cnns_match_the_paper_parameter_and_mac_counts(
    arch: str, size: str, paper_params: float, paper_macs: float
) -> None:
    heads = load_preset("multitalent13").classes_per_dataset()
    with torch.device("meta"):
        net = build_network(arch, heads, size=size)
    n_params = sum(p.numel() for p in net.parameters())
    macs = count_forward_macs(net).macs
    assert abs(n_params - paper_params) / paper_params < 0.01, n_params
    assert abs(macs - paper_macs) / paper_macs < 0.05, macs


def test_paper_resenc_has_the_reference_topology_and_stem() -> None:
    """The reference's ResEnc plans (MultiTalent_resenc_bs4_plans_3D.pkl): in-plane-only pooling and a
    1x3x3 kernel at full resolution, then [2,2,2] x 4 with 3x3x3 kernels; FabiansUNet's 3x3x3 stem."""
    with torch.device("meta"):
        net = build_network("resenc_unet", [47])
    cfg = net.describe()["backbone"]
    assert cfg["strides_zyx"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert cfg["kernel_sizes_zyx"] == [[1, 3, 3]] + [[3, 3, 3]] * 5
    assert cfg["n_blocks_per_stage"] == [1, 2, 3, 4, 4, 4]
    assert cfg["n_conv_per_stage_decoder"] == [1] * 5
    assert cfg["features_per_stage"] == [30, 60, 120, 240, 320, 320]
    assert cfg["stem_kernel_size_zyx"] == [3, 3, 3]
    stem_conv = net.backbone.encoder.stem.convs[0].conv
    assert tuple(stem_conv.kernel_size) == (3, 3, 3) and stem_conv.out_channels == 30
    assert tuple(net.backbone.encoder.stages[0].blocks[0].conv1.conv.kernel_size) == (1, 3, 3)
    assert net.ds_strides_zyx == ((1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16))
    assert net.divisible_by_zyx == (16, 32, 32)
    # the topology the platform used to build is kept as "planned": z pooled from the first stage
    with torch.device("meta"):
        planned = build_network("resenc_unet", [47], size="planned")
    assert planned.describe()["backbone"]["strides_zyx"][1] == [2, 2, 2]
    assert planned.describe()["backbone"]["stem_kernel_size_zyx"] == [3, 3, 3]
    with pytest.raises(ValueError, match="unknown size 'planned' for unet"):
        build_network("unet", [1], size="planned")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_output_shapes_per_deep_supervision_level(arch: str) -> None:
    net = _tiny(arch).eval()
    patch = TINY_PATCH[arch]
    batch = 1 if arch == "swin_unetr" else 2  # Swin is the slow one on CPU
    x = torch.randn(batch, 1, *patch)
    with torch.no_grad():
        outs = net(x)
    assert isinstance(outs, list)
    assert len(outs) == net.ds_levels == len(net.ds_strides_zyx)
    for out, stride in zip(outs, net.ds_strides_zyx):
        assert out.shape == (batch, sum(HEADS), *(p // s for p, s in zip(patch, stride)))
    if arch == "swin_unetr":
        assert net.ds_levels == 1
    else:
        assert net.ds_strides_zyx == ((1, 1, 1), (2, 2, 2), (4, 4, 4))
    net.deep_supervision = False
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor)
    assert torch.equal(full, outs[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_adding_a_head_group_leaves_existing_outputs_bit_identical(arch: str) -> None:
    net = _tiny(arch)
    x = torch.randn(1, 1, *TINY_PATCH[arch])
    k_old = net.num_classes
    for train in (False, True):
        net.train(train)
        with torch.no_grad():
            before = _outputs(net(x))
        n_groups = len(net.head_groups)
        assert net.add_head_group(4) == n_groups
        assert net.head_groups == (*HEADS, *([4] * (n_groups - len(HEADS) + 1)))
        with torch.no_grad():
            after = _outputs(net(x))
        assert len(after) == len(before)
        for old, new in zip(before, after):
            assert new.shape[1] == old.shape[1] + 4
            assert torch.equal(new[:, : old.shape[1]], old)
    assert net.num_classes == k_old + 8
    assert net.group_slices[-1] == slice(k_old + 4, k_old + 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_variants_run_forward_and_backward(arch: str) -> None:
    net = _tiny(arch)
    net.train()
    x = torch.randn(1, 1, *TINY_PATCH[arch])
    levels = _outputs(net(x))
    loss = sum(
        nn.functional.binary_cross_entropy_with_logits(logits, (torch.rand_like(logits) > 0.5).float())
        for logits in levels
    )
    # a 0-d tensor in the graph (an empty ``sum`` would be the int 0), finite, and > 0 (BCE of finite logits)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # every head of every group and level receives gradient
    for level in net.heads:
        for conv in level.groups:
            assert conv.weight.grad.abs().sum() > 0
    assert sum(float(p.grad.abs().sum()) for p in net.backbone_parameters()) > 0


def test_backbone_and_head_parameters_split_the_network() -> None:
    net = _tiny("resenc_unet")
    backbone = {id(p) for p in net.backbone_parameters()}
    heads = {id(p) for p in net.head_parameters()}
    assert backbone.isdisjoint(heads)
    assert backbone | heads == {id(p) for p in net.parameters()}
    assert all(not key.startswith("heads") for key in net.backbone_state_dict())


def test_backbone_weights_transfer_to_a_network_with_new_heads() -> None:
    source = _tiny("unet")
    torch.manual_seed(1)
    target = build_network("unet", [5], size="tiny", patch_size_zyx=TINY_PATCH["unet"])
    target.load_backbone_state_dict(source.backbone_state_dict())
    for (name, a), b in zip(source.backbone_state_dict().items(), target.backbone_state_dict().values()):
        assert torch.equal(a, b), name
    assert target.head_groups == (5,)
    x = torch.randn(1, 1, *TINY_PATCH["unet"])
    with torch.no_grad():
        assert torch.equal(source.backbone(x)[0], target.backbone(x)[0])


def test_build_kwargs_rebuild_the_same_network() -> None:
    net = _tiny("unet")
    net.add_head_group(2)
    rebuilt = build_network(**net.build_kwargs())
    assert rebuilt.describe() == net.describe()
    assert rebuilt.state_dict().keys() == net.state_dict().keys()


def test_mac_count_of_a_single_conv_is_exact() -> None:
    conv = nn.Conv3d(2, 4, kernel_size=3, padding=1)
    count = count_forward_macs(conv, patch_size_zyx=(4, 5, 6), in_channels=2, batch_size=3)
    assert count.macs == 3 * (4 * 5 * 6) * 4 * (2 * 27)
    assert count.flops == 2 * count.macs


def test_mac_count_grows_by_the_new_heads() -> None:
    net = _tiny("unet")
    patch = TINY_PATCH["unet"]
    tensors = [*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)]
    before = count_forward_macs(net).macs
    net.add_head_group(5)
    after = count_forward_macs(net).macs
    voxels = [(patch[0] // s[0]) * (patch[1] // s[1]) * (patch[2] // s[2]) for s in net.ds_strides_zyx]
    assert after - before == 5 * sum(c * v for c, v in zip(net.feature_channels, voxels))
    net.deep_supervision = False
    no_ds = count_forward_macs(net).macs
    assert after - no_ds == sum(net.num_classes * c * v for c, v in zip(net.feature_channels[1:], voxels[1:]))
    # counting swaps in meta tensors and puts every original back, under every alias name
    restored = dict(
        [*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)]
    )
    assert all(restored[name] is t for name, t in tensors)
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_bad_requests_are_refused_with_reasons() -> None:
    assert set(ARCHS) <= set(available_architectures())
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("vnet", [1])
    with pytest.raises(ValueError, match="unknown size"):
        build_network("unet", [1], size="huge")
    with pytest.raises(ValueError, match="heads"):
        build_network("unet", [2, 0], size="tiny")
    with pytest.raises(ValueError, match="multiple of"):
        build_network("unet", [1], size="tiny", patch_size_zyx=(16, 32, 30))
    with pytest.raises(ValueError, match="only available for swin_unetr"):
        build_network("unet", [1], size="tiny", gradient_checkpointing=True)
    net = _tiny("unet")
    with pytest.raises(ValueError, match="expected input"):
        net(torch.zeros(1, 2, 16, 32, 32))
    with pytest.raises(ValueError, match="multiple of"):
        net(torch.zeros(1, 1, 16, 32, 36))
    with pytest.raises(ValueError, match="at least one class"):
        net.add_head_group(0)
