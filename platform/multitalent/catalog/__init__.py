"""The label space: datasets, their raw label values, global classes, regions and groups.

Pure data and numpy; importable without torch.
"""

from multitalent.catalog.laterality import (
    lateral_swap,
    mirror_allowed,
    mirror_label_lut,
    sided_classes,
)
from multitalent.catalog.model import Catalog, CatalogError, ClassSpec, DatasetSpec, GlobalClass
from multitalent.catalog.presets import available_presets, load_catalog, load_preset

__all__ = [
    "Catalog",
    "CatalogError",
    "ClassSpec",
    "DatasetSpec",
    "GlobalClass",
    "available_presets",
    "lateral_swap",
    "load_catalog",
    "load_preset",
    "mirror_allowed",
    "mirror_label_lut",
    "sided_classes",
]
