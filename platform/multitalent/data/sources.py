"""Training batch sources over the converted shards; both yield :class:`~multitalent.data.batch.Batch`.

``ZarrPatchSource``: random access. Every batch element picks a case independently, with replacement,
with probability ∝ n_d^-exponent (:mod:`.sampling`), then reads only the chunks its patch touches from
the case's Zarr store. Each (rank, loader worker) has its own random stream
``SeedSequence([seed, rank, worker])``; all of them see all cases.

``WebDatasetPatchSource``: streaming over tar shards (local paths, ``file://``, ``http(s)://``, any
fsspec URL such as ``s3://``, ``pipe:`` commands; opened and decoded by
:mod:`multitalent.shards.wds_reader`). Each epoch the shard
list is shuffled with ``(seed, epoch)`` (the same order on every rank) and split disjointly over
ranks × workers with :func:`~.sampling.partition`; when there are fewer shards than slots, every slot
reads all shards and keeps every ``slots``-th case instead. Each loaded case enters a shuffle buffer
with a patch budget and patches are drawn from random buffer entries.

Streaming √n weighting: a stream sees every case once per epoch, so the weighting goes into the
number of patches taken from a case. Case ``c`` of dataset ``d`` gets
``k_c = stochastic_round(patches_per_case * w_d / mean_w)`` patches, ``w_d = n_d^-exponent`` and
``mean_w`` the mean weight over all training cases; ``floor`` plus a Bernoulli draw of the remainder
makes ``E[k_c]`` exact. Over an epoch dataset ``d`` then contributes ``∝ n_d * n_d^-exponent =
n_d^(1-exponent)`` patches, i.e. ∝ √n for exponent 0.5 (the same long-run shares as the random-access
source), and ``patches_per_case`` is the mean number of patches per loaded case (I/O per patch is
predictable). Cases with ``k_c = 0`` are read and dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from multitalent.data.batch import Batch, PatchSample, collate
from multitalent.data.patches import read_patch
from multitalent.data.sampling import (
    DEFAULT_EXPONENT,
    DEFAULT_FG_FRACTION,
    KEY_SEPARATOR,
    FgMode,
    ForegroundSchedule,
    PatchSampler,
    case_key,
    case_ref,
    draw_center,
    partition,
    stream_patch_counts,
    stream_rngs,
)
from multitalent.preprocess.plan import Normalization
from multitalent.shards.wds_reader import (
    READ_RETRIES,
    RETRY_BACKOFF_S,
    decode_wds_sample,
    expand_shard_urls,
    iter_shard_samples,
)

# ----------------------------------------------------------------------------- shared helpers
T = TypeVar("T")


def retrying(
    where: str, read: Callable[[], T], *, retries: int = READ_RETRIES, backoff_s: float = RETRY_BACKOFF_S
) -> T:
    """``read()``; when it fails because of the object store (network, timeouts, the store's errors),
    again after ``backoff_s``, ``2 * backoff_s``, ... up to ``retries`` times, then a
    :class:`~multitalent.shards.ShardError` naming ``where`` and the cause. Other errors propagate."""
    import time

    from multitalent import storage
    from multitalent.shards import ShardError

    attempt = 0
    while True:
        try:
            return read()
        except Exception as e:
            if not storage.is_store_failure(e):
                raise
            if attempt >= retries:
                cause = storage.describe_failure(e)
                raise ShardError(
                    where, f"the object store failed {attempt + 1} times in a row ({cause})"
                ) from e
            attempt += 1
            time.sleep(backoff_s * 2 ** (attempt - 1))


def _zarr_relpath(entry: Any, dataset_id: str, case_id: str) -> str:
    path = entry.get("zarr_path") if isinstance(entry, Mapping) else getattr(entry, "zarr_path", None)
    return str(path) if path else f"zarr/{dataset_id}/{case_id}.zarr"


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root) / rel)


def extract_patch(
    image_zyx: Any,
    label_zyx: Any,
    center_zyx: Sequence[int],
    patch_zyx: Sequence[int],
    normalization: Normalization,
    *,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image_czyx float32 normalised, label_zyx uint8)`` of one patch of a stored case.

    Works on numpy and zarr arrays alike. The image is padded with air (the lower clip value,
    normalised): the converter crops cases to the body, so what lies outside a stored case is air, not
    the collection's mean intensity (nnU-Net's 0 after normalisation). The label is padded with 0.
    ``normalize=False``: the image stays int16 HU, padded with ``normalization.hu_pad`` (air once
    normalised), for normalising where the batch lands (:meth:`Normalization.apply_torch`).
    """
    if normalize:
        image = read_patch(
            image_zyx,
            center_zyx,
            patch_zyx,
            pad_value=normalization.air,
            dtype=np.float32,
            transform=normalization.apply,
        )
    else:
        image = read_patch(image_zyx, center_zyx, patch_zyx, pad_value=normalization.hu_pad, dtype=np.int16)
    label = read_patch(label_zyx, center_zyx, patch_zyx, pad_value=0, dtype=np.uint8)
    return image[None], label


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _share(total: int | None, worker: int, num_workers: int) -> int | None:
    """This worker's part of ``total`` batches, so a DataLoader yields ``total`` per rank."""
    if total is None:
        return None
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _batches(
    samples: Iterator[PatchSample], *, batch_size: int, annotated_dk: np.ndarray, count: int | None
) -> Iterator[Batch]:
    made = 0
    while count is None or made < count:
        chunk = [s for _, s in zip(range(batch_size), samples)]
        if len(chunk) < batch_size:
            return  # a finite stream ended; drop the incomplete batch
        yield collate(chunk, annotated_dk=annotated_dk)
        made += 1


def _check_common(
    *, patch_zyx: Sequence[int], batch_size: int, rank: int, world_size: int
) -> tuple[int, int, int]:
    if len(patch_zyx) != 3 or any(int(p) < 1 for p in patch_zyx):
        raise ValueError(f"patch_zyx must be three positive sizes, got {tuple(patch_zyx)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    z, y, x = (int(p) for p in patch_zyx)
    return (z, y, x)


# ----------------------------------------------------------------------------- random access
class PatchDraw(NamedTuple):
    """One draw of :meth:`ZarrPatchSource.draws`: training case index, centre, forced class or -1."""

    case: int
    center_zyx: tuple[int, int, int]
    fg_class: int


class ZarrPatchSource(IterableDataset):
    """Batches of random patches read from per-case Zarr stores.

    Args:
        root: converted output root (local path or fsspec URL) holding ``zarr/`` and ``manifest.json``.
        catalog: the label space; ``catalog.dataset_index`` maps datasets to ``dataset_idx_b``.
        normalization: the plan's intensity normalisation (``Plan.load(...).normalization``).
        cases: training cases (manifest entries, ``CaseRecord``s, ``(dataset, case)`` pairs or
            ``<dataset>__<case>`` keys); ``None`` takes every case of the manifest. ``n_d`` for the
            weights counts these cases.
        patch_zyx: patch size in voxels; batch_size: patches per batch (per rank).
        seed, rank, world_size: the random stream is ``SeedSequence([seed, rank, worker])``.
        exponent: case weight ``n_d^-exponent``; fg_fraction: share of foreground-centred patches.
        num_batches: batches per iteration (per rank, split over loader workers); ``None`` = forever.
        cache_cases: opened case stores kept per worker (each holds its fg locations in memory).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        catalog: Any,
        normalization: Normalization,
        cases: Sequence[Any] | None = None,
        patch_zyx: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        exponent: float = DEFAULT_EXPONENT,
        fg_fraction: float = DEFAULT_FG_FRACTION,
        fg_mode: FgMode = "coin",
        num_batches: int | None = None,
        cache_cases: int = 32,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.patch_zyx = _check_common(
            patch_zyx=patch_zyx, batch_size=batch_size, rank=rank, world_size=world_size
        )
        self.root = str(root)
        self.catalog = catalog
        self.normalization = normalization
        if cases is None:
            from multitalent.shards import load_manifest

            cases = _manifest_cases(load_manifest(root, storage_options=storage_options))
        if len(cases) == 0:
            raise ValueError(f"{root}: no training cases")
        refs = [case_ref(c) for c in cases]
        if len(set(refs)) != len(refs):
            raise ValueError(f"{root}: duplicate training cases")
        self.refs = refs
        self.paths = [_join(self.root, _zarr_relpath(c, d, i)) for c, (d, i) in zip(cases, refs)]
        self.dataset_idx = np.array([catalog.dataset_index(d) for d, _ in refs], dtype=np.int64)
        self.annotated_dk = np.asarray(catalog.annotated_mask())
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.exponent, self.fg_fraction, self.fg_mode = exponent, fg_fraction, fg_mode
        self.num_batches, self.cache_cases = num_batches, max(1, cache_cases)
        self.storage_options = dict(storage_options or {})
        self.epoch = 0
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        """A new random stream per epoch (when the DataLoader re-creates its workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless ZarrPatchSource has no length")
        return self.num_batches

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # open stores are per process
        return state

    def open_case(self, i: int) -> Any:
        """The opened store of training case ``i`` (LRU-cached)."""
        from multitalent.shards import open_case_zarr

        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        case = self._retrying(
            self.paths[i], lambda: open_case_zarr(self.paths[i], storage_options=self.storage_options or None)
        )
        self._cache[i] = case
        if len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)
        return case

    def read_sample(
        self,
        i: int,
        center_zyx: Sequence[int],
        *,
        fg_class: int = -1,
        patch_zyx: Sequence[int] | None = None,
        normalize: bool = True,
    ) -> PatchSample:
        """The patch of training case ``i`` centred at ``center_zyx``, of the source's patch size or
        ``patch_zyx`` (a loader that drew the augmentation first reads less for the samples that are
        neither rotated nor scaled); ``normalize=False`` keeps the image int16 HU (see
        :func:`extract_patch`)."""
        case = self.open_case(i)
        size = self.patch_zyx if patch_zyx is None else tuple(int(p) for p in patch_zyx)
        norm = self.normalization
        image, label = self._retrying(
            self.paths[i],
            lambda: extract_patch(case.image, case.label, center_zyx, size, norm, normalize=normalize),
        )
        z, y, x = (int(c) for c in center_zyx)
        return PatchSample(
            image, label, int(self.dataset_idx[i]), case_key(*self.refs[i]), (z, y, x), fg_class
        )

    def _retrying(self, where: str, read: Callable[[], T]) -> T:
        """``read()``, again after 1, 2, 4, ... s when object storage fails (up to ``READ_RETRIES``
        times); local reads are not retried."""
        return retrying(where, read) if "://" in self.root else read()

    def samples(self, *, worker: int = 0, num_workers: int = 1) -> Iterator[PatchSample]:
        """Endless patch samples of one worker's stream (all workers see all cases)."""
        for draw in self.draws(worker=worker, num_workers=num_workers):
            yield self.read_sample(draw.case, draw.center_zyx, fg_class=draw.fg_class)

    def draws(self, *, worker: int = 0, num_workers: int = 1) -> Iterator[PatchDraw]:
        """The (case, centre) draws of :meth:`samples`, without reading the patches."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} outside [0, {num_workers})")
        sampler = PatchSampler(
            [d for d, _ in self.refs],
            patch_zyx=self.patch_zyx,
            rngs=stream_rngs(self.seed, self.rank, worker, epoch=self.epoch),
            exponent=self.exponent,
            fg_fraction=self.fg_fraction,
            fg_mode=self.fg_mode,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )
        while True:
            for i in sampler.draw_cases(self.batch_size):
                case = self.open_case(int(i))
                draw = sampler.draw_center(
                    shape_zyx=case.image.shape,
                    fg_locations=case.fg_locations,
                    classes_present=case.meta.get("classes_present"),
                )
                yield PatchDraw(int(i), draw.center_zyx, draw.fg_class)

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_slot()
        return _batches(
            self.samples(worker=worker, num_workers=num_workers),
            batch_size=self.batch_size,
            annotated_dk=self.annotated_dk,
            count=_share(self.num_batches, worker, num_workers),
        )


def _manifest_cases(manifest: Any) -> list[Any]:
    if isinstance(manifest, Mapping):
        return list(manifest["cases"])
    if hasattr(manifest, "cases"):
        return list(manifest.cases)
    return list(manifest)


# ----------------------------------------------------------------------------- streaming
class WebDatasetPatchSource(IterableDataset):
    """Batches of patches streamed from WebDataset tar shards (see the module docstring).

    Args:
        urls: shard URLs or paths (e.g. ``multitalent.shards.shard_urls(out_root)``).
        catalog, normalization, patch_zyx, batch_size, seed, rank, world_size, exponent, fg_fraction: as for
            :class:`ZarrPatchSource`.
        cases: training cases; others in the stream are skipped. ``n_d`` counts these cases.
        dataset_sizes: instead of ``cases``, ``{dataset_id: n_training_cases}``; every streamed case of
            those datasets is used.
        shuffle_buffer: decoded cases held per worker (memory: about one volume each).
        patches_per_case: mean number of patches taken per loaded case.
        num_batches: batches per iteration (per rank, split over workers); ``None`` = forever.
        epochs: passes over the shards per iteration; ``None`` = endless.
    """

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        catalog: Any,
        normalization: Normalization,
        patch_zyx: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        cases: Sequence[Any] | None = None,
        dataset_sizes: Mapping[str, int] | None = None,
        shuffle_buffer: int = 8,
        patches_per_case: float = 2.0,
        exponent: float = DEFAULT_EXPONENT,
        fg_fraction: float = DEFAULT_FG_FRACTION,
        fg_mode: FgMode = "coin",
        num_batches: int | None = None,
        epochs: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.patch_zyx = _check_common(
            patch_zyx=patch_zyx, batch_size=batch_size, rank=rank, world_size=world_size
        )
        self.urls = expand_shard_urls(urls)
        if not self.urls:
            raise ValueError("WebDatasetPatchSource: no shard URLs")
        if shuffle_buffer < 1 or not patches_per_case > 0:
            raise ValueError(
                f"need shuffle_buffer >= 1 and patches_per_case > 0, got {shuffle_buffer}, {patches_per_case}"
            )
        self.catalog = catalog
        self.normalization = normalization
        if cases is not None:
            refs = [case_ref(c) for c in cases]
            self.keys: set[str] | None = {case_key(d, c) for d, c in refs}
            sizes: dict[str, int] = {}
            for d, _ in refs:
                sizes[d] = sizes.get(d, 0) + 1
        elif dataset_sizes is not None:
            self.keys = None
            sizes = {str(d): int(n) for d, n in dataset_sizes.items() if int(n) > 0}
        else:
            raise ValueError("WebDatasetPatchSource needs the training cases (cases=) or dataset_sizes=")
        if not sizes:
            raise ValueError("WebDatasetPatchSource: no training cases")
        for d in sizes:
            catalog.dataset_index(d)  # unknown datasets fail here, not mid-stream
        self.dataset_sizes = sizes
        total = sum(sizes.values())
        mean_w = sum(n * n ** (-exponent) for n in sizes.values()) / total
        # expected patches of one case of each dataset (module docstring)
        self.expected_patches = {d: patches_per_case * n ** (-exponent) / mean_w for d, n in sizes.items()}
        self.annotated_dk = np.asarray(catalog.annotated_mask())
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer, self.patches_per_case = shuffle_buffer, patches_per_case
        self.exponent, self.fg_fraction, self.fg_mode = exponent, fg_fraction, fg_mode
        self.num_batches, self.epochs = num_batches, epochs
        self.storage_options = dict(storage_options or {})
        self.start_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the shard order and random streams at ``epoch``."""
        self.start_epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless WebDatasetPatchSource has no length")
        return self.num_batches

    def shard_plan(self, epoch: int, worker: int = 0, num_workers: int = 1) -> tuple[list[str], int, int]:
        """``(urls, slot, slots)`` one worker reads in ``epoch``: when ``slots == 1`` it keeps every case
        of its shards, else it reads all shards and keeps the cases with stream index ``% slots == slot``."""
        order = list(self.urls)
        np.random.default_rng(np.random.SeedSequence([self.seed], spawn_key=(epoch,))).shuffle(order)
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        if len(order) >= slots:
            return partition(order, self.rank, self.world_size, worker, num_workers), 0, 1
        return order, slot, slots

    def _rngs(self, worker: int) -> list[np.random.Generator]:
        """(unused, centre, buffer pick, patch counts) generators of one worker."""
        return stream_rngs(self.seed, self.rank, worker, epoch=self.start_epoch, streams=4)

    def slot_cases(self, epoch: int, *, worker: int = 0, num_workers: int = 1) -> Iterator[Any]:
        """The decoded training cases one (rank, worker) streams in ``epoch``, in stream order.

        Over all ranks × workers these are disjoint and complete. Cases outside the training set are
        skipped before decoding.
        """
        urls, slot, slots = self.shard_plan(epoch, worker, num_workers)
        index = 0
        for url in urls:
            for raw in iter_shard_samples(url, storage_options=self.storage_options):
                key = str(raw.get("__key__", ""))
                if self.keys is not None and key not in self.keys:
                    continue
                if key.partition(KEY_SEPARATOR)[0] not in self.expected_patches:
                    continue
                mine = index % slots == slot
                index += 1
                if mine:
                    yield decode_wds_sample(raw)

    def cases(self, *, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[Any, int]]:
        """This worker's decoded training cases with their patch budgets, epoch after epoch.

        Cases whose budget rounds to 0 are dropped here.
        """
        rng = self._rngs(worker)[3]
        epoch = self.start_epoch
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            used = 0
            for case in self.slot_cases(epoch, worker=worker, num_workers=num_workers):
                used += 1
                count = stream_patch_counts(rng, self.expected_patches[case.meta["dataset_id"]])
                if count > 0:
                    yield case, int(count)
            if used == 0:
                # An endless worker without cases would block the DataLoader (it collects workers in turn).
                raise ValueError(
                    f"epoch {epoch}: rank {self.rank} worker {worker} of {num_workers} found no training "
                    f"cases in its shards ({len(self.urls)} shards in all); use fewer loader workers or "
                    "more, smaller shards"
                )
            epoch += 1

    def samples(self, *, worker: int = 0, num_workers: int = 1) -> Iterator[PatchSample]:
        """Patch samples drawn from a shuffle buffer of loaded cases."""
        _, center_rng, buffer_rng, _ = self._rngs(worker)
        schedule = ForegroundSchedule(
            mode=self.fg_mode,
            fg_fraction=self.fg_fraction,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )
        buffer: list[list[Any]] = []  # [case, remaining patches]
        source = self.cases(worker=worker, num_workers=num_workers)
        exhausted = False
        while True:
            while not exhausted and len(buffer) < self.shuffle_buffer:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                else:
                    buffer.append(list(nxt))
            if not buffer:
                return
            j = int(buffer_rng.integers(len(buffer)))
            case = buffer[j][0]
            buffer[j][1] -= 1
            if buffer[j][1] == 0:
                buffer[j] = buffer[-1]
                buffer.pop()
            yield self.patch_of(case, center_rng, force_fg=schedule.next(center_rng))

    def patch_of(self, case: Any, rng: np.random.Generator, *, force_fg: bool | None = None) -> PatchSample:
        draw = draw_center(
            rng,
            shape_zyx=case.image.shape,
            patch_zyx=self.patch_zyx,
            fg_locations=case.fg_locations,
            classes_present=case.meta.get("classes_present"),
            fg_fraction=self.fg_fraction,
            force_fg=force_fg,
        )
        return self.read_sample(case, draw.center_zyx, fg_class=draw.fg_class)

    def read_sample(self, case: Any, center_zyx: Sequence[int], *, fg_class: int = -1) -> PatchSample:
        """The patch of a decoded case (``decode_wds_sample`` output) centred at ``center_zyx``."""
        image, label = extract_patch(case.image, case.label, center_zyx, self.patch_zyx, self.normalization)
        d, c = case.meta["dataset_id"], case.meta["case_id"]
        z, y, x = (int(v) for v in center_zyx)
        return PatchSample(image, label, self.catalog.dataset_index(d), case_key(d, c), (z, y, x), fg_class)

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_slot()
        return _batches(
            self.samples(worker=worker, num_workers=num_workers),
            batch_size=self.batch_size,
            annotated_dk=self.annotated_dk,
            count=_share(self.num_batches, worker, num_workers),
        )


__all__ = [
    "Batch",
    "WebDatasetPatchSource",
    "ZarrPatchSource",
    "case_key",
    "case_ref",
    "extract_patch",
]
