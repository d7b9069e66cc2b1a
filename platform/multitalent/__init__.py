"""MultiTalent: one network, many partially labelled CT datasets.

Conventions used throughout the package:

* Arrays loaded from images are indexed ``(z, y, x)`` after reorientation to the canonical
  orientation (RAS+ voxel axes, then transposed so that the slowest axis is z). Names carry
  the axis order: ``image_zyx``, ``logits_bkzyx`` (batch, class, z, y, x), ``spacing_zyx_mm``.
* The label space lives in :mod:`multitalent.catalog`: one output class per (dataset, class).
* Heavy dependencies (torch, ray, deepspeed, mlflow, monai) are imported lazily by the modules
  that need them, so ``multitalent --help`` and the catalog start instantly.
"""

__version__ = "0.1.0"
