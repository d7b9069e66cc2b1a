"""Model packages (plain files: safetensors + JSON + a model card + a manifest) and the MLflow registry.

- :mod:`~multitalent.registry.package`: write, verify and open a package folder (no pickle, ever);
- :mod:`~multitalent.registry.store`: publish a package as a registered model version, resolve
  ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, pull and verify;
- :mod:`multitalent.train.publish`: the package of a training run's newest verified checkpoint
  (DeepSpeed's fp32 master weights).

Importing this package is cheap: torch, safetensors and mlflow load on first use.
"""

from multitalent.registry.package import ModelPackage, PackageError, open_package, verify_package
from multitalent.registry.store import ModelRef, RegistryError, load_package, pull

__all__ = [
    "ModelPackage",
    "ModelRef",
    "PackageError",
    "RegistryError",
    "load_package",
    "open_package",
    "pull",
    "verify_package",
]
