"""The worker side: one DeepSpeed engine per Ray Train worker, the training loop, checkpoint I/O.

:func:`train_loop_per_worker` is what Ray Train runs on every worker. :class:`Trainer` builds the
parts (network, optimizer, engine, objective, batches), restores the newest verified checkpoint,
and runs :meth:`Trainer.fit`, a short loop whose logging, validation and checkpoint cadence are
callbacks (:mod:`multitalent.train.callbacks`).

Phases: the schedule (:mod:`multitalent.train.schedule`) is split into phases, each with its own
optimiser (fine-tuning: heads only with AdamW, then the whole network with SGD). DeepSpeed wraps one
optimiser per engine, and wrapping the same module a second time would leave the first engine's hooks
on it (ZeRO-2 gradient hooks, ZeRO-3 partitioning), so a phase change builds a *new* module from the
current fp32 master weights (``safe_get_full_fp32_param``; frozen parameters keep their assembled
values), a new optimiser and a new engine (:meth:`Trainer._switch_phase`). A checkpoint records the
phase that wrote it; resuming rebuilds that phase's engine before loading, so a resumed run continues
exactly.

Non-finite losses: every iteration all-reduces ``[loss, non-finite flag]`` (one tiny collective,
also giving the global mean loss to log), so all ranks agree; a non-finite iteration on any rank is
skipped by all (no backward, no optimizer step), counted, and the data moves on. More than
``nonfinite.max_consecutive`` in a row ends the run on all ranks with a reported ``stop_reason``
(the workers return normally, so Ray does not restart them for a deterministic failure).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from multitalent.provenance import git_commit
from multitalent.train.batches import step_generator
from multitalent.train.cadence import Cadence
from multitalent.train.checkpoint import (
    DEEPSPEED_TAG,
    MODEL_INFO_FILE,
    PLAN_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainerState,
    checkpoint_dir_name,
    checkpoint_locations,
    choose_remote_resume,
    choose_resume,
    fetch_checkpoint,
    load_history,
    order_candidates,
    run_checkpoints,
    save_history,
    write_rank_manifest,
)
from multitalent.train.job import TrainJob
from multitalent.train.step import StepInputs

if TYPE_CHECKING:
    from multitalent.train.schedule import Phase

STOP_NONFINITE = "nonfinite"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses (raised by the driver from the workers' report)."""


@dataclass
class StepResult:
    """One iteration as the callbacks see it; ``loss`` is the mean over ranks (NaN when skipped)."""

    iteration: int
    loss: float
    lr: float
    skipped: bool
    seconds: float


class Callback(Protocol):
    """What :meth:`Trainer.fit` calls around each step (:mod:`multitalent.train.callbacks`)."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_step_start(self, trainer: Trainer, iteration: int, batch: Any) -> None: ...
    def on_step_end(self, trainer: Trainer, result: StepResult) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...


@dataclass(frozen=True)
class ValidationResult:
    """One validation pass: ``iteration`` = iterations done when it ran; ``metrics`` and ``overlays``
    (dataset id -> picture) are filled on rank 0 only."""

    iteration: int
    epoch: int
    metrics: dict[str, float]
    overlays: dict[str, Any]


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device
    use_gpu: bool


def _rank_rng_file(rank: int) -> str:
    return f"rank-{rank}.rng.pt"


class Trainer:
    """The state of one worker's training (see the module docstring).

    Callbacks read what they need from here: ``job``, ``parts`` (:class:`RunParts`), ``state``
    (checkpointed counters and curves), ``cadence`` (when epochs end, validation and checkpoints are
    due) and ``validation`` (the latest validation pass, or ``None``).
    """

    def __init__(self, job: TrainJob, *, worker: WorkerInfo, run_dir: Path) -> None:
        from multitalent.distributed.engine import build_engine
        from multitalent.train.components import assemble

        self.job, self.worker, self.run_dir = job, worker, run_dir
        self.rank, self.world_size, self.device = worker.rank, worker.world_size, worker.device
        job = self.job = self._pin_init(job)
        self.parts = assemble(job, rank=self.rank, world_size=self.world_size)
        assert self.parts.setup is not None
        self.setup = self.parts.setup
        self.catalog = self.parts.catalog
        self.model_description = self.parts.model.describe()  # type: ignore[operator]
        self.ds_config = self.parts.deepspeed_config
        self.engine = build_engine(
            self.parts.model, self.parts.optimizer, config=self.ds_config, use_gpu=worker.use_gpu
        )
        self.dtype = torch.bfloat16 if self.parts.precision == "bf16" else torch.float32
        self.objective = self.parts.objective.to(self.device)
        self.lut = torch.as_tensor(self.catalog.region_lut(), device=self.device)
        self.reduce = None
        if self.world_size > 1:
            from multitalent.losses import all_reduce_sum

            self.reduce = all_reduce_sum()
        self.schedule = self.parts.schedule
        self.phase: Phase = self.schedule.phase_at(0)
        self.augment = self.parts.augment
        self.cadence = Cadence.of(job)
        self.state = TrainerState(
            world_size=self.world_size,
            seed=job.run.seed,
            schedule=self.schedule.state_dict(),
            phase=self.phase.name,
        )
        self.attempt = self._broadcast(secrets.token_hex(3))
        self.state.attempt = self.attempt
        self.loss_iterations: list[int] = []
        self.losses: list[float] = []
        self.stop_reason: str | None = None
        self.resumed_from: Path | None = None
        self.rejected_checkpoints: list[str] = []
        self.last_checkpoint_iteration = -1
        self.validation: ValidationResult | None = None
        init = self.parts.init
        # Tags of the MLflow run: the model this run started from (resolved version) and how.
        self.lineage_tags: dict[str, str] = (
            {"multitalent.parent_model": init.parent, "multitalent.init.transfer": init.transfer}
            if init is not None and init.package is not None
            else {}
        )

    def _pin_init(self, job: TrainJob) -> TrainJob:
        """Resolve an ``init.model`` alias once (rank 0) and give every rank the same version."""
        if job.init is None or "@" not in job.init.model:
            return job
        pinned = None
        if self.rank == 0:
            from multitalent.registry.store import ModelRef, resolve
            from multitalent.train.components import init_tracking_uri

            r = resolve(ModelRef.parse(job.init.model), tracking_uri=init_tracking_uri(job))
            pinned = f"models:/{r.name}/{r.version}"
            print(f"[multitalent] init: {job.init.model} is {pinned}", flush=True)
        pinned = self._broadcast(pinned)
        return job.model_copy(update={"init": job.init.model_copy(update={"model": pinned})})

    # ------------------------------------------------------------------ phases
    def _fp32_parameters(self) -> dict[str, torch.Tensor]:
        """The fp32 master value of every parameter (collective under ZeRO-3: call on all ranks).

        Parameters outside the optimiser (frozen) have never changed: their assembled values.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        initial = (self.parts.init.initial_parameters if self.parts.init else None) or {}
        out: dict[str, torch.Tensor] = {}
        for name, param in self.engine.module.named_parameters():
            value = safe_get_full_fp32_param(param) if param.requires_grad else None
            if value is None:
                if name not in initial:
                    raise RuntimeError(f"no fp32 value for the frozen parameter {name}")
                value = initial[name]
            out[name] = value.detach().to("cpu", torch.float32).clone()
        return out

    def _switch_phase(self, phase: Phase) -> None:
        """A new module (from the fp32 master weights), optimiser and DeepSpeed engine for ``phase``."""
        from multitalent.distributed.engine import build_engine
        from multitalent.registry.package import load_weights_into
        from multitalent.train.components import build_model, deepspeed_config, phase_deepspeed_config
        from multitalent.train.schedule import build_phase_optimizer

        weights = self._fp32_parameters()
        with torch.random.fork_rng(devices=[]):  # building a module draws initial weights: keep the RNG
            model = build_model(self.job, self.catalog, self.parts.spacing_zyx_mm)
        load_weights_into(model, weights, where=f"phase {phase.name}")
        optimizer = build_phase_optimizer(
            model, phase, self.job.optimiser, lr=self.schedule.lr_at(phase.start)
        )
        self.engine = None
        self.engine = build_engine(
            model,
            optimizer,
            config=phase_deepspeed_config(deepspeed_config(self.job), clip=phase.clip),
            use_gpu=self.worker.use_gpu,
        )
        self.phase = phase
        self.state.phase = phase.name
        if self.rank == 0:
            print(f"[multitalent] phase {phase.name}: iterations {phase.start}-{phase.stop - 1}", flush=True)

    def _phase_named(self, name: str) -> Phase:
        for i in range(0, self.job.schedule.total_iterations, self.job.schedule.iterations_per_epoch):
            phase = self.schedule.phase_at(i)
            if phase.name == name:
                return phase
        raise RuntimeError(f"the schedule has no phase {name!r}")

    # ------------------------------------------------------------------ collectives
    def _broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ resume
    def restore(self, ray_latest: Path | None) -> None:
        """Resume from the newest checkpoint that verifies (rank 0 decides, every rank loads).

        With object storage rank 0 downloads and verifies candidates newest first, and every other
        rank downloads the chosen folder; the local copies are deleted once loaded.
        """
        if not self.job.remote_storage:
            choice = None
            if self.rank == 0:
                choice = choose_resume(order_candidates(ray_latest, run_checkpoints(self.run_dir)))
            folder, rejected = self._broadcast((choice.folder, choice.rejected) if choice else None)
            self._note_rejected(rejected)
            if folder is not None:
                self._load(folder, where=str(folder))
            return
        scratch = Path(tempfile.mkdtemp(prefix=f"multitalent-resume-r{self.rank}-"))
        try:
            remote = None
            if self.rank == 0:
                remote = choose_remote_resume(checkpoint_locations(self.job.run_location), scratch)
            source, rejected = self._broadcast((remote.source, remote.rejected) if remote else None)
            self._note_rejected(rejected)
            if source is None:
                return
            folder = remote.folder if remote is not None and remote.folder is not None else None
            if folder is None:
                folder = fetch_checkpoint(source, scratch)
            self._load(folder, where=source)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _note_rejected(self, rejected: list[str]) -> None:
        self.rejected_checkpoints = list(rejected)
        for reason in rejected:
            print(f"[multitalent] rank {self.rank}: not resuming from a bad checkpoint: {reason}", flush=True)

    def _load(self, folder: Path, *, where: str) -> None:
        """Load a verified checkpoint folder (local; ``where`` names it in errors: its path or the URL
        it was downloaded from) into this rank's engine and state."""
        state = TrainerState.from_json((folder / STATE_FILE).read_text(), where=where)
        if state.world_size != self.world_size:
            raise RuntimeError(
                f"{where}: written by {state.world_size} workers, this run has {self.world_size}; "
                "resume with the same workers.num_workers"
            )
        self.schedule.check_state(state.schedule, where=where)
        if state.phase and state.phase != self.phase.name:
            self._switch_phase(self._phase_named(state.phase))  # the engine that wrote the checkpoint
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"{where}: DeepSpeed found no checkpoint under tag {DEEPSPEED_TAG!r}")
        rng = folder / _rank_rng_file(self.rank)
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=True))
        self.state = state
        self.state.attempt = self.attempt
        self.state.stop_reason = None
        iterations, losses = load_history(folder)
        self.loss_iterations, self.losses = iterations.tolist(), losses.tolist()
        self.resumed_from = folder
        self.last_checkpoint_iteration = state.iteration

    # ------------------------------------------------------------------ the loop
    @property
    def stop_iteration(self) -> int:
        s = self.job.schedule
        return min(s.total_iterations, s.stop_after_iterations or s.total_iterations)

    def fit(self, callbacks: Sequence[Callback]) -> None:
        for cb in callbacks:
            cb.on_start(self)
        for i, batch in self.parts.batches(self.state.iteration, self.stop_iteration):
            if self.schedule.phase_at(i).name != self.phase.name:
                self._switch_phase(self.schedule.phase_at(i))
            for cb in callbacks:
                cb.on_step_start(self, i, batch)
            result = self.step(i, batch)
            self.state.iteration = i + 1
            for cb in callbacks:
                cb.on_step_end(self, result)
            if self.stop_reason:
                break
        for cb in callbacks:
            cb.on_end(self)

    def step(self, iteration: int, batch: Any) -> StepResult:
        """Forward, loss, and (unless the loss is non-finite on some rank) backward and optimizer step."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        lr = self.schedule.apply(self.engine.optimizer, iteration)
        batch = batch.to(self.device)
        if not self.augment.in_loader:  # here, on the device: a DrawnBatch (Zarr) or an enlarged read
            batch = self.augment.apply(batch, step_generator(self.job.run.seed, self.rank, iteration))
        inputs = StepInputs(batch.image_bczyx, batch.label_bzyx, batch.dataset_idx_b, batch.annotated_bk)
        inputs.image_bczyx = inputs.image_bczyx.to(self.dtype)
        loss, _ = self.objective(self.engine, inputs, reduce=self.reduce)
        local = loss.detach().float()
        both = torch.stack(
            [torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0), (~torch.isfinite(local)).float()]
        )
        if self.world_size > 1:
            dist.all_reduce(both)
        skipped = bool(both[1].item() > 0)
        if skipped:
            self.state.skipped_nonfinite += 1
            self.state.consecutive_nonfinite += 1
            if self.state.consecutive_nonfinite > self.job.nonfinite.max_consecutive:
                self.stop_reason = (
                    f"{STOP_NONFINITE}: the loss was non-finite for {self.state.consecutive_nonfinite} "
                    f"consecutive iterations (up to iteration {iteration}; limit "
                    f"nonfinite.max_consecutive = {self.job.nonfinite.max_consecutive}); check the learning "
                    "rate, the data and the precision"
                )
        else:
            self.engine.backward(loss)
            self.engine.step()
            self.state.optimizer_steps += 1
            self.state.consecutive_nonfinite = 0
        mean_loss = float("nan") if skipped else float(both[0].item()) / self.world_size
        self.loss_iterations.append(iteration)
        self.losses.append(mean_loss)
        return StepResult(iteration, mean_loss, lr, skipped, time.perf_counter() - t0)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank saves its part into a temporary folder and reports it to Ray (collective)."""
        import ray.train

        from multitalent.distributed.engine import full_state_dict

        name = checkpoint_dir_name(self.state.iteration, self.attempt)
        with tempfile.TemporaryDirectory(prefix="multitalent-ckpt-") as tmp:
            folder = Path(tmp)
            self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            weights = full_state_dict(self.engine, zero_stage=self.job.zero_stage)
            torch.save(torch.get_rng_state(), folder / _rank_rng_file(self.rank))
            if self.rank == 0:
                torch.save(weights, folder / WEIGHTS_FILE)
                self.setup.plan.save(folder / PLAN_FILE)
                (folder / MODEL_INFO_FILE).write_text(json.dumps(self.model_info(), indent=1, default=str))
                save_history(folder, np.asarray(self.loss_iterations), np.asarray(self.losses))
                (folder / STATE_FILE).write_text(self.state.to_json())
            write_rank_manifest(folder, self.rank)
            ray.train.report(
                {**metrics, "iteration": self.state.iteration, "checkpoint": name},
                checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                checkpoint_dir_name=name,
            )
        self.last_checkpoint_iteration = self.state.iteration

    def model_info(self) -> dict[str, Any]:
        """What publishing needs besides the weights (written into every checkpoint by rank 0)."""
        from collections import Counter

        from multitalent.train.launch import tracking_uri

        init = self.parts.init
        return {
            "architecture": self.parts.model.build_kwargs(),  # type: ignore[operator]
            "catalog": self.catalog.to_dict(),
            "cases": {
                "train": dict(Counter(c.dataset_id for c in self.setup.train_cases)),
                "val": dict(Counter(c.dataset_id for c in self.setup.val_cases)),
            },
            "validation": dict(self.validation.metrics) if self.validation is not None else {},
            "training": {
                "optimiser": self.job.optimiser.model_dump(),
                "schedule": self.schedule.state_dict(),
                "global_batch": self.job.batch.global_size,
                "workers": self.world_size,
                "zero_stage": self.job.zero_stage,
                "precision": self.parts.precision,
                "iterations_done": self.state.iteration,
                "seed": self.job.run.seed,
                # how left-right mirroring treated paired classes; predict's mirroring follows it
                "laterality": self.job.data.augmentation.laterality,
            },
            "parent": init.parent if init is not None and init.package is not None else None,
            "tracking_uri": tracking_uri(self.job),
            "run_name": self.job.run.name,
            "git_commit": git_commit(),
        }


def worker_info(use_gpu: bool) -> WorkerInfo:
    import ray.train

    ctx = ray.train.get_context()
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), device, use_gpu)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: ``{"job": TrainJob dump, "run_dir": str}``."""
    import ray.train

    from multitalent.train.callbacks import callbacks_for

    job = TrainJob.model_validate(config["job"])
    worker = worker_info(job.workers.use_gpu)
    if not worker.use_gpu:
        # One intra-op thread per CPU the worker reserved (Ray sets OMP_NUM_THREADS accordingly).
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trainer = Trainer(job, worker=worker, run_dir=Path(config["run_dir"]))
    latest = ray.train.get_checkpoint()
    trainer.restore(Path(latest.path) if latest is not None else None)
    trainer.fit(callbacks_for(job))
