"""Shipped label spaces (``presets/*.json``) and loading of user catalogs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from multitalent.catalog.model import Catalog, CatalogError

PRESET_DIR = Path(__file__).with_name("presets")
_SUBSET = re.compile(r"(?P<base>.+)\[(?P<ids>[^\[\]]+)\]")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> Catalog:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise CatalogError(f"unknown catalog preset {name!r}; available: {', '.join(available_presets())}")
    return Catalog.from_dict(json.loads(path.read_text()))


def load_catalog(spec: str | Path) -> Catalog:
    """A preset name, a path to a catalog file (JSON or YAML with the preset format), ``A+B+...``:
    catalog ``A`` with the datasets of ``B``... appended (e.g. ``multitalent13+totalsegmentator``), or
    ``SPEC[ID,ID...]``: the catalog ``SPEC`` restricted to those datasets, in its order, named ``spec``
    (e.g. ``phantom[P01]``, one model per dataset).

    Raises:
        CatalogError: an unknown preset, a missing file, or a file that is not a valid catalog (the
            message names the file).
    """
    subset = _SUBSET.fullmatch(spec) if isinstance(spec, str) and not Path(spec).is_file() else None
    if subset is not None:
        ids = [i.strip() for i in subset["ids"].split(",") if i.strip()]
        base = load_catalog(subset["base"])
        try:
            return base.subset(ids, name=str(spec))
        except KeyError as e:
            raise CatalogError(
                f"catalog {spec!r}: {e.args[0]}; datasets: {', '.join(base.dataset_ids)}"
            ) from None
    if isinstance(spec, str) and "+" in spec and not Path(spec).is_file():
        first, *rest = spec.split("+")
        catalog = load_catalog(first)
        for more in rest:
            catalog = catalog.extend(*load_catalog(more).datasets, name=spec)
        return catalog
    path = Path(spec)
    if path.suffix.lower() in {".json", ".yaml", ".yml"}:
        if not path.is_file():
            raise CatalogError(
                f"catalog file {path} does not exist (or give a preset: {', '.join(available_presets())})"
            )
        try:
            text = path.read_text()
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise CatalogError(f"catalog file {path}: cannot be read as {path.suffix[1:]}: {e}") from None
        except Exception as e:  # yaml.YAMLError, without importing yaml for presets
            raise CatalogError(f"catalog file {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict) or "datasets" not in data:
            raise CatalogError(
                f"catalog file {path}: not a catalog (a mapping with a 'datasets' list is expected; "
                "see platform/multitalent/catalog/presets/*.json)"
            )
        try:
            return Catalog.from_dict(data)
        except CatalogError as e:
            raise CatalogError(f"catalog file {path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CatalogError(f"catalog file {path}: not a valid catalog: {e!r}") from None
    return load_preset(str(spec))
