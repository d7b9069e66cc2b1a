"""Shipped label spaces (``presets/*.json``) and loading of user catalogs."""

from __future__ import annotations

import json
from pathlib import Path

from multitalent.catalog.model import Catalog, CatalogError

PRESET_DIR = Path(__file__).with_name("presets")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> Catalog:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise CatalogError(f"unknown catalog preset {name!r}; available: {', '.join(available_presets())}")
    return Catalog.from_dict(json.loads(path.read_text()))


def load_catalog(spec: str | Path) -> Catalog:
    """A preset name, a path to a catalog file (JSON or YAML with the preset format), or ``A+B+...``:
    catalog ``A`` with the datasets of ``B``... appended (e.g. ``multitalent13+totalsegmentator``)."""
    if isinstance(spec, str) and "+" in spec and not Path(spec).is_file():
        first, *rest = spec.split("+")
        catalog = load_catalog(first)
        for more in rest:
            catalog = catalog.extend(*load_catalog(more).datasets, name=spec)
        return catalog
    path = Path(spec)
    if path.suffix.lower() in {".json", ".yaml", ".yml"}:
        if not path.is_file():
            raise CatalogError(f"catalog file {path} does not exist")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        return Catalog.from_dict(data)
    return load_preset(str(spec))
