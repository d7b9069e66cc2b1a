"""Which case, and where in it, each training patch comes from.

- Case probabilities: each batch element is drawn independently, with replacement, with per-case
  probability ∝ ``n_d ** -exponent``, where ``n_d`` is the number of training cases of the case's
  dataset. ``exponent=0.5`` (MultiTalent) draws a dataset ∝ √n; 0 is uniform over cases, 1 uniform
  over datasets.
- Patch centres: a patch forced onto foreground is centred on a stored foreground voxel of a class
  present in the case (class uniform among present classes, voxel uniform among that class's stored
  locations); otherwise the patch position is uniform over the volume with nnU-Net's padding rule (see
  :func:`random_center`). Which patches are forced (:class:`ForegroundSchedule`): ``fg_mode="coin"``
  tosses a coin of probability ``fg_fraction`` (1/3) per patch; ``fg_mode="fixed"`` forces a fixed
  count per global batch, the last ``B - round(B (1 - fg_fraction))`` slots, as nnU-Net v1's
  ``DataLoader3D.get_do_oversample`` (and its DDP trainer's per-rank split) does.
- Randomness is explicit: :func:`stream_rngs` derives independent generators from
  ``SeedSequence([seed, rank, worker])`` so every (seed, rank, worker) replays the same stream.
- :func:`kfold_split` reproduces nnU-Net's per-dataset 5-fold split (sklearn ``KFold(5, shuffle=True,
  random_state=12345)`` on sorted case ids) with numpy alone.
- :func:`partition` splits a list disjointly and completely over ranks × loader workers.

Pure numpy; no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

T = TypeVar("T")

DEFAULT_EXPONENT = 0.5
DEFAULT_FG_FRACTION = 1.0 / 3.0
FgMode = Literal["coin", "fixed"]
FG_MODES: tuple[str, ...] = ("coin", "fixed")
KFOLD_SEED = 12345


# ----------------------------------------------------------------------------- case references
KEY_SEPARATOR = "__"


def case_key(dataset_id: str, case_id: str) -> str:
    """``<dataset_id>__<case_id>``, the WebDataset sample key (docs/contracts.md)."""
    return f"{dataset_id}{KEY_SEPARATOR}{case_id}"


def case_ref(entry: Any) -> tuple[str, str]:
    """``(dataset_id, case_id)`` of a manifest entry, ``CaseRecord``, ``(dataset, case)`` pair or key."""
    if isinstance(entry, str):
        dataset_id, sep, case_id = entry.partition(KEY_SEPARATOR)
        if not sep or not dataset_id or not case_id:
            raise ValueError(f"case key {entry!r} is not '<dataset_id>__<case_id>'")
        return dataset_id, case_id
    if isinstance(entry, tuple) and len(entry) == 2:
        return str(entry[0]), str(entry[1])
    if isinstance(entry, Mapping):
        try:
            return str(entry["dataset_id"]), str(entry["case_id"])
        except KeyError as e:
            raise ValueError(f"manifest entry {dict(entry)!r} lacks {e.args[0]!r}") from None
    if hasattr(entry, "dataset_id") and hasattr(entry, "case_id"):
        return str(entry.dataset_id), str(entry.case_id)
    raise TypeError(f"cannot read a case reference from {type(entry).__name__}: {entry!r}")


# ----------------------------------------------------------------------------- case probabilities
def case_weights(dataset_ids: Sequence[str], *, exponent: float = DEFAULT_EXPONENT) -> np.ndarray:
    """Unnormalised weight ``n_d ** -exponent`` of each case, ``float64 (N,)``.

    ``dataset_ids[i]`` is the dataset of training case ``i``; ``n_d`` counts the cases of the list.
    """
    if len(dataset_ids) == 0:
        raise ValueError("no training cases to sample from")
    counts = Counter(dataset_ids)
    n_i = np.array([counts[d] for d in dataset_ids], dtype=np.float64)
    return n_i ** (-float(exponent))


def case_probabilities(dataset_ids: Sequence[str], *, exponent: float = DEFAULT_EXPONENT) -> np.ndarray:
    """Per-case draw probability ``∝ n_d ** -exponent``, ``float64 (N,)`` summing to 1."""
    w = case_weights(dataset_ids, exponent=exponent)
    return w / w.sum()


def dataset_probabilities(
    dataset_sizes: dict[str, int], *, exponent: float = DEFAULT_EXPONENT
) -> dict[str, float]:
    """Expected share of draws per dataset: ``n_d ** (1 - exponent)`` normalised."""
    raw = {d: float(n) ** (1.0 - exponent) for d, n in dataset_sizes.items() if n > 0}
    total = sum(raw.values())
    return {d: v / total for d, v in raw.items()}


# ----------------------------------------------------------------------------- randomness
def stream_rngs(
    seed: int, rank: int, worker: int, *, epoch: int = 0, streams: int = 2
) -> list[np.random.Generator]:
    """Independent generators for one (seed, rank, worker) stream.

    The base entropy is ``[seed, rank, worker]``; ``epoch`` enters as the spawn key so that a
    DataLoader re-created each epoch does not replay the previous epoch. Using separate generators
    for the case choice and the centre choice keeps the case sequence independent of how many
    numbers the centre draws consume.
    """
    for name, v in (("seed", seed), ("rank", rank), ("worker", worker), ("epoch", epoch)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    ss = np.random.SeedSequence([seed, rank, worker], spawn_key=(epoch,))
    return [np.random.default_rng(s) for s in ss.spawn(streams)]


# ----------------------------------------------------------------------------- patch centres
def random_center(
    rng: np.random.Generator, *, shape_zyx: Sequence[int], patch_zyx: Sequence[int]
) -> tuple[int, int, int]:
    """A patch centre uniform over the volume (nnU-Net's random crop).

    The patch's lower corner is uniform in ``[lb, ub]`` with ``need = max(patch - shape, 0)``,
    ``lb = -ceil(need / 2)`` and ``ub = shape + floor(need / 2) + need % 2 - patch``: the patch lies
    inside the volume when the volume is large enough, otherwise the volume lies inside the patch
    (padded). The centre is ``corner + patch // 2`` (the convention of :mod:`.patches`).
    """
    center = []
    for s, p in zip(shape_zyx, patch_zyx, strict=True):
        need = max(p - s, 0)
        lb = -need // 2
        ub = s + need // 2 + need % 2 - p
        corner = int(rng.integers(lb, ub + 1))
        center.append(corner + p // 2)
    return (center[0], center[1], center[2])


def foreground_classes(fg_locations: np.ndarray, classes_present: Sequence[int] | None = None) -> list[int]:
    """Local classes that can be oversampled: present in the case and with stored locations."""
    stored = sorted({int(c) for c in np.unique(fg_locations[:, 0])}) if len(fg_locations) else []
    if classes_present is None:
        return stored
    present = {int(c) for c in classes_present}
    return [c for c in stored if c in present]


def foreground_center(
    rng: np.random.Generator, fg_locations: np.ndarray, classes: Sequence[int]
) -> tuple[tuple[int, int, int], int]:
    """A stored foreground voxel: class uniform among ``classes``, voxel uniform within the class.

    ``fg_locations`` is ``int (N, 4)`` rows ``[local_class, z, y, x]``. Returns ``(center_zyx, class)``.
    """
    cls = int(classes[int(rng.integers(len(classes)))])
    rows = np.flatnonzero(fg_locations[:, 0] == cls)
    z, y, x = fg_locations[rows[int(rng.integers(len(rows)))], 1:4]
    return (int(z), int(y), int(x)), cls


@dataclass(frozen=True)
class CenterDraw:
    """Where one patch is centred; ``fg_class`` is the local class it was forced onto, or -1."""

    center_zyx: tuple[int, int, int]
    fg_class: int


def fixed_foreground_slots(
    batch_size: int, fg_fraction: float = DEFAULT_FG_FRACTION, *, rank: int = 0, world_size: int = 1
) -> tuple[bool, ...]:
    """Which slots of ``rank``'s local batch are forced onto foreground in ``fg_mode="fixed"``.

    nnU-Net v1's rule on the global batch of ``B = batch_size * world_size`` samples: sample ``g`` is
    forced iff ``g >= round(B * (1 - fg_fraction))`` (``DataLoader3D.get_do_oversample``; Python's
    ``round``, half to even), global slot ``g = rank * batch_size + i``. Its DDP trainer splits the
    oversampling over the ranks so that the global batch follows this rule
    (``nnUNetTrainerV2_DDP.set_batch_size_and_oversample``). B = 4, 1/3: one forced (the last slot);
    B = 2: one of two; B = 1: none.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
        )
    if not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"fg_fraction must lie in [0, 1], got {fg_fraction}")
    first = round(batch_size * world_size * (1.0 - fg_fraction))
    return tuple(rank * batch_size + i >= first for i in range(batch_size))


class ForegroundSchedule:
    """Decides, patch by patch of one sample stream, whether the patch is forced onto foreground.

    ``mode="coin"``: each patch independently with probability ``fg_fraction`` (draws one number from the
    generator passed to :meth:`next`). ``mode="fixed"``: the stream is cut into local batches of
    ``batch_size`` consecutive patches, and slot ``i`` is forced iff
    ``fixed_foreground_slots(batch_size, fg_fraction, rank=rank, world_size=world_size)[i]`` (no random
    number drawn); the stream must start at a batch boundary, as the sources' streams do.
    """

    def __init__(
        self,
        *,
        mode: FgMode = "coin",
        fg_fraction: float = DEFAULT_FG_FRACTION,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mode not in FG_MODES:
            raise ValueError(f"fg_mode must be one of {FG_MODES}, got {mode!r}")
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must lie in [0, 1], got {fg_fraction}")
        self.mode = mode
        self.fg_fraction = float(fg_fraction)
        self.slots = (
            fixed_foreground_slots(batch_size, fg_fraction, rank=rank, world_size=world_size)
            if mode == "fixed"
            else ()
        )
        self._position = 0

    def next(self, rng: np.random.Generator) -> bool:
        """Whether the next patch of the stream is forced onto foreground."""
        if self.mode == "coin":
            return bool(rng.random() < self.fg_fraction)
        force = self.slots[self._position]
        self._position = (self._position + 1) % len(self.slots)
        return force


def draw_center(
    rng: np.random.Generator,
    *,
    shape_zyx: Sequence[int],
    patch_zyx: Sequence[int],
    fg_locations: np.ndarray | None,
    classes_present: Sequence[int] | None = None,
    fg_fraction: float = DEFAULT_FG_FRACTION,
    force_fg: bool | None = None,
) -> CenterDraw:
    """One patch centre: foreground with probability ``fg_fraction``, else random.

    The coin is tossed for every patch, so the foreground share is ``fg_fraction`` whatever the case;
    ``force_fg`` (e.g. from :meth:`ForegroundSchedule.next`) replaces the coin when given.
    A case without foreground (all-background label) falls back to a random centre.
    ``fg_locations`` may be ``None`` when no patch is forced (callers may skip reading it).
    """
    if force_fg is None:
        force_fg = bool(rng.random() < fg_fraction)
    if force_fg and fg_locations is not None:
        classes = foreground_classes(fg_locations, classes_present)
        if classes:
            center, cls = foreground_center(rng, fg_locations, classes)
            return CenterDraw(center, cls)
    return CenterDraw(random_center(rng, shape_zyx=shape_zyx, patch_zyx=patch_zyx), -1)


class PatchSampler:
    """Draws (case index, patch centre) pairs for a fixed list of training cases.

    Args:
        dataset_ids: dataset of each training case, ``(N,)``; sets the probabilities.
        patch_zyx: patch size in voxels.
        exponent: case weight ``n_d ** -exponent``.
        fg_fraction: share of patches forced onto foreground.
        rngs: ``(case_rng, center_rng)``, e.g. from :func:`stream_rngs`.
        fg_mode: ``"coin"`` (a coin per patch) or ``"fixed"`` (nnU-Net v1: a fixed count per global
            batch, see :func:`fixed_foreground_slots`); ``batch_size`` (per rank), ``rank`` and
            ``world_size`` place this stream's patches in the global batch for ``"fixed"``.
    """

    def __init__(
        self,
        dataset_ids: Sequence[str],
        *,
        patch_zyx: Sequence[int],
        rngs: Sequence[np.random.Generator],
        exponent: float = DEFAULT_EXPONENT,
        fg_fraction: float = DEFAULT_FG_FRACTION,
        fg_mode: FgMode = "coin",
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must lie in [0, 1], got {fg_fraction}")
        if len(patch_zyx) != 3 or any(int(p) < 1 for p in patch_zyx):
            raise ValueError(f"patch_zyx must be three positive sizes, got {tuple(patch_zyx)}")
        self.probabilities = case_probabilities(dataset_ids, exponent=exponent)
        self.patch_zyx = tuple(int(p) for p in patch_zyx)
        self.fg_fraction = float(fg_fraction)
        self.schedule = ForegroundSchedule(
            mode=fg_mode, fg_fraction=fg_fraction, batch_size=batch_size, rank=rank, world_size=world_size
        )
        self.case_rng, self.center_rng = rngs[0], rngs[1]

    def draw_cases(self, count: int) -> np.ndarray:
        """``count`` case indices, independent and with replacement, ``int64 (count,)``."""
        return self.case_rng.choice(len(self.probabilities), size=count, p=self.probabilities)

    def draw_center(
        self,
        *,
        shape_zyx: Sequence[int],
        fg_locations: np.ndarray | None,
        classes_present: Sequence[int] | None = None,
    ) -> CenterDraw:
        return draw_center(
            self.center_rng,
            shape_zyx=shape_zyx,
            patch_zyx=self.patch_zyx,
            fg_locations=fg_locations,
            classes_present=classes_present,
            fg_fraction=self.fg_fraction,
            force_fg=self.schedule.next(self.center_rng),
        )


# ----------------------------------------------------------------------------- streaming weights
def stream_patch_counts(rng: np.random.Generator, expected: np.ndarray | float) -> np.ndarray | int:
    """Stochastic rounding: ``floor(e) + Bernoulli(e - floor(e))``, so the mean is exactly ``e``."""
    e = np.asarray(expected, dtype=np.float64)
    base = np.floor(e)
    out = (base + (rng.random(e.shape) < (e - base))).astype(np.int64)
    return int(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------- splits
def kfold_split(
    case_ids: Sequence[str], fold: int, *, n_splits: int = 5, seed: int = KFOLD_SEED
) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` of one fold, nnU-Net style.

    Same result as sklearn ``KFold(n_splits, shuffle=True, random_state=seed).split(sorted(ids))``:
    the sorted ids' indices are permuted with ``RandomState(seed)``, cut into ``n_splits`` contiguous
    folds (the first ``n % n_splits`` one larger), and both sides are returned in sorted order.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("kfold_split: duplicate case ids")
    if not 0 <= fold < n_splits:
        raise ValueError(f"fold must lie in [0, {n_splits}), got {fold}")
    if len(ids) < n_splits:
        raise ValueError(f"kfold_split: {len(ids)} cases cannot make {n_splits} folds")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, len(ids) // n_splits)
    sizes[: len(ids) % n_splits] += 1
    start = int(sizes[:fold].sum())
    val_mask = np.zeros(len(ids), dtype=bool)
    val_mask[order[start : start + sizes[fold]]] = True
    return [i for i, v in zip(ids, val_mask) if not v], [i for i, v in zip(ids, val_mask) if v]


def split_keys(
    keys: Sequence[tuple[str, str]], fold: int | None, *, n_splits: int = 5, seed: int = KFOLD_SEED
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Per-dataset k-fold over ``(dataset_id, case_id)`` keys: ``(train, val)``.

    ``fold=None`` (or ``"all"`` upstream) trains on everything. Datasets with fewer cases than folds
    go entirely to training (nnU-Net cannot split them either).
    """
    by_dataset: dict[str, list[str]] = {}
    for d, c in keys:
        by_dataset.setdefault(d, []).append(c)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for d in sorted(by_dataset):
        ids = by_dataset[d]
        if fold is None or len(ids) < n_splits:
            train += [(d, c) for c in sorted(ids)]
            continue
        tr, va = kfold_split(ids, fold, n_splits=n_splits, seed=seed)
        train += [(d, c) for c in tr]
        val += [(d, c) for c in va]
    return train, val


def split_cases(
    cases: Sequence[T], fold: int | None, *, n_splits: int = 5, seed: int = KFOLD_SEED
) -> tuple[list[T], list[T]]:
    """:func:`split_keys` over case entries (manifest records, dicts, pairs or keys), returning the
    entries themselves: ``(train, val)``, each sorted by (dataset_id, case_id)."""
    by_ref = {case_ref(c): c for c in cases}
    if len(by_ref) != len(cases):
        raise ValueError("split_cases: duplicate cases")
    train, val = split_keys(list(by_ref), fold, n_splits=n_splits, seed=seed)
    return [by_ref[k] for k in train], [by_ref[k] for k in val]


SPLITS_FILE = "splits.json"  # in a converted collection's root, written by the converter
SPLITS_VERSION = 1


def make_splits(
    keys: Sequence[tuple[str, str]], *, n_splits: int = 5, seed: int = KFOLD_SEED
) -> dict[str, Any]:
    """Every fold of :func:`split_keys` as JSON-able data (nnU-Net's ``splits_final.json``, per dataset).

    ``folds[f]`` holds ``train`` and ``val`` lists of ``<dataset_id>__<case_id>`` keys, sorted.
    """
    folds = []
    for fold in range(n_splits):
        train, val = split_keys(keys, fold, n_splits=n_splits, seed=seed)
        folds.append({"train": [case_key(*k) for k in train], "val": [case_key(*k) for k in val]})
    return {
        "version": SPLITS_VERSION,
        "n_splits": n_splits,
        "seed": seed,
        "rule": "per dataset: sorted case ids, KFold(n_splits, shuffle=True, random_state=seed); "
        "datasets with fewer cases than folds are in every fold's training set",
        "folds": folds,
    }


def write_splits(
    root: Any, keys: Sequence[tuple[str, str]], *, n_splits: int = 5, seed: int = KFOLD_SEED
) -> Any:
    """Write ``root/splits.json`` (atomically) for the cases ``keys``; returns its path (``root`` may be
    a URL: the file is then published as one object)."""
    import json
    from pathlib import Path

    from multitalent import storage

    if storage.is_url(root):
        url = storage.join(root, SPLITS_FILE)
        return storage.write_text_atomic(
            url, json.dumps(make_splits(keys, n_splits=n_splits, seed=seed), indent=1)
        )
    path = Path(root) / SPLITS_FILE
    tmp = path.with_name(f".tmp-{SPLITS_FILE}")
    tmp.write_text(json.dumps(make_splits(keys, n_splits=n_splits, seed=seed), indent=1))
    tmp.replace(path)
    return path


def load_splits(path: Any) -> dict[str, Any]:
    """Read a ``splits.json`` written by :func:`write_splits` (ValueError naming the file otherwise)."""
    import json

    from multitalent import storage

    try:
        data = json.loads(storage.read_text(path))
        if data["version"] != SPLITS_VERSION or len(data["folds"]) != data["n_splits"]:
            raise ValueError("inconsistent version or number of folds")
        return dict(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable splits file ({e})") from None


def fold_keys(
    splits: Mapping[str, Any], fold: int | None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, val)`` ``(dataset_id, case_id)`` pairs of one fold of a splits file (``None``: all train)."""
    folds = splits["folds"]
    if fold is None:
        keys = sorted({case_ref(k) for k in [*folds[0]["train"], *folds[0]["val"]]})
        return keys, []
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold must lie in [0, {len(folds)}), got {fold}")
    return [case_ref(k) for k in folds[fold]["train"]], [case_ref(k) for k in folds[fold]["val"]]


def split_collection(root: Any, cases: Sequence[T], fold: int | None) -> tuple[list[T], list[T]]:
    """:func:`split_cases` of a converted collection: from its ``splits.json`` when there is one (the
    file evaluation reads too), else computed by the same rule. Raises ValueError when the file and the
    cases disagree (convert again to rewrite it)."""
    from multitalent import storage

    path = storage.join(root, SPLITS_FILE)
    if not storage.is_file(path):
        return split_cases(cases, fold)
    by_ref = {case_ref(c): c for c in cases}
    train, val = fold_keys(load_splits(path), fold)
    listed = set(train) | set(val)
    if listed != set(by_ref):
        extra, absent = sorted(set(by_ref) - listed), sorted(listed - set(by_ref))
        raise ValueError(
            f"{path}: splits do not match the collection's cases (not in the file: {extra[:5]}, "
            f"not in the collection: {absent[:5]}); convert again to rewrite it"
        )
    return [by_ref[k] for k in train], [by_ref[k] for k in val]


# ----------------------------------------------------------------------------- rank/worker split
def partition(
    items: Sequence[T], rank: int, world_size: int, worker: int = 0, num_workers: int = 1
) -> list[T]:
    """The share of ``items`` for one (rank, worker): every ``world_size * num_workers``-th item.

    Shares are disjoint and together complete; they differ in size by at most one. Slot
    ``rank * num_workers + worker`` takes items ``slot, slot + S, slot + 2S, …``.
    """
    if world_size < 1 or num_workers < 1:
        raise ValueError(f"world_size and num_workers must be >= 1, got {world_size}, {num_workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} outside [0, {num_workers})")
    slots = world_size * num_workers
    return list(items[rank * num_workers + worker :: slots])
