"""Metrics over the label space (numpy; torch tensors accepted, not imported): validation Dice during
training, and Dice / HD95 of predictions against raw ground truth (:mod:`multitalent.evaluation.evaluate`)."""

from multitalent.evaluation.dice import DiceAccumulator, DiceReport, tp_fp_fn
from multitalent.evaluation.overlap import EMPTY_RULES, HD95_DEFINITION, Overlap, overlap

__all__ = [
    "EMPTY_RULES",
    "HD95_DEFINITION",
    "DiceAccumulator",
    "DiceReport",
    "Overlap",
    "overlap",
    "tp_fp_fn",
]
