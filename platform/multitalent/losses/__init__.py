"""Losses: MultiTalent's partial-label loss (paper Eq. 2), deep supervision, target construction, and
the naive baseline's merged-softmax loss.

Losses are plain modules with a shape contract and ``(loss, metrics)`` out; the distributed reduction
for the global batch Dice is passed in (``reduce=``), so one code path serves one and many processes.
"""

from multitalent.losses.deep_supervision import (
    DeepSupervisionLoss,
    deep_supervision_weights,
    downsample_labels,
    downsample_targets,
)
from multitalent.losses.distributed import all_reduce_sum
from multitalent.losses.label_targets import LabelTargets
from multitalent.losses.merged_softmax import MergedSoftmaxLoss, merged_targets_from_labels
from multitalent.losses.partial_label import PartialLabelLoss
from multitalent.losses.targets import targets_from_labels

__all__ = [
    "DeepSupervisionLoss",
    "LabelTargets",
    "MergedSoftmaxLoss",
    "PartialLabelLoss",
    "all_reduce_sum",
    "deep_supervision_weights",
    "downsample_labels",
    "downsample_targets",
    "merged_targets_from_labels",
    "targets_from_labels",
]
