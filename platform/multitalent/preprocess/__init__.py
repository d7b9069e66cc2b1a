"""Canonical orientation, crop, resampling, intensity statistics and the plan.

Pure numpy / scipy / nibabel; importable without torch. See ``docs/contracts.md`` for the axis
order and dtypes of the results.
"""

from multitalent.preprocess.case import (
    PreprocessedCase,
    PreprocessError,
    preprocess_case,
    preprocess_image,
    preprocess_loaded,
    restore_label,
    restore_probabilities,
)
from multitalent.preprocess.plan import DEFAULT_SPACING_ZYX_MM, PLAN_FILE, Normalization, Plan, PlanError
from multitalent.preprocess.resample import (
    resample_image,
    resample_label,
    resampled_shape,
    separate_axis,
)
from multitalent.preprocess.stats import (
    IntensityStats,
    foreground_intensity_every_nth,
    foreground_intensity_sample,
)

__all__ = [
    "DEFAULT_SPACING_ZYX_MM",
    "PLAN_FILE",
    "IntensityStats",
    "Normalization",
    "Plan",
    "PlanError",
    "PreprocessError",
    "PreprocessedCase",
    "foreground_intensity_every_nth",
    "foreground_intensity_sample",
    "preprocess_case",
    "preprocess_image",
    "preprocess_loaded",
    "resample_image",
    "resample_label",
    "resampled_shape",
    "restore_label",
    "restore_probabilities",
    "separate_axis",
]
