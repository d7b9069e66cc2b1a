"""The naive merge of a catalog: one exclusive label set, classes of the same name merged across datasets.

This is the baseline MultiTalent argues against (paper, introduction and Fig. 1b): one softmax over the
union of the datasets' label sets, a structure named alike in two datasets taken to be one class
whatever each dataset's protocol (P05's heart without the aortic root and P06's heart with it become
one "heart"), and every structure a dataset does not annotate taken as background in its images.

A softmax needs mutually exclusive labels, but a catalog class may be a *region* (MSD liver = {liver,
tumour}). The merged labels are therefore the *atoms* of the catalog: each raw value of each dataset
goes to the most specific class of its dataset that contains it (the class with the fewest raw values;
the first such class on a tie), and classes of that name across datasets share one merged label.
A raw value in no class of its dataset is background.

Going back from the merged softmax to the catalog's classes (so predictions and evaluation work per
(dataset, class) as for MultiTalent), a class's probability is the sum of the probabilities of the
merged labels its raw values map to: P01 liver = p(liver) + p(liver tumour). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multitalent.catalog.model import Catalog

BACKGROUND = "background"


@dataclass(frozen=True)
class MergedLabelSpace:
    """The merged label set of a catalog.

    ``names[m]``: merged label ``m`` (``names[0]`` is background), foreground labels in order of their
    first appearance in the catalog's classes. ``lut_dv[d, v]``: the merged label of raw value ``v`` of
    dataset ``d`` (0 for background and for values in no class). ``members_km[k, m]``: merged label
    ``m`` is part of global class ``k`` (the class's probability is the sum over its members).
    """

    names: tuple[str, ...]
    lut_dv: np.ndarray
    members_km: np.ndarray

    @property
    def num_channels(self) -> int:
        """Softmax channels, background included."""
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a merged label; labels: {list(self.names)}") from None

    def members(self, k: int) -> list[str]:
        """The merged labels global class ``k`` sums."""
        return [self.names[m] for m in np.flatnonzero(self.members_km[k])]


def merge_by_name(catalog: Catalog) -> MergedLabelSpace:
    """The naive merge of ``catalog`` (see the module docstring)."""
    names: list[str] = [BACKGROUND]
    max_value = max(d.max_raw_value for d in catalog.datasets)
    lut = np.zeros((len(catalog.datasets), max_value + 1), dtype=np.int64)
    for c in catalog.classes:  # label order: first appearance in the catalog's class order
        if c.name not in names:
            names.append(c.name)
    for d_index, dataset in enumerate(catalog.datasets):
        for value in dataset.labels:
            owners = [c for c in dataset.classes if value in c.raw_values]
            if owners:
                atom = min(owners, key=lambda c: len(c.raw_values))  # min keeps the first on ties
                lut[d_index, value] = names.index(atom.name)
    members = np.zeros((catalog.num_classes, len(names)), dtype=bool)
    for c in catalog.classes:
        d_index = catalog.dataset_index(c.dataset_id)
        for value in c.raw_values:
            members[c.index, lut[d_index, value]] = True
    used = np.asarray(members.any(axis=0), dtype=bool)
    used[0] = True
    if not used.all():  # a name whose only classes are regions of more specific ones: no atom of its own
        keep = np.flatnonzero(used)
        remap = np.zeros(len(names), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        names = [names[m] for m in keep]
        lut = remap[lut]
        members = members[:, keep]
    return MergedLabelSpace(tuple(names), lut, members)
