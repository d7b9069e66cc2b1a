"""The label space: datasets, their raw label values, global classes, regions and groups.

Pure data and numpy; importable without torch.
"""

from multitalent.catalog.model import Catalog, ClassSpec, DatasetSpec, GlobalClass
from multitalent.catalog.presets import available_presets, load_catalog, load_preset

__all__ = [
    "Catalog",
    "ClassSpec",
    "DatasetSpec",
    "GlobalClass",
    "available_presets",
    "load_catalog",
    "load_preset",
]
