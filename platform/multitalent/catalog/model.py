"""Catalog data model.

A *dataset* declares the raw label values found in its label files. A *class* of a dataset is a
set of those raw values (a *region* when it has more than one, e.g. liver = {liver, tumour}).
Every (dataset, class) pair is one global output class with its own sigmoid head; global classes
are numbered in dataset order, then class order, so appending a dataset never renumbers the
classes that were there before.

A dataset may declare *lateral pairs* (its left and right class of one structure) and *sided*
classes (a side but no counterpart, e.g. TotalSegmentator's lung lobes); mirroring along the
left-right axis uses them (:mod:`multitalent.catalog.laterality`). They do not change the output
channels, so they are not part of the label-space hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYOUTS = ("msd", "nnunet_v2", "kits19", "btcv", "totalsegmentator")
GROUPS = ("difficult", "cancer")


class CatalogError(ValueError):
    """An inconsistent catalog definition."""


@dataclass(frozen=True)
class ClassSpec:
    """One class of one dataset: the union of ``raw_values`` in that dataset's label maps."""

    name: str
    raw_values: tuple[int, ...]
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """A source dataset and the classes it annotates.

    ``labels`` maps raw label values (background 0 excluded) to names, as in the dataset's own
    ``dataset.json``. ``location`` is the folder name under the raw-data root, ``layout`` the raw
    layout reader to use.
    """

    id: str
    name: str
    layout: str
    labels: Mapping[int, str]
    classes: tuple[ClassSpec, ...]
    num_cases: int = 0
    location: str = ""
    modality: str = "CT"
    lateral_pairs: tuple[tuple[str, str], ...] = ()  # (left class, right class), class names
    sided: tuple[str, ...] = ()  # classes with a side and no counterpart in this dataset

    def __post_init__(self) -> None:
        where = f"dataset {self.id!r}"
        if not self.id or any(c in self.id for c in ":/ \t"):
            raise CatalogError(f"{where}: id must be non-empty without ':', '/', or spaces")
        if self.layout not in LAYOUTS:
            raise CatalogError(f"{where}: layout {self.layout!r} is not one of {LAYOUTS}")
        if 0 in self.labels:
            raise CatalogError(f"{where}: raw value 0 is background and cannot be a label")
        if any(v < 0 or v > 255 for v in self.labels):
            raise CatalogError(f"{where}: raw label values must lie in 1..255")
        if not self.classes:
            raise CatalogError(f"{where}: declares no classes")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise CatalogError(f"{where}: duplicate class names {sorted(names)}")
        for c in self.classes:
            unknown = sorted(set(c.raw_values) - set(self.labels))
            if not c.raw_values or unknown:
                raise CatalogError(f"{where}, class {c.name!r}: raw values {unknown or '[]'} not declared")
            bad_groups = sorted(set(c.groups) - set(GROUPS))
            if bad_groups:
                raise CatalogError(f"{where}, class {c.name!r}: unknown groups {bad_groups}")
        from multitalent.catalog.laterality import check_laterality

        check_laterality(self)

    @property
    def max_raw_value(self) -> int:
        return max(self.labels)

    def to_dict(self) -> dict[str, Any]:
        lateral: dict[str, Any] = {}
        if self.lateral_pairs:
            lateral["lateral_pairs"] = [list(p) for p in self.lateral_pairs]
        if self.sided:
            lateral["sided"] = list(self.sided)
        return {
            "id": self.id,
            "name": self.name,
            "layout": self.layout,
            "location": self.location,
            "num_cases": self.num_cases,
            "modality": self.modality,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "classes": [
                {"name": c.name, "raw_values": list(c.raw_values), "groups": list(c.groups)}
                for c in self.classes
            ],
            **lateral,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSpec:
        """Build from preset data. ``classes`` may be omitted (one class per raw label) and
        ``groups`` may map class names to group lists instead of being given per class."""
        try:
            labels = {int(k): str(v) for k, v in d["labels"].items()}
            extra_groups: Mapping[str, Sequence[str]] = d.get("groups", {})
            raw_classes = d.get("classes") or [
                {"name": name, "raw_values": [value]} for value, name in sorted(labels.items())
            ]
            classes = tuple(
                ClassSpec(
                    name=str(c["name"]),
                    raw_values=tuple(int(v) for v in c["raw_values"]),
                    groups=tuple(c.get("groups", ())) + tuple(extra_groups.get(str(c["name"]), ())),
                )
                for c in raw_classes
            )
            return cls(
                id=str(d["id"]),
                name=str(d.get("name", d["id"])),
                layout=str(d["layout"]),
                labels=labels,
                classes=classes,
                num_cases=int(d.get("num_cases", 0)),
                location=str(d.get("location", "")),
                modality=str(d.get("modality", "CT")),
                lateral_pairs=tuple(_pair(d.get("id", "?"), p) for p in d.get("lateral_pairs", ())),
                sided=tuple(str(c) for c in d.get("sided", ())),
            )
        except KeyError as e:
            raise CatalogError(f"dataset {d.get('id', '?')!r}: missing field {e.args[0]!r}") from None


def _pair(dataset_id: Any, pair: Any) -> tuple[str, str]:
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise CatalogError(
            f"dataset {dataset_id!r}: lateral pair {pair!r} must be two class names [left, right]"
        )
    return (str(pair[0]), str(pair[1]))


@dataclass(frozen=True)
class GlobalClass:
    """One output head: class ``name`` of dataset ``dataset_id`` at output channel ``index``."""

    index: int
    dataset_id: str
    name: str
    raw_values: tuple[int, ...]
    groups: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.dataset_id}:{self.name}"


@dataclass(frozen=True)
class Catalog:
    """An ordered collection of datasets defining the global label space."""

    name: str
    datasets: tuple[DatasetSpec, ...]
    description: str = ""
    _by_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [d.id for d in self.datasets]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise CatalogError(f"catalog {self.name!r}: duplicate dataset ids {dupes}")
        object.__setattr__(self, "_by_id", {d.id: i for i, d in enumerate(self.datasets)})

    # ----------------------------------------------------------------- lookup
    def dataset(self, dataset_id: str) -> DatasetSpec:
        try:
            return self.datasets[self._by_id[dataset_id]]
        except KeyError:
            raise KeyError(f"dataset {dataset_id!r} is not in catalog {self.name!r}") from None

    def dataset_index(self, dataset_id: str) -> int:
        if dataset_id not in self._by_id:
            raise KeyError(f"dataset {dataset_id!r} is not in catalog {self.name!r}")
        return self._by_id[dataset_id]

    @property
    def dataset_ids(self) -> tuple[str, ...]:
        return tuple(d.id for d in self.datasets)

    @property
    def classes(self) -> tuple[GlobalClass, ...]:
        out: list[GlobalClass] = []
        for d in self.datasets:
            for c in d.classes:
                out.append(GlobalClass(len(out), d.id, c.name, c.raw_values, c.groups))
        return tuple(out)

    @property
    def num_classes(self) -> int:
        return sum(len(d.classes) for d in self.datasets)

    def class_slice(self, dataset_id: str) -> slice:
        """The contiguous output channels of one dataset's classes."""
        start = 0
        for d in self.datasets:
            if d.id == dataset_id:
                return slice(start, start + len(d.classes))
            start += len(d.classes)
        raise KeyError(f"dataset {dataset_id!r} is not in catalog {self.name!r}")

    def classes_per_dataset(self) -> tuple[int, ...]:
        """Number of heads of each dataset, in order (the model's head groups)."""
        return tuple(len(d.classes) for d in self.datasets)

    def group_members(self, group: str) -> tuple[int, ...]:
        return tuple(c.index for c in self.classes if group in c.groups)

    # ------------------------------------------------------------ label space
    def annotated_mask(self) -> np.ndarray:
        """``annotated_dk[d, k]``: whether dataset ``d`` annotates global class ``k``."""
        mask = np.zeros((len(self.datasets), self.num_classes), dtype=bool)
        for i, d in enumerate(self.datasets):
            mask[i, self.class_slice(d.id)] = True
        return mask

    def region_lut(self) -> np.ndarray:
        """``lut_dvk[d, v, k]``: raw value ``v`` of dataset ``d`` belongs to global class ``k``.

        Turning a raw label map into per-class targets is a gather: ``lut[d][label]``.
        """
        max_value = max(d.max_raw_value for d in self.datasets)
        lut = np.zeros((len(self.datasets), max_value + 1, self.num_classes), dtype=bool)
        for c in self.classes:
            lut[self._by_id[c.dataset_id], list(c.raw_values), c.index] = True
        return lut

    def targets(self, label_zyx: np.ndarray, dataset_id: str) -> np.ndarray:
        """Binary targets ``(K_dataset, *spatial)`` of one dataset's classes from a raw label map."""
        d = self.dataset(dataset_id)
        return np.stack([np.isin(label_zyx, c.raw_values) for c in d.classes])

    # ---------------------------------------------------------- composition
    def extend(self, *datasets: DatasetSpec, name: str | None = None) -> Catalog:
        """A new catalog with ``datasets`` appended; existing classes keep their indices."""
        return Catalog(name or self.name, self.datasets + tuple(datasets), self.description)

    def subset(self, dataset_ids: Iterable[str], name: str | None = None) -> Catalog:
        """A catalog of some datasets, in this catalog's order (a new label space)."""
        keep = set(dataset_ids)
        missing = keep - set(self._by_id)
        if missing:
            raise KeyError(f"datasets {sorted(missing)} are not in catalog {self.name!r}")
        return Catalog(name or self.name, tuple(d for d in self.datasets if d.id in keep), self.description)

    # -------------------------------------------------------------- identity
    def label_space(self) -> list[dict[str, Any]]:
        """What defines the output channels: used for the hash and stored with models."""
        return [
            {
                "dataset": d.id,
                "labels": {str(k): v for k, v in sorted(d.labels.items())},
                "classes": [[c.name, list(c.raw_values)] for c in d.classes],
            }
            for d in self.datasets
        ]

    @property
    def hash(self) -> str:
        """sha256 (first 16 hex digits) of the label space; names and case counts excluded."""
        blob = json.dumps(self.label_space(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "hash": self.hash,
            "datasets": [d.to_dict() for d in self.datasets],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Catalog:
        cat = cls(
            name=str(d.get("name", "custom")),
            datasets=tuple(DatasetSpec.from_dict(x) for x in d["datasets"]),
            description=str(d.get("description", "")),
        )
        if "hash" in d and d["hash"] != cat.hash:
            raise CatalogError(f"catalog {cat.name!r}: stored hash {d['hash']} != computed {cat.hash}")
        return cat
