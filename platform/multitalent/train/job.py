"""The training job file (``jobs/pretrain.yaml`` and its variants).

Strict like every job file (:mod:`multitalent.jobs`): an unknown key or a wrong type is an error naming
its dotted path. Defaults are the paper's multi-dataset pre-training; ``jobs/pretrain_cpu_tiny.yaml``
shows the smallest useful variant. Values that the DeepSpeed configuration derives from this file
(micro-batch, gradient clipping, precision, ZeRO stage) live here only; setting them again in the
``deepspeed:`` pass-through section is an error (:mod:`multitalent.distributed.deepspeed_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from multitalent.jobs import StrictModel, load_job


class ShardsSection(StrictModel):
    """The converted collection (output folder of ``multitalent convert``)."""

    path: str = "data_shards/multitalent13"
    source: Literal["zarr", "webdataset"] = (
        "zarr"  # zarr: random access (exact resume); webdataset: streaming
    )


class ArchitectureSection(StrictModel):
    arch: str = "resenc_unet"  # multitalent.models.available_architectures()
    # paper: the reference's topology; tiny: tests and CPU demos; planned (resenc_unet only): the
    # topology planned from the patch, this platform's earlier ResEnc
    size: Literal["paper", "tiny", "planned"] = "paper"
    patch_zyx: list[int] = Field(default_factory=lambda: [96, 192, 192])
    deep_supervision: bool = True
    # SwinUNETR only (MONAI use_checkpoint): ~17.5 GiB instead of ~30 GB at the paper's batch on a GPU.
    # Default: on for swin_unetr (the paper's setting), off otherwise.
    gradient_checkpointing: bool | None = None
    # What the output channels are (multitalent.models.outputs): sigmoid_heads = one sigmoid head per
    # (dataset, class) with the partial-label loss (MultiTalent); merged_softmax = one softmax over the
    # labels merged by name, unannotated structures as background, CE + Dice (the naive baseline).
    output: Literal["sigmoid_heads", "merged_softmax"] = "sigmoid_heads"

    @property
    def checkpointing(self) -> bool:
        if self.gradient_checkpointing is None:
            return self.arch == "swin_unetr"
        return self.gradient_checkpointing

    @model_validator(mode="after")
    def _three_positive(self) -> ArchitectureSection:
        if len(self.patch_zyx) != 3 or min(self.patch_zyx) < 1:
            raise ValueError(f"patch_zyx must be three positive sizes (z, y, x), got {self.patch_zyx}")
        return self


class OptimiserSection(StrictModel):
    """SGD with Nesterov momentum 0.99 (paper, CNNs) or AdamW (SwinUNETR).

    ``name``, ``lr`` and ``eps`` left unset (or ``auto``) follow the architecture (the reference
    trainers): SGD at 1e-2 for the CNNs; AdamW at 5e-4 with eps 1e-4 for ``swin_unetr``.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=1e-2, gt=0)
    momentum: float = Field(default=0.99, ge=0, lt=1)  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = Field(default=3e-5, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = Field(default=1e-8, gt=0)  # adamw (SwinUNETR: 1e-4)
    amsgrad: bool = False  # adamw
    grad_clip: float = Field(default=12.0, gt=0)  # global gradient norm (nnU-Net: 12)

    @model_validator(mode="after")
    def _betas(self) -> OptimiserSection:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        return self


class ScheduleSection(StrictModel):
    """Poly decay ``lr * (1 - epoch / epochs) ** exponent``, stepped at epoch starts (nnU-Net)."""

    epochs: int = Field(default=2000, ge=1)
    iterations_per_epoch: int = Field(default=250, ge=1)
    poly_exponent: float = Field(default=0.9, ge=0)
    # End this launch after this many iterations (counted from 0, not from the resume point) with a
    # checkpoint; the schedule still spans epochs x iterations, so a later launch continues it.
    stop_after_iterations: int | None = Field(default=None, ge=1)

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


class InitSection(StrictModel):
    """Start from a published model package instead of random weights.

    ``transfer: backbone``: the package's backbone; every head of the job's catalog is new (fine-tuning
    on target datasets). ``transfer: all``: the job's catalog must start with the package's catalog
    unchanged; those heads keep their weights, the appended datasets get new head groups (adding datasets).
    """

    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, or a package folder
    transfer: Literal["backbone", "all"] = "backbone"
    tracking_uri: str | None = None  # registry of a models:/ URI; None: the job's own tracking store


class FinetuneSection(StrictModel):
    """The fine-tuning schedule of the paper's reference code (nnU-Net v1 ``warmupsegheads`` trainers).

    Phase ``heads``: epochs ``[0, heads_epochs)``, heads only (backbone frozen), AdamW with amsgrad, lr
    rising linearly to ``heads_lr`` (epoch e: ``heads_lr * (e + 1) / heads_epochs``), no gradient clipping.
    Phase ``warmup``: the next ``warmup_epochs``, the whole network with a new optimiser of the job's
    ``optimiser`` section, lr rising linearly to ``optimiser.lr``, clipping ``optimiser.grad_clip``.
    Phase ``poly``: the remaining epochs, same optimiser, poly decay over them.
    """

    heads_epochs: int = Field(default=10, ge=1)
    heads_lr: float = Field(default=5e-4, gt=0)  # SwinUNETR: 1e-4
    warmup_epochs: int = Field(default=50, ge=1)


class BatchSection(StrictModel):
    global_size: int = Field(default=4, ge=1)  # over all workers; micro-batch = global / workers


class WorkersSection(StrictModel):
    """Ray Train workers: one per GPU (or per CPU slot)."""

    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = True
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 8, GPU: 1}
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(default=3, ge=-1)  # worker-group restarts; -1 = unlimited


class CheckpointSection(StrictModel):
    """Checkpoints every ``every_iterations``, after every validation pass, at the end of each launch, and,
    with ``at_epoch_ends`` (default), at every epoch end; ``false`` spaces them out further on slow or
    remote storage (a resume is exact from any iteration)."""

    every_iterations: int = Field(default=250, ge=1)
    at_epoch_ends: bool = True
    keep: int = Field(default=3, ge=2)  # >= 2: a corrupt latest checkpoint needs a predecessor


class TrackingSection(StrictModel):
    uri: str | None = None  # None: sqlite under the run directory; else e.g. http://mlflow:5000
    experiment: str = "multitalent"
    enabled: bool = True
    log_every: int = Field(default=1, ge=1)  # iterations between loss/lr/throughput points


class RunSection(StrictModel):
    # Ray Train storage; must be shared by all nodes: a local path, NFS, or object storage (s3://bucket/prefix)
    storage_path: str = "runs"
    name: str = "pretrain"  # the run directory is storage_path/name; re-launching it resumes
    # Only when storage_path is a URL: the local folder for what cannot live in object storage (the run's
    # progress.jsonl and mlflow_run_id under local_path/name; the default sqlite MLflow store
    # local_path/mlflow.db)
    local_path: str = "runs"
    seed: int = Field(default=0, ge=0)


def _augment_defaults() -> dict[str, Any]:
    from dataclasses import asdict

    from multitalent.data.augment import AugmentConfig

    known = asdict(AugmentConfig())
    known.pop("mirror_swap")  # built from the catalog (laterality: swap), not set by hand
    return known


class AugmentationSection(StrictModel):
    """Batched augmentation (nnU-Net's moreDA). ``settings`` overrides named fields of
    :class:`multitalent.data.augment.AugmentConfig` (probabilities ``p_*`` and ``(low, high)`` ranges),
    e.g. ``settings: {p_mirror_zyx: [0.5, 0.5, 0.0], p_rotation: 0.3}``; unset fields keep its defaults.

    ``laterality`` says what mirroring along x (left-right) does to lateral pairs (left/right classes
    the catalog declares, :mod:`multitalent.data.laterality`): ``swap`` swaps their targets in mirrored
    samples so "left kidney" stays the anatomically left one (datasets with sided, unpaired classes are
    not mirrored along x); ``off`` never mirrors along x (TotalSegmentator); ``naive`` mirrors and keeps
    the labels (nnU-Net, the MultiTalent reference)."""

    enabled: bool = True
    where: Literal["device", "loader"] = "device"  # device: in the step on the GPU; loader: CPU
    laterality: Literal["swap", "off", "naive"] = "swap"
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("laterality", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `off` as false: `laterality: off` must still mean "off".
        return "off" if value is False else value

    @model_validator(mode="after")
    def _known_settings(self) -> AugmentationSection:
        known = _augment_defaults()
        for key in self.settings:
            if key not in known:
                from difflib import get_close_matches

                close = get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
                raise ValueError(f"settings.{key}: not an augmentation setting{hint}")
        config = self.config()  # range/probability checks of AugmentConfig
        if self.laterality == "off" and "p_mirror_zyx" in self.settings and config.p_mirror_zyx[2] > 0:
            raise ValueError(
                "laterality: off never mirrors along x, but settings.p_mirror_zyx = "
                f"{list(config.p_mirror_zyx)} asks for it; set its x entry to 0 or choose swap or naive"
            )
        return self

    def config(self) -> Any:
        """The :class:`~multitalent.data.augment.AugmentConfig` these settings describe."""
        from multitalent.data.augment import AugmentConfig

        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in self.settings.items()}
        return AugmentConfig(**values)


class WebDatasetSection(StrictModel):
    """Streaming from the WebDataset shards (``shards.source: webdataset``)."""

    shuffle_buffer: int = Field(default=8, ge=1)  # decoded cases held per loader worker (~1 volume each)
    patches_per_case: float = Field(default=2.0, gt=0)  # mean patches taken per loaded case


class LossSection(StrictModel):
    """The partial-label loss (paper Eq. 2); docs/fidelity.md compares the readings.

    ``dice``: ``batch`` (one Dice per class over the global batch, the paper) or ``sample`` (per
    sample, then reduced); ``reduction``: ``mean`` (per-sample BCE / sample Dice averaged over the
    annotated samples of each class) or ``sum`` (summed, the literal Eq. 2 and the reference code).
    """

    dice: Literal["batch", "sample"] = "batch"
    reduction: Literal["mean", "sum"] = "mean"


class DataSection(StrictModel):
    exponent: float = Field(default=0.5, ge=0)  # case weight n_dataset ** -exponent
    fg_fraction: float = Field(default=1 / 3, ge=0, le=1)
    # coin: each patch foreground-centred with probability fg_fraction; fixed: nnU-Net v1's fixed count
    # per global batch (the last round(B * fg_fraction) slots), so every batch has foreground
    fg_mode: Literal["coin", "fixed"] = "coin"
    augmentation: AugmentationSection = AugmentationSection()
    webdataset: WebDatasetSection = WebDatasetSection()
    loader_workers: int = Field(default=4, ge=0)  # DataLoader processes per rank; 0 = in the rank


class ValidationSection(StrictModel):
    fold: int | None = Field(default=0, ge=0, lt=5)  # None: train on every case, no validation
    every_epochs: int = Field(default=50, ge=1)
    max_cases: int | None = Field(default=None, ge=1)  # first cases of the fold's validation split
    patches_per_case: int = Field(default=1, ge=1)  # foreground-centred patches, fixed per case
    overlays: bool = True  # one PNG per dataset


class NonFiniteSection(StrictModel):
    max_consecutive: int = Field(default=10, ge=1)  # more non-finite losses in a row stop the job


class DebugSection(StrictModel):
    """Test hooks, installed as a :class:`multitalent.train.callbacks.FaultInjection` callback (never
    lines in the step); leave empty in real jobs."""

    poison_loss_at: list[int] = Field(default_factory=list)  # iterations whose input (so loss) is NaN
    sleep_per_iteration_s: float = Field(default=0.0, ge=0)  # slows a run down for fault tests


class TrainJob(StrictModel):
    """A training job: see ``jobs/pretrain.yaml`` for every field with its meaning."""

    kind: Literal["train"] = "train"
    catalog: str = "multitalent13"
    shards: ShardsSection = ShardsSection()
    architecture: ArchitectureSection = ArchitectureSection()
    optimiser: OptimiserSection = OptimiserSection()
    loss: LossSection = LossSection()
    schedule: ScheduleSection = ScheduleSection()
    batch: BatchSection = BatchSection()
    zero_stage: Literal[1, 2, 3] = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    workers: WorkersSection = WorkersSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    validation: ValidationSection = ValidationSection()
    nonfinite: NonFiniteSection = NonFiniteSection()
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # pass-through; derived keys are errors
    debug: DebugSection = DebugSection()
    init: InitSection | None = None  # None: random initialisation (pre-training)
    finetune: FinetuneSection | None = None  # None: one optimiser, poly schedule from the start

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, data: Any) -> Any:
        """Optimiser settings left unset (absent, ``auto`` or null) follow the architecture, as in the
        reference trainers: SGD at 1e-2 for the CNNs; AdamW at 5e-4 with eps 1e-4 for SwinUNETR."""
        if not isinstance(data, dict):
            return data
        architecture = data.get("architecture")
        arch = architecture.get("arch") if isinstance(architecture, dict) else None
        opt = data.get("optimiser")
        if opt is not None and not isinstance(opt, dict):
            return data
        opt = dict(opt or {})
        swin = arch == "swin_unetr"
        if opt.get("name") in (None, "auto"):
            opt["name"] = "adamw" if swin else "sgd"
        if opt.get("lr") in (None, "auto"):
            opt["lr"] = 5e-4 if opt["name"] == "adamw" else 1e-2
        if opt.get("eps") in (None, "auto"):
            opt["eps"] = 1e-4 if swin else 1e-8
        return {**data, "optimiser": opt}

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainJob:
        n, b = self.workers.num_workers, self.batch.global_size
        if b % n:
            raise ValueError(
                f"batch.global_size {b} is not divisible by workers.num_workers {n} "
                "(the micro-batch per worker is global_size / num_workers)"
            )
        if (
            self.init is not None
            and self.init.transfer == "all"
            and self.architecture.output != "sigmoid_heads"
        ):
            raise ValueError(
                f"init.transfer: all appends head groups per dataset, which architecture.output "
                f"{self.architecture.output!r} does not have; use transfer: backbone"
            )
        if self.finetune is not None:
            f = self.finetune
            if self.init is None:
                raise ValueError("finetune: needs an init: section (a model to fine-tune)")
            if f.heads_epochs + f.warmup_epochs >= self.schedule.epochs:
                raise ValueError(
                    f"finetune: heads_epochs + warmup_epochs ({f.heads_epochs + f.warmup_epochs}) must be "
                    f"fewer than schedule.epochs ({self.schedule.epochs}) to leave a poly phase"
                )
        return self

    @property
    def micro_batch(self) -> int:
        return self.batch.global_size // self.workers.num_workers

    @property
    def remote_storage(self) -> bool:
        """Whether ``run.storage_path`` is object storage (a URL such as ``s3://bucket/runs``)."""
        return "://" in self.run.storage_path

    @property
    def local_root(self) -> Path:
        """The local folder of the run files: ``storage_path``, or ``local_path`` when that is a URL."""
        root = self.run.local_path if self.remote_storage else self.run.storage_path
        return Path(root).expanduser().resolve()

    @property
    def run_dir(self) -> Path:
        """The run's local folder, ``storage_path/name``: Ray's checkpoints, the run's files. With
        object storage, ``local_path/name`` (progress, MLflow run id); checkpoints are at
        :attr:`run_location`."""
        return self.local_root / self.run.name

    @property
    def run_location(self) -> str:
        """Where the run's checkpoints are: ``storage_path/name`` as a local path or a URL."""
        if self.remote_storage:
            return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"
        return str(self.run_dir)


def load_train_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainJob:
    """Read, merge (``extends:``), override (``a.b=value``) and validate a training job file."""
    return load_job(path, TrainJob, overrides)
