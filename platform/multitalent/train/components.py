"""Building the parts of a training run from its job, once: :func:`assemble`.

The worker (:class:`multitalent.train.loop.Trainer`), ``--dry-run`` (:func:`multitalent.train.launch.dry_run`)
and the overhead benchmark all call :func:`assemble`, so a dry run builds exactly what a worker builds.
This module is also where the job file is translated into the plain settings of the lower layers
(:class:`~multitalent.distributed.deepspeed_config.DeepSpeedSettings`,
:class:`~multitalent.distributed.ray_launch.WorkerGroup`, the augmentation and source settings), so no
lower layer knows the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.catalog import Catalog, load_catalog
from multitalent.train.job import TrainJob

if TYPE_CHECKING:
    import torch

    from multitalent.distributed.deepspeed_config import DeepSpeedSettings
    from multitalent.distributed.ray_launch import WorkerGroup
    from multitalent.preprocess.plan import Plan
    from multitalent.registry.package import ModelPackage
    from multitalent.train.batches import AugmentPlan
    from multitalent.train.schedule import Schedule


@dataclass(frozen=True)
class DataSetup:
    """The converted collection as the job uses it.

    ``train_cases`` / ``val_cases``: manifest records of the job's fold (``validation.fold``; datasets
    with fewer than 5 cases train on all of them), ``val_cases`` cut to ``validation.max_cases``.
    """

    root: str  # a local path or a URL (s3://bucket/collection)
    catalog: Catalog
    plan: Plan
    train_cases: list[Any]
    val_cases: list[Any]

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        return self.plan.target_spacing_zyx_mm


def load_data_setup(job: TrainJob, *, catalog: Catalog | None = None) -> DataSetup:
    """Load the plan (``plan.json``) and ``manifest.json`` of ``job.shards.path`` (a local folder or a
    URL: nothing but these JSON files is read here) and split the cases.

    Raises:
        FileNotFoundError: the folder, its plan or its manifest is missing (convert first).
        PlanError: the plan is unreadable or invalid.
        ValueError: the shards were converted for another label space than the job's catalog.
    """
    from multitalent import storage
    from multitalent.data.sampling import split_collection
    from multitalent.preprocess.plan import PLAN_FILE, Plan, PlanError
    from multitalent.shards import load_manifest

    root = job.shards.path if storage.is_url(job.shards.path) else str(Path(job.shards.path))
    plan_path = storage.join(root, PLAN_FILE)
    if not storage.is_file(plan_path):
        raise FileNotFoundError(
            f"{plan_path}: no {PLAN_FILE}; convert the collection first (multitalent convert JOB.yaml) "
            "or point shards.path at a converted folder"
        )
    catalog = catalog or load_catalog(job.catalog)
    if storage.is_url(plan_path):
        try:
            plan = Plan.from_json(storage.read_text(plan_path))
        except PlanError as e:
            raise PlanError(f"{plan_path}: {e}") from None
    else:
        plan = Plan.load(plan_path)
    manifest = load_manifest(root)
    if manifest.catalog_hash != catalog.hash:
        raise ValueError(
            f"{storage.join(root, 'manifest.json')}: converted for catalog hash {manifest.catalog_hash}, "
            "but the job's "
            f"catalog {job.catalog!r} has hash {catalog.hash}; convert with the same catalog"
        )
    train, val = split_collection(root, list(manifest.cases), job.validation.fold)
    if not train:
        raise ValueError(f"{root}: no training cases in fold {job.validation.fold}")
    if job.validation.max_cases is not None:
        val = val[: job.validation.max_cases]
    return DataSetup(root, catalog, plan, train, val)


def build_model(job: TrainJob, catalog: Catalog, spacing_zyx_mm: tuple[float, float, float]) -> Any:
    """The job's network (plain torch; no distributed code in it); its heads as ``architecture.output``
    lays them out for ``catalog``."""
    from multitalent.models import build_network, output_heads

    a = job.architecture
    return build_network(
        a.arch,
        output_heads(a.output, catalog),
        size=a.size,
        deep_supervision=a.deep_supervision,
        patch_size_zyx=a.patch_zyx,
        spacing_zyx_mm=spacing_zyx_mm,
        gradient_checkpointing=a.checkpointing,
        output=a.output,
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
        fg_mode=job.data.fg_mode,
    )


def webdataset_source_factory(
    job: TrainJob, setup: DataSetup, *, patch_zyx: tuple[int, int, int], rank: int, world_size: int
) -> Any:
    """``make(epoch)`` -> a ``WebDatasetPatchSource`` streaming that epoch's batches of ``rank``."""
    from multitalent import storage
    from multitalent.data.sources import WebDatasetPatchSource
    from multitalent.shards import shard_urls

    urls = shard_urls(setup.root)
    if not urls:
        where = storage.join(setup.root, "wds")
        raise FileNotFoundError(f"{where}: no WebDataset shards (shards.source: webdataset)")

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
            fg_mode=job.data.fg_mode,
            num_batches=job.schedule.iterations_per_epoch,
            shuffle_buffer=job.data.webdataset.shuffle_buffer,
            patches_per_case=job.data.webdataset.patches_per_case,
        )
        source.set_epoch(epoch)
        return source

    return make


# ------------------------------------------------------------------------- job -> plain settings
# The job field behind each derived DeepSpeed key, for error messages.
_DEEPSPEED_OWNERS = {
    "train_batch_size": "batch.global_size",
    "train_micro_batch_size_per_gpu": "batch.global_size / workers.num_workers",
    "gradient_clipping": "optimiser.grad_clip",
    "zero_optimization.stage": "zero_stage",
    "bf16.enabled": "precision",
}


def deepspeed_settings(job: TrainJob) -> DeepSpeedSettings:
    from multitalent.distributed.deepspeed_config import DeepSpeedSettings

    return DeepSpeedSettings(
        global_batch=job.batch.global_size,
        micro_batch=job.micro_batch,
        grad_clip=job.optimiser.grad_clip,
        zero_stage=job.zero_stage,
        precision=job.precision,
        use_gpu=job.workers.use_gpu,
        passthrough=job.deepspeed,
        owners=_DEEPSPEED_OWNERS,
    )


def deepspeed_config(job: TrainJob) -> dict[str, Any]:
    """The job's DeepSpeed config (raises ``DeepSpeedConfigError`` naming a key derived twice)."""
    from multitalent.distributed.deepspeed_config import derive_deepspeed_config

    return derive_deepspeed_config(deepspeed_settings(job))


def phase_deepspeed_config(config: dict[str, Any], *, clip: bool) -> dict[str, Any]:
    """The DeepSpeed config of a phase: the job's, without gradient clipping when the phase has none."""
    return config if clip else {**config, "gradient_clipping": 0.0}


def build_schedule(job: TrainJob) -> Schedule:
    """Poly from the start, or with ``finetune:`` the heads / warmup / poly phases."""
    from multitalent.train.schedule import FinetuneSchedule, PolySchedule

    s = job.schedule
    if job.finetune is None:
        return PolySchedule(job.optimiser.lr, s.epochs, s.iterations_per_epoch, s.poly_exponent)
    f = job.finetune
    return FinetuneSchedule(
        heads_lr=f.heads_lr,
        heads_epochs=f.heads_epochs,
        warmup_epochs=f.warmup_epochs,
        base_lr=job.optimiser.lr,
        epochs=s.epochs,
        iterations_per_epoch=s.iterations_per_epoch,
        exponent=s.poly_exponent,
    )


def worker_group(job: TrainJob) -> WorkerGroup:
    from multitalent.distributed.ray_launch import WorkerGroup

    w = job.workers
    return WorkerGroup(
        run_name=job.run.name,
        num_workers=w.num_workers,
        use_gpu=w.use_gpu,
        resources_per_worker=w.resources_per_worker,
        placement_strategy=w.placement_strategy,
        max_failures=w.max_failures,
        keep_checkpoints=job.checkpoint.keep,
    )


def augment_plan(job: TrainJob, catalog: Catalog | None = None) -> AugmentPlan:
    """The job's augmentation; ``laterality: swap`` reads the lateral pairs of ``catalog`` (default:
    the job's catalog)."""
    from multitalent.train.batches import AugmentPlan

    a = job.data.augmentation
    if a.enabled and a.laterality == "swap" and catalog is None:
        catalog = load_catalog(job.catalog)
    return AugmentPlan.make(
        enabled=a.enabled,
        where=a.where,
        patch_zyx=job.architecture.patch_zyx,
        config=a.config(),
        laterality=a.laterality,
        catalog=catalog,
    )


# ------------------------------------------------------------------------------------ init from a package
@dataclass
class InitReport:
    """What ``init:`` did: the package (``None`` when it could not be loaded in a dry run: ``error``), how
    its weights were transferred, and the fp32 parameters right after (what frozen parameters keep)."""

    uri: str
    transfer: str
    package: ModelPackage | None
    kept_head_groups: int = 0  # head groups whose weights came from the package (transfer: all)
    initial_parameters: dict[str, Any] | None = None
    error: str | None = None

    @property
    def parent(self) -> str:
        """``name/version`` of a registered package, else its source."""
        p = self.package
        if p is None:
            return self.uri
        if p.version is not None:
            return f"{p.source.removeprefix('models:/')}"
        return p.source

    def lines(self, model: Any) -> list[str]:
        out = [
            f"init: {self.uri} -> {self.parent if self.package else 'NOT LOADED'} (transfer: {self.transfer})"
        ]
        groups = list(model.head_groups)
        slices = model.group_slices
        layout = []
        for g, (n, s) in enumerate(zip(groups, slices)):
            origin = "package" if g < self.kept_head_groups else "new"
            layout.append(f"{g}:{n}@{s.start}-{s.stop - 1}({origin})")
        out.append(f"heads: {len(groups)} groups, {sum(groups)} classes: " + " ".join(layout))
        return out


def describe_init(parts: RunParts) -> list[str]:
    """Dry-run lines of an ``init:`` run: the package, the head layout, the schedule's phases."""
    assert parts.init is not None
    lines = parts.init.lines(parts.model)
    seen: list[str] = []
    for i in range(0, parts.job.schedule.total_iterations, parts.job.schedule.iterations_per_epoch):
        phase = parts.schedule.phase_at(i)
        if phase.name not in seen:
            seen.append(phase.name)
            lines.append(
                f"phase {phase.name}: iterations {phase.start}-{phase.stop - 1}, trains {phase.trains}, "
                f"optimiser {phase.optimizer}, clip {phase.clip}, lr {parts.schedule.lr_at(phase.start):.3g} "
                f"-> {parts.schedule.lr_at(phase.stop - 1):.3g}"
            )
    return lines


def init_tracking_uri(job: TrainJob) -> str:
    from multitalent.train.launch import tracking_uri

    return job.init.tracking_uri if job.init and job.init.tracking_uri else tracking_uri(job)


def load_init_package(job: TrainJob) -> ModelPackage:
    """The package of ``job.init`` (registry downloads cached under ``<run dir>/init_package``)."""
    from multitalent.registry.store import load_package

    assert job.init is not None
    return load_package(
        job.init.model, tracking_uri=init_tracking_uri(job), cache_dir=job.run_dir / "init_package"
    )


def check_architecture(
    job: TrainJob, package: ModelPackage, spacing_zyx_mm: tuple[float, float, float]
) -> None:
    """The job's network must be the package's (up to the heads).

    Raises:
        ValueError: naming the first differing field.
    """
    b = package.architecture["build"]
    a = job.architecture
    pairs = [
        ("architecture.arch", a.arch, b["arch"]),
        ("architecture.size", a.size, b["size"]),
        ("architecture.patch_zyx", list(a.patch_zyx), list(b["patch_size_zyx"])),
        ("in_channels", 1, b["in_channels"]),
        (
            "plan.target_spacing_zyx_mm",
            [float(s) for s in spacing_zyx_mm],
            [float(s) for s in b["spacing_zyx_mm"]],
        ),
    ]
    if job.init is not None and job.init.transfer == "all":  # the heads are kept too: same output kind
        pairs.append(("architecture.output", a.output, b.get("output", "sigmoid_heads")))
    for field, ours, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"{field}: the job has {ours}, the package {package.source} has {theirs}")


def check_plan(plan: Plan, package: ModelPackage, *, where: str) -> None:
    """The shards' plan must preprocess as the package's did (the catalog part may differ).

    Raises:
        ValueError: naming the first differing field (convert with ``plan: <the package>``).
    """
    from multitalent.tracking.loggers import flatten as flatten_dict

    ours = flatten_dict({k: v for k, v in plan.to_dict().items() if k != "catalog"})
    theirs = flatten_dict({k: v for k, v in package.plan.to_dict().items() if k != "catalog"})
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise ValueError(
                f"plan field {key}: {where} has {ours.get(key)!r}, the package {package.source} has "
                f"{theirs.get(key)!r}; convert the target data with the package's plan "
                "(convert job: plan: URI)"
            )


def check_catalog_extends(base: Catalog, extended: Catalog) -> None:
    """``extended`` must start with ``base``'s datasets, unchanged.

    Raises:
        ValueError: listing the first difference.
    """
    theirs, ours = base.label_space(), extended.label_space()
    for i, d in enumerate(theirs):
        if i >= len(ours):
            raise ValueError(
                f"catalog: the package's dataset {i} ({d['dataset']}) is missing; a catalog that adds "
                f"datasets must start with the package's {len(theirs)} datasets"
            )
        if ours[i] != d:
            for key in ("dataset", "labels", "classes"):
                if ours[i][key] != d[key]:
                    raise ValueError(
                        f"catalog: dataset {i} differs from the package's in {key}: job {ours[i][key]!r}, "
                        f"package {d[key]!r}; append new datasets after the package's, unchanged"
                    )
    if len(ours) == len(theirs):
        raise ValueError("catalog: transfer: all adds datasets, but the job's catalog equals the package's")


def initialise_from_package(model: Any, package: ModelPackage, *, transfer: str, catalog: Catalog) -> int:
    """Load the package into ``model`` (built for ``catalog``); returns how many head groups it filled.

    ``backbone``: the backbone (strict); every head stays freshly initialised. ``all``: the backbone and the
    package's head groups (the first ones; strict for those), the appended groups stay fresh.
    """
    full = package.state_dict()
    if transfer == "backbone":
        model.load_backbone_state_dict(
            {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")},
            strict=True,
        )
        return 0
    check_catalog_extends(package.catalog, catalog)
    kept = len(package.catalog.datasets)
    missing, unexpected = model.load_state_dict(full, strict=False)
    new_groups = {f".groups.{g}." for g in range(kept, len(catalog.datasets))}
    stray = [k for k in missing if not any(s in k for s in new_groups)]
    if unexpected or stray:
        raise ValueError(
            f"{package.source}: weights do not fit: missing {stray[:5]}, unexpected {unexpected[:5]}"
        )
    return kept


# ------------------------------------------------------------------------------------ assembly
@dataclass
class RunParts:
    """Everything one rank of a run needs, built by :func:`assemble`.

    ``setup`` is ``None`` only when assembled with ``require_data=False`` and the collection is missing
    (the dry run then describes the rest); ``spacing_zyx_mm`` is then the plan's default.
    """

    job: TrainJob
    catalog: Catalog
    setup: DataSetup | None
    spacing_zyx_mm: tuple[float, float, float]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: torch.nn.Module  # MultiTalentObjective, or the objective of architecture.output
    schedule: Schedule
    augment: AugmentPlan
    deepspeed_config: dict[str, Any]
    precision: str  # resolved: "fp32" or "bf16"
    rank: int
    world_size: int
    data_error: str | None = None  # why ``setup`` is None
    init: InitReport | None = None  # what came from a model package (``init:``)
    _zarr: Any = None  # the rank's Zarr source (shards.source: zarr)

    @property
    def output_levels(self) -> int:
        return output_levels(self.model)

    def batches(
        self, start: int, stop: int, *, loader_workers: int | None = None
    ) -> Iterator[tuple[int, Any]]:
        """``(iteration, batch)`` for iterations ``[start, stop)`` of this rank, from the job's source: a
        ``Batch``, or a ``DrawnBatch`` when augmentation runs in the step (``StepBatches.batch_at``)."""
        from multitalent.train.batches import webdataset_batches, zarr_batches

        if self.setup is None:
            raise FileNotFoundError(f"{self.job.shards.path}: no converted collection to read batches from")
        workers = self.job.data.loader_workers if loader_workers is None else loader_workers
        if self.job.shards.source == "zarr":
            return zarr_batches(
                self._zarr, start=start, stop=stop, augment=self.augment, loader_workers=workers
            )
        make = webdataset_source_factory(
            self.job, self.setup, patch_zyx=self.augment.read_zyx, rank=self.rank, world_size=self.world_size
        )
        return webdataset_batches(
            make,
            start=start,
            stop=stop,
            iterations_per_epoch=self.job.schedule.iterations_per_epoch,
            augment=self.augment,
            loader_workers=workers,
        )


def assemble(
    job: TrainJob,
    *,
    rank: int = 0,
    world_size: int | None = None,
    catalog: Catalog | None = None,
    require_data: bool = True,
) -> RunParts:
    """Build the parts of ``job`` for ``rank`` of ``world_size`` (default: ``workers.num_workers``).

    The network's initial weights come from ``run.seed`` (identical on every rank and launch).

    Raises:
        FileNotFoundError: the collection is missing (only with ``require_data``).
        DeepSpeedConfigError, ValueError: an inconsistent job.
    """
    import torch

    from multitalent.distributed.deepspeed_config import resolve_precision
    from multitalent.preprocess.plan import DEFAULT_SPACING_ZYX_MM, PLAN_FILE
    from multitalent.registry.package import PackageError
    from multitalent.registry.store import RegistryError
    from multitalent.train.schedule import build_phase_optimizer
    from multitalent.train.step import build_objective

    world_size = job.workers.num_workers if world_size is None else world_size
    ds_config = deepspeed_config(job)
    catalog = catalog or load_catalog(job.catalog)
    setup: DataSetup | None = None
    data_error: str | None = None
    try:
        setup = load_data_setup(job, catalog=catalog)
    except FileNotFoundError as e:
        if require_data:
            raise
        data_error = str(e)
    init: InitReport | None = None
    package = None
    if job.init is not None:
        try:
            package = load_init_package(job)
        except (PackageError, RegistryError, OSError) as e:
            if require_data:
                raise
            init = InitReport(job.init.model, job.init.transfer, None, error=str(e))
    spacing = setup.spacing_zyx_mm if setup is not None else DEFAULT_SPACING_ZYX_MM
    if package is not None:
        if setup is not None:
            check_plan(setup.plan, package, where=f"{setup.root.rstrip('/')}/{PLAN_FILE}")
        else:
            spacing = package.plan.target_spacing_zyx_mm
        check_architecture(job, package, spacing)
    torch.manual_seed(job.run.seed)
    model = build_model(job, catalog, spacing)
    if package is not None:
        assert job.init is not None
        kept = initialise_from_package(model, package, transfer=job.init.transfer, catalog=catalog)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()} if job.finetune else None
        init = InitReport(job.init.model, job.init.transfer, package, kept, initial)
    schedule = build_schedule(job)
    augment = augment_plan(job, catalog)
    phase = schedule.phase_at(0)
    parts = RunParts(
        job=job,
        catalog=catalog,
        setup=setup,
        spacing_zyx_mm=spacing,
        model=model,
        optimizer=build_phase_optimizer(model, phase, job.optimiser, lr=schedule.lr_at(0)),
        objective=build_objective(
            job.architecture.output,
            catalog,
            n_levels=output_levels(model),
            dice=job.loss.dice,
            reduction=job.loss.reduction,
        ),
        schedule=schedule,
        augment=augment,
        deepspeed_config=phase_deepspeed_config(ds_config, clip=phase.clip),
        precision=resolve_precision(job.precision, use_gpu=job.workers.use_gpu),
        rank=rank,
        world_size=world_size,
        data_error=data_error,
        init=init,
    )
    if setup is not None and job.shards.source == "zarr":
        parts._zarr = zarr_source(
            job,
            setup,
            cases=setup.train_cases,
            patch_zyx=augment.read_zyx,
            batch_size=job.micro_batch,
            rank=rank,
            world_size=world_size,
        )
    return parts
