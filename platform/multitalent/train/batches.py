"""Training batches of one rank, reproducible per iteration so that a resumed run is exact.

``zarr`` (default): the batch of iteration ``i`` on rank ``r`` is a pure function of ``(seed, r, i)``:
the case/centre draws use ``stream_rngs(seed, r, 0, epoch=i)`` and the augmentation generator is
seeded from ``(seed, r, i)``. A resumed run therefore sees the batches the interrupted one would have
seen, whatever the number of loader processes and with no sampler state to save.

``webdataset``: a stream per epoch (``set_epoch(epoch)``); resuming mid-epoch re-reads the epoch's
stream and drops the batches already used, which is exact when the number of loader workers is
unchanged and costs reading at most one epoch of data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from multitalent.data.augment import AugmentConfig, augment_batch, read_shape_zyx, sample_params
from multitalent.data.batch import Batch, DrawnBatch, collate
from multitalent.data.laterality import laterality_config
from multitalent.data.sources import PatchDraw

if TYPE_CHECKING:
    from multitalent.catalog import Catalog

_AUGMENT_STREAM = 1  # distinguishes the augmentation seed from the data streams of the same step


def step_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The CPU generator of iteration ``iteration``'s augmentation on ``rank``."""
    state = np.random.SeedSequence([seed, rank, iteration, _AUGMENT_STREAM]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


@dataclass(frozen=True)
class AugmentPlan:
    """Augmentation of the batches: ``config`` None = off; ``read_zyx`` is the patch the loader reads
    (larger than ``patch_zyx`` so rotations rarely pull in padding); ``in_loader`` = applied in the
    loader (CPU) rather than in the step on the training device; ``laterality`` = what mirroring along
    x (left-right) does, one of :data:`multitalent.data.laterality.LATERALITY_MODES`, already folded
    into ``config`` (``p_mirror_zyx`` and ``mirror_swap``)."""

    config: AugmentConfig | None
    patch_zyx: tuple[int, int, int]
    read_zyx: tuple[int, int, int]
    in_loader: bool
    laterality: str = "naive"

    @classmethod
    def make(
        cls,
        *,
        enabled: bool,
        where: str,
        patch_zyx: Sequence[int],
        config: AugmentConfig | None = None,
        laterality: str = "naive",
        catalog: Catalog | None = None,
    ) -> AugmentPlan:
        """``config`` defaults to :class:`AugmentConfig`'s defaults; ``laterality: swap`` needs the
        ``catalog`` (its lateral pairs)."""
        z, y, x = (int(p) for p in patch_zyx)
        if not enabled:
            return cls(None, (z, y, x), (z, y, x), False, laterality)
        config = laterality_config(config or AugmentConfig(), laterality, catalog)
        return cls(config, (z, y, x), read_shape_zyx((z, y, x), config), where == "loader", laterality)

    def apply(self, batch: Batch | DrawnBatch, generator: torch.Generator) -> Batch:
        """The augmented batch: a :class:`DrawnBatch` with its own parameters (``generator`` unused), a
        :class:`Batch` read enlarged with parameters drawn from ``generator``."""
        if isinstance(batch, DrawnBatch):
            assert self.config is not None  # only augmenting plans draw
            return batch.augment(self.config, self.patch_zyx)
        if self.config is None:
            return batch
        image, label = augment_batch(
            batch.image_bczyx,
            batch.label_bzyx,
            config=self.config,
            generator=generator,
            out_shape_zyx=self.patch_zyx,
            dataset_idx_b=batch.dataset_idx_b,
        )
        return Batch(image, label, batch.dataset_idx_b, batch.annotated_bk, batch.keys)


class StepBatches(IterableDataset):
    """``(iteration, batch)`` for iterations ``[start, stop)`` of one rank from a ``ZarrPatchSource`` (see
    :meth:`batch_at`).

    Loader worker ``w`` of ``n`` makes iterations ``start + w, start + w + n, ...``; torch's DataLoader
    collects its workers in turn, so the output is in iteration order.
    """

    def __init__(self, source: Any, *, start: int, stop: int, augment: AugmentPlan) -> None:
        super().__init__()
        self.source, self.start, self.stop, self.augment = source, int(start), int(stop), augment

    def batch_at(self, iteration: int) -> Batch | DrawnBatch:
        """Iteration ``iteration``'s batch: augmented when augmentation runs in the loader; a
        :class:`DrawnBatch` (parameters drawn, not applied) when it runs in the step on the device."""
        src = self.source
        src.set_epoch(iteration)  # the data stream of this iteration: stream_rngs(seed, rank, 0, epoch=i)
        draws = src.draws(worker=0, num_workers=1)
        picks = [next(draws) for _ in range(src.batch_size)]
        config = self.augment.config
        if config is None:
            samples = [src.read_sample(d.case, d.center_zyx, fg_class=d.fg_class) for d in picks]
            return collate(samples, annotated_dk=src.annotated_dk)
        drawn = self._drawn(picks, step_generator(src.seed, src.rank, iteration))
        return drawn.augment(config, self.augment.patch_zyx) if self.augment.in_loader else drawn

    def _drawn(self, picks: list[PatchDraw], generator: torch.Generator) -> DrawnBatch:
        """Parameters first: only the rotated or scaled samples read the enlarged patch (``read_zyx``);
        the others (about 2/3 under the defaults) read the output patch, 5.7x fewer voxels at the
        paper's patch. Augmenting the result equals reading every sample enlarged and then augmenting
        (:func:`multitalent.data.augment.augment_split`)."""
        src, plan = self.source, self.augment
        assert plan.config is not None
        params = sample_params(plan.config, len(picks), generator, n_channels=1)
        wide_b = params.reads_beyond_patch_b.tolist()
        samples = [
            src.read_sample(
                d.case,
                d.center_zyx,
                fg_class=d.fg_class,
                patch_zyx=plan.read_zyx if wide else plan.patch_zyx,
                normalize=False,  # int16 HU: normalised where the batch is augmented (half the bytes)
            )
            for d, wide in zip(picks, wide_b)
        ]
        groups = [[s for s, w in zip(samples, wide_b) if w == want] for want in (True, False)]
        wide, narrow = (collate(g, annotated_dk=src.annotated_dk) if g else None for g in groups)
        dataset_idx = np.array([s.dataset_idx for s in samples], dtype=np.int64)
        annotated_bk = torch.from_numpy(np.ascontiguousarray(src.annotated_dk[dataset_idx]))
        keys = [s.key for s in samples]
        return DrawnBatch(
            wide, narrow, params, torch.from_numpy(dataset_idx), annotated_bk, keys, src.normalization
        )

    def __iter__(self) -> Iterator[tuple[int, Batch | DrawnBatch]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(self.start + worker, self.stop, workers):
            yield i, self.batch_at(i)


def _first(item: Any) -> Any:
    """The DataLoader's collate: batches come ready-made."""
    return item


def zarr_batches(
    source: Any, *, start: int, stop: int, augment: AugmentPlan, loader_workers: int
) -> Iterator[tuple[int, Batch | DrawnBatch]]:
    """Iterations ``[start, stop)`` of one rank, read by ``loader_workers`` processes (0: inline)."""
    dataset = StepBatches(source, start=start, stop=stop, augment=augment)
    if loader_workers == 0:
        yield from dataset
        return
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        collate_fn=_first,
        prefetch_factor=2,
        pin_memory=torch.cuda.is_available(),
    )
    yield from loader


def webdataset_batches(
    make_source: Any,
    *,
    start: int,
    stop: int,
    iterations_per_epoch: int,
    augment: AugmentPlan,
    loader_workers: int,
) -> Iterator[tuple[int, Batch]]:
    """Iterations ``[start, stop)`` from a per-epoch ``WebDatasetPatchSource`` stream.

    ``make_source(epoch)`` builds the source of an epoch (``num_batches = iterations_per_epoch``).
    Augmentation, when in the loader, runs in this process here (the stream's workers do not know the
    iteration index).
    """
    iteration = start
    while iteration < stop:
        epoch = iteration // iterations_per_epoch
        source = make_source(epoch)
        loader: Any = (
            source
            if loader_workers == 0
            else DataLoader(source, batch_size=None, num_workers=loader_workers, collate_fn=_first)
        )
        first = epoch * iterations_per_epoch
        for j, batch in enumerate(loader):
            i = first + j
            if i < iteration:
                continue  # used before the resume
            if i >= stop:
                break
            if augment.in_loader:
                batch = augment.apply(batch, step_generator(source.seed, source.rank, i))
            yield i, batch
            iteration = i + 1
        else:
            if iteration < min(stop, first + iterations_per_epoch):
                raise RuntimeError(
                    f"the WebDataset stream of epoch {epoch} ended after {iteration - first} of "
                    f"{iterations_per_epoch} batches"
                )
