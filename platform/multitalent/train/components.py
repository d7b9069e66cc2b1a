"""Building the parts of a training run from its job: data setup, network, sources.

Shared by the worker loop and by ``--dry-run``, so a dry run builds exactly what a worker builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.catalog import Catalog, load_catalog
from multitalent.train.job import TrainJob

if TYPE_CHECKING:
    from multitalent.preprocess.plan import Plan


@dataclass(frozen=True)
class DataSetup:
    """The converted collection as the job uses it.

    ``train_cases`` / ``val_cases``: manifest records of the job's fold (``validation.fold``; datasets
    with fewer than 5 cases train on all of them), ``val_cases`` cut to ``validation.max_cases``.
    """

    root: Path
    catalog: Catalog
    plan: Plan
    plan_path: Path  # the plan's file, logged as a run artifact
    train_cases: list[Any]
    val_cases: list[Any]

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        return self.plan.target_spacing_zyx_mm


def load_data_setup(job: TrainJob, *, catalog: Catalog | None = None) -> DataSetup:
    """Load the plan (``plan.json``) and ``manifest.json`` of ``job.shards.path`` and split the cases.

    Raises:
        FileNotFoundError: the folder, its plan or its manifest is missing (convert first).
        PlanError: the plan is unreadable or invalid.
        ValueError: the shards were converted for another label space than the job's catalog.
    """
    from multitalent.data.sampling import split_cases
    from multitalent.preprocess.plan import PLAN_FILE, Plan
    from multitalent.shards import load_manifest

    root = Path(job.shards.path)
    plan_path = root / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(
            f"{plan_path}: no {PLAN_FILE}; convert the collection first (multitalent convert JOB.yaml) "
            "or point shards.path at a converted folder"
        )
    catalog = catalog or load_catalog(job.catalog)
    plan = Plan.load(plan_path)
    manifest = load_manifest(root)
    if manifest.catalog_hash != catalog.hash:
        raise ValueError(
            f"{root / 'manifest.json'}: converted for catalog hash {manifest.catalog_hash}, but the job's "
            f"catalog {job.catalog!r} has hash {catalog.hash}; convert with the same catalog"
        )
    train, val = split_cases(list(manifest.cases), job.validation.fold)
    if not train:
        raise ValueError(f"{root}: no training cases in fold {job.validation.fold}")
    if job.validation.max_cases is not None:
        val = val[: job.validation.max_cases]
    return DataSetup(root, catalog, plan, plan_path, train, val)


def build_model(job: TrainJob, catalog: Catalog, spacing_zyx_mm: tuple[float, float, float]) -> Any:
    """The job's network (plain torch; no distributed code in it)."""
    from multitalent.models import build_network

    a = job.architecture
    return build_network(
        a.arch,
        catalog.classes_per_dataset(),
        size=a.size,
        deep_supervision=a.deep_supervision,
        patch_size_zyx=a.patch_zyx,
        spacing_zyx_mm=spacing_zyx_mm,
    )


def output_levels(model: Any) -> int:
    """Outputs the network returns: its deep-supervision levels, or 1."""
    return int(model.ds_levels) if model.deep_supervision else 1


def zarr_source(
    job: TrainJob,
    setup: DataSetup,
    *,
    cases: list[Any],
    patch_zyx: tuple[int, int, int],
    batch_size: int,
    rank: int,
    world_size: int,
) -> Any:
    from multitalent.data.sources import ZarrPatchSource

    return ZarrPatchSource(
        setup.root,
        catalog=setup.catalog,
        normalization=setup.plan.normalization,
        cases=cases,
        patch_zyx=patch_zyx,
        batch_size=batch_size,
        seed=job.run.seed,
        rank=rank,
        world_size=world_size,
        exponent=job.data.exponent,
        fg_fraction=job.data.fg_fraction,
    )


def webdataset_source_factory(
    job: TrainJob, setup: DataSetup, *, patch_zyx: tuple[int, int, int], rank: int, world_size: int
) -> Any:
    """``make(epoch)`` -> a ``WebDatasetPatchSource`` streaming that epoch's batches of ``rank``."""
    from multitalent.data.sources import WebDatasetPatchSource
    from multitalent.shards import shard_urls

    urls = shard_urls(setup.root)
    if not urls:
        raise FileNotFoundError(f"{setup.root / 'wds'}: no WebDataset shards (shards.source: webdataset)")

    def make(epoch: int) -> Any:
        source = WebDatasetPatchSource(
            urls,
            catalog=setup.catalog,
            normalization=setup.plan.normalization,
            patch_zyx=patch_zyx,
            batch_size=job.micro_batch,
            seed=job.run.seed,
            rank=rank,
            world_size=world_size,
            cases=setup.train_cases,
            exponent=job.data.exponent,
            fg_fraction=job.data.fg_fraction,
            num_batches=job.schedule.iterations_per_epoch,
        )
        source.set_epoch(epoch)
        return source

    return make
