"""Validation metrics over the global label space (numpy; torch tensors accepted, not imported)."""

from multitalent.evaluation.dice import DiceAccumulator, DiceReport, tp_fp_fn

__all__ = ["DiceAccumulator", "DiceReport", "tp_fp_fn"]
