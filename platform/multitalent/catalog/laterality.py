"""Left and right: what mirroring along the left-right axis does to the label space.

A mirrored body has its left kidney where the right one was. Declaring each dataset's lateral pairs
(``"lateral_pairs": [["left kidney", "right kidney"], ...]`` in the preset) lets augmentation and
test-time augmentation swap the pair's targets, so "left kidney" keeps naming the anatomically left
kidney. Classes with a side but no counterpart in their dataset (``"sided"``: TotalSegmentator's
lung lobes, Gibson's left kidney) have no correct target in a mirrored sample; augmentation leaves
the samples of such datasets unmirrored along x.

Two views of one swap:

- output channels: :func:`lateral_swap` permutes the catalog's global classes (``swap_k[k]`` is the
  channel that class ``k`` becomes after mirroring), for test-time augmentation;
- raw label values: :func:`mirror_label_lut` permutes each dataset's raw values, so a mirrored raw
  label map turns into the swapped targets through ``Catalog.region_lut()``. Region classes (unions
  of raw values) are handled by permuting their parts; :func:`check_laterality` proves, when a
  dataset is built, that the raw permutation maps every class onto its partner (or onto itself).

Pure data and numpy, like the rest of :mod:`multitalent.catalog`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from multitalent.catalog.model import CatalogError

if TYPE_CHECKING:
    from multitalent.catalog.model import Catalog, DatasetSpec


def check_laterality(dataset: DatasetSpec) -> None:
    """Raise :class:`CatalogError` naming the pair or class when the declarations are broken.

    A pair joins two different classes of this dataset, a class is in at most one pair, a sided
    class is in none, and the raw value permutation derived from the pairs maps each class exactly
    onto its partner.
    """
    where = f"dataset {dataset.id!r}"
    names = [c.name for c in dataset.classes]
    seen: dict[str, tuple[str, str]] = {}
    for pair in dataset.lateral_pairs:
        label = f"{where}: lateral pair [{pair[0]!r}, {pair[1]!r}]"
        for name in pair:
            if name not in names:
                raise CatalogError(
                    f"{label}: {name!r} is not a class of this dataset (a pair joins a left and a right "
                    f"class of the same dataset; its classes: {', '.join(names)})"
                )
            if name in seen:
                raise CatalogError(f"{label}: {name!r} is already in the pair {list(seen[name])}")
            seen[name] = pair
        if pair[0] == pair[1]:
            raise CatalogError(f"{label}: a class cannot be its own counterpart")
    for name in dataset.sided:
        if name not in names:
            raise CatalogError(
                f"{where}: sided class {name!r} is not a class of this dataset "
                f"(its classes: {', '.join(names)})"
            )
        if name in seen:
            raise CatalogError(
                f"{where}: sided class {name!r} is in the lateral pair {list(seen[name])}; "
                "'sided' lists classes without a counterpart"
            )
    mirror_raw_values(dataset)


def mirror_raw_values(dataset: DatasetSpec) -> dict[int, int]:
    """The raw value permutation (an involution; identity where not listed) of a mirrored label map.

    Single-value pairs give value pairs directly; a region pair (a class that is a union of raw
    values) pairs the one value of each side that no other pair has paired already. The result is
    then checked: the image of every class's raw values must be its partner's raw values.

    Raises:
        CatalogError: the permutation cannot be derived or does not map a class onto its partner.
    """
    where = f"dataset {dataset.id!r}"
    by_name = {c.name: c for c in dataset.classes}
    perm: dict[int, int] = {}

    def link(a: int, b: int, pair: tuple[str, str]) -> None:
        for v, w in ((a, b), (b, a)):
            if perm.get(v, w) != w:
                raise CatalogError(
                    f"{where}: lateral pair [{pair[0]!r}, {pair[1]!r}]: raw value {v} would swap with both "
                    f"{perm[v]} and {w}"
                )
        perm[a], perm[b] = b, a

    pairs = [p for p in dataset.lateral_pairs if p[0] in by_name and p[1] in by_name]
    singles = [p for p in pairs if len(by_name[p[0]].raw_values) == len(by_name[p[1]].raw_values) == 1]
    for pair in singles:
        link(by_name[pair[0]].raw_values[0], by_name[pair[1]].raw_values[0], pair)
    for pair in pairs:
        if pair in singles:
            continue
        left = sorted(set(by_name[pair[0]].raw_values) - set(perm))
        right = sorted(set(by_name[pair[1]].raw_values) - set(perm))
        if len(left) == len(right) == 1 and left != right:
            link(left[0], right[0], pair)
        elif left or right:
            raise CatalogError(
                f"{where}: lateral pair [{pair[0]!r}, {pair[1]!r}]: cannot tell which raw values swap "
                f"(unpaired values {left} and {right}); declare pairs of the regions' parts as well"
            )
    partner = dict(pairs) | {b: a for a, b in pairs}
    for c in dataset.classes:
        image = sorted(perm.get(v, v) for v in c.raw_values)
        other = by_name[partner.get(c.name, c.name)]
        if image != sorted(other.raw_values):
            what = f"its partner {other.name!r}" if other is not c else "itself (it is in no pair)"
            raise CatalogError(
                f"{where}: mirroring maps class {c.name!r} (raw values {sorted(c.raw_values)}) onto "
                f"raw values {image}, not onto {what} {sorted(other.raw_values)}; check the lateral pairs"
            )
    return perm


def lateral_swap(catalog: Catalog) -> np.ndarray:
    """int64 ``(K,)``: ``swap_k[k]`` is the global class that class ``k`` becomes under mirroring
    along x (its pair's other member, else ``k``). An involution: ``swap_k[swap_k] == arange(K)``.

    Permute channels with ``outputs_bkzyx[:, swap_k]``.
    """
    swap = np.arange(catalog.num_classes, dtype=np.int64)
    for d in catalog.datasets:
        first = catalog.class_slice(d.id).start
        index = {c.name: first + i for i, c in enumerate(d.classes)}
        for left, right in d.lateral_pairs:
            swap[index[left]], swap[index[right]] = index[right], index[left]
    return swap


def sided_classes(catalog: Catalog) -> tuple[int, ...]:
    """Global classes with a side and no counterpart: a mirrored prediction of them means nothing."""
    out: list[int] = []
    for d in catalog.datasets:
        first = catalog.class_slice(d.id).start
        out += [first + i for i, c in enumerate(d.classes) if c.name in d.sided]
    return tuple(out)


def mirror_label_lut(catalog: Catalog) -> np.ndarray:
    """uint8 ``(D, V)``: ``lut_dv[d, v]`` is raw value ``v`` of dataset ``d`` after mirroring along x.

    ``V`` is the width of ``Catalog.region_lut()`` (largest raw value + 1), so for every dataset
    ``region_lut[d][lut_dv[d][label]] == region_lut[d][label][:, swap_k]`` (:func:`lateral_swap`).
    """
    width = max(d.max_raw_value for d in catalog.datasets) + 1
    lut = np.tile(np.arange(width, dtype=np.uint8), (len(catalog.datasets), 1))
    for i, d in enumerate(catalog.datasets):
        for v, w in mirror_raw_values(d).items():
            lut[i, v] = w
    return lut


def mirror_allowed(catalog: Catalog) -> np.ndarray:
    """bool ``(D,)``: whether a sample of dataset ``d`` may be mirrored along x when pairs are
    swapped (false for datasets with sided classes, whose mirrored targets would be wrong)."""
    return np.array([not d.sided for d in catalog.datasets], dtype=bool)


def has_laterality(catalog: Catalog) -> bool:
    """Whether any dataset declares a lateral pair or a sided class."""
    return any(d.lateral_pairs or d.sided for d in catalog.datasets)
