"""Foreground locations for oversampling: per class, a seeded sample of its voxels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from multitalent.preprocess.stats import seed_from_key


def sample_class_locations(
    label_zyx: np.ndarray,
    classes: Sequence[Sequence[int]],
    *,
    per_class: int,
    seed_key: str,
) -> tuple[np.ndarray, list[int], list[int]]:
    """Sample up to ``per_class`` voxels of each class, without replacement.

    Args:
        label_zyx: raw label map.
        classes: for each local class, its raw label values (a region when several).
        per_class: maximum number of voxels kept per class.
        seed_key: e.g. ``"dataset/case"``; the sample depends only on it and on the label map.

    Returns:
        ``fg_locations`` int32 ``(N, 4)`` rows ``[local_class, z, y, x]``, sorted by class, then in
        raster order; the local classes with at least one voxel; the raw values > 0 present.
    """
    flat = np.ravel(label_zyx)
    fg_index = np.flatnonzero(flat)
    fg_values = flat[fg_index]
    values_present = [int(v) for v in np.flatnonzero(np.bincount(fg_values))]
    seed = seed_from_key(seed_key)
    rows, present = [], []
    for local, raw_values in enumerate(classes):
        members = fg_index[np.isin(fg_values, np.asarray(raw_values, dtype=fg_values.dtype))]
        if members.size == 0:
            continue
        present.append(local)
        if members.size > per_class:
            # a separate stream per class, so one class's sample does not depend on the others
            rng = np.random.default_rng([seed, local])
            members = np.sort(members[rng.choice(members.size, size=per_class, replace=False)])
        zyx = np.unravel_index(members, label_zyx.shape)
        block = np.empty((members.size, 4), dtype=np.int32)
        block[:, 0] = local
        for a in range(3):
            block[:, a + 1] = zyx[a]
        rows.append(block)
    fg = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int32)
    return fg, present, values_present
