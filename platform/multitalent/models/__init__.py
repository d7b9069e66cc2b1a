"""Backbones with per-dataset groups of sigmoid heads (one output channel per global class).

``build_network(arch, heads, size=...)`` gives a :class:`MultiTalentNet`. torch is imported here; the backbone
libraries (dynamic_network_architectures, MONAI) only when a network is built.
"""

from multitalent.models.backbones import Backbone
from multitalent.models.flops import FlopCount, count_forward_macs
from multitalent.models.heads import HeadGroups
from multitalent.models.network import MultiTalentNet
from multitalent.models.outputs import (
    MERGED_SOFTMAX,
    SIGMOID_HEADS,
    available_outputs,
    class_logits_forward,
    class_logits_network,
    output_heads,
)
from multitalent.models.registry import (
    PAPER_PATCH_SIZE_ZYX,
    PAPER_SPACING_ZYX_MM,
    available_architectures,
    build_network,
    register_architecture,
)
from multitalent.models.topology import UNetTopology, plan_unet_topology

__all__ = [
    "MERGED_SOFTMAX",
    "PAPER_PATCH_SIZE_ZYX",
    "PAPER_SPACING_ZYX_MM",
    "SIGMOID_HEADS",
    "Backbone",
    "FlopCount",
    "HeadGroups",
    "MultiTalentNet",
    "UNetTopology",
    "available_architectures",
    "available_outputs",
    "build_network",
    "class_logits_forward",
    "class_logits_network",
    "count_forward_macs",
    "output_heads",
    "plan_unet_topology",
    "register_architecture",
]
