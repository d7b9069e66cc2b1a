"""What happens around the training step: validation, tracking, checkpoints, test-time faults.

A callback implements :class:`multitalent.train.loop.Callback` (``on_start``, ``on_step_start``,
``on_step_end``, ``on_end``; :class:`CallbackBase` gives no-op defaults) and never changes the math.
Callbacks do not know each other: they read the trainer (``trainer.cadence`` says when something is
due, ``trainer.validation`` holds the latest validation pass, ``trainer.state`` the checkpointed
counters). Order matters at epoch ends only in that :class:`Validation` fills ``trainer.validation``
before :class:`Tracking` logs it and :class:`Checkpointing` reports it (:func:`callbacks_for` returns
them in that order).

Collective work (validation forward passes, checkpoint saving, Ray reports) runs on every rank at the
same iterations; MLflow calls run on rank 0 only.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multitalent.data.batch import DrawnBatch
from multitalent.train.checkpoint import RUN_ID_FILE

if TYPE_CHECKING:
    from multitalent.tracking import Tracker
    from multitalent.train.job import TrainJob
    from multitalent.train.loop import Callback, StepResult, Trainer


class CallbackBase:
    """No-op implementations of every :class:`Callback` method."""

    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer, iteration: int, batch: Any) -> None:
        pass

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_end(self, trainer: Trainer) -> None:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Validation(CallbackBase):
    """When ``trainer.cadence.validation_due``: Dice on the fold's fixed patches, stored in
    ``trainer.validation``."""

    def __init__(self) -> None:
        self.validator: Any = None

    def on_start(self, trainer: Trainer) -> None:
        job = trainer.job
        if job.validation.fold is None or not trainer.setup.val_cases:
            return
        from multitalent.train.components import zarr_source
        from multitalent.train.validation import Validator

        source = zarr_source(
            job,
            trainer.setup,
            cases=trainer.setup.val_cases,
            patch_zyx=trainer.augment.patch_zyx,
            batch_size=job.micro_batch,
            rank=trainer.rank,
            world_size=trainer.world_size,
        )
        self.validator = Validator(
            source,
            seed=job.run.seed,
            patches_per_case=job.validation.patches_per_case,
            rank=trainer.rank,
            world_size=trainer.world_size,
            batch_size=job.micro_batch,
            overlays=job.validation.overlays,
        )

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        from multitalent.train.loop import ValidationResult

        i = result.iteration
        if self.validator is None or trainer.stop_reason or not trainer.cadence.validation_due(i):
            return
        from multitalent.models import class_logits_forward

        epoch = trainer.cadence.epochs_done(i)
        engine = trainer.engine
        # per-class logits of the catalog whatever the output kind (a merged softmax is converted)
        forward = class_logits_forward(
            engine, output=trainer.job.architecture.output, catalog=trainer.catalog
        )
        engine.eval()
        try:
            outcome = self.validator.run(
                forward, device=trainer.device, dtype=trainer.dtype, lut=trainer.lut, title=f"epoch {epoch}"
            )
        finally:
            engine.train()
        trainer.validation = ValidationResult(i + 1, epoch, outcome.metrics, outcome.overlays)


class Tracking(CallbackBase):
    """Rank 0's MLflow run: job, plan, label space at start; loss, lr, samples/s and peak memory every
    ``tracking.log_every`` iterations; validation Dice, overlays and curves after each validation."""

    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.window_start = time.perf_counter()
        self.window_iterations = 0
        self.epoch_losses: list[float] = []

    def on_start(self, trainer: Trainer) -> None:
        if trainer.rank != 0:
            return
        from multitalent.jobs import resolved_yaml
        from multitalent.tracking import Tracker

        job = trainer.job
        if not job.tracking.enabled:
            self.tracker = Tracker.disabled()
            return
        run_id = trainer.state.mlflow_run_id or _read_run_id(trainer.run_dir)
        from multitalent.train.launch import tracking_uri

        self.tracker = Tracker.start(
            tracking_uri=tracking_uri(job),
            experiment=job.tracking.experiment,
            run_name=job.run.name,
            run_dir=trainer.run_dir,
            run_id=run_id,
            tags={"multitalent.attempt": trainer.attempt},
        )
        t = self.tracker
        t.set_tags(trainer.lineage_tags)
        t.log_job(resolved_yaml(job))
        t.log_plan(trainer.setup.plan)
        t.log_label_space(trainer.catalog)
        t.log_dict(trainer.ds_config, "deepspeed_config.json")
        t.log_dict(trainer.model_description, "model.json")
        t.log_params(
            {
                "world_size": trainer.world_size,
                "micro_batch": job.micro_batch,
                "precision": str(trainer.dtype).removeprefix("torch."),
                "model.parameters": trainer.model_description["parameters"]["total"],
                "train_cases": len(trainer.setup.train_cases),
                "val_cases": len(trainer.setup.val_cases),
            }
        )
        if trainer.resumed_from is not None:
            t.set_tags({f"multitalent.resumed.{trainer.attempt}": f"{trainer.resumed_from.name}"})
        if trainer.rejected_checkpoints:
            t.log_text("\n".join(trainer.rejected_checkpoints), f"resume/rejected-{trainer.attempt}.txt")
        self._remember_run_id(trainer)

    def _remember_run_id(self, trainer: Trainer) -> None:
        if self.tracker is None or self.tracker.run_id is None:
            return
        trainer.state.mlflow_run_id = self.tracker.run_id
        path = trainer.run_dir / RUN_ID_FILE
        if not path.exists():
            try:
                path.write_text(self.tracker.run_id)
            except OSError as e:
                print(f"[multitalent] cannot write {path}: {e}", file=sys.stderr)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not result.skipped:
            self.epoch_losses.append(result.loss)
        self.window_iterations += 1
        if trainer.rank != 0 or self.tracker is None:
            return
        i, cadence = result.iteration, trainer.cadence
        if cadence.log_due(i) or result.skipped:
            # Wall clock between log points: data waits, validation and checkpoints included.
            now = time.perf_counter()
            seconds = max(now - self.window_start, 1e-9)
            metrics = {
                "train/lr": result.lr,
                "train/samples_per_s": self.window_iterations * trainer.job.batch.global_size / seconds,
                "train/peak_memory_mb": peak_memory_mb(trainer.device),
                "train/skipped_nonfinite": trainer.state.skipped_nonfinite,
            }
            if not result.skipped:
                metrics["train/loss"] = result.loss
            self.tracker.log_metrics(metrics, step=i)
            self.window_start, self.window_iterations = now, 0
        if cadence.epoch_end(i):
            if self.epoch_losses:
                epoch_loss = sum(self.epoch_losses) / len(self.epoch_losses)
                self.tracker.log_metrics({"train/epoch_loss": epoch_loss}, step=i)
                trainer.state.curves.setdefault("train/epoch_loss", []).append([i, epoch_loss])
            self.epoch_losses = []
        validation = trainer.validation
        if validation is not None and validation.iteration == i + 1:
            self._log_validation(trainer, validation)
        if cadence.checkpoint_due(i):
            # A checkpoint follows: send what is buffered, so a worker lost before the next flush loses
            # no metric the checkpoint already covers (a restart resumes after that checkpoint).
            self.tracker.flush(force=True)
        if trainer.state.mlflow_run_id is None:
            self._remember_run_id(trainer)

    def _log_validation(self, trainer: Trainer, validation: Any) -> None:
        assert self.tracker is not None
        metrics, step = validation.metrics, validation.iteration - 1
        self.tracker.log_metrics(metrics, step=step)
        for name in ("val/dice_mean/class", "val/dice_mean/dataset"):
            if name in metrics:
                # On the MLflow step of the metric (the iteration that ended), like the loss curve.
                trainer.state.curves.setdefault(name, []).append([step, metrics[name]])
        for dataset_id, picture in validation.overlays.items():
            self.tracker.log_image(
                picture, f"validation/epoch_{validation.epoch:04d}/overlay_{dataset_id}.png"
            )
        self.log_curves(trainer)

    def log_curves(self, trainer: Trainer) -> None:
        if self.tracker is not None and trainer.state.curves:
            curves = {k: [(int(a), float(b)) for a, b in v] for k, v in trainer.state.curves.items()}
            self.tracker.log_figure_curves(curves, "curves/curves.png")

    def on_end(self, trainer: Trainer) -> None:
        if self.tracker is None:
            return
        self.log_curves(trainer)
        status = "FAILED" if trainer.stop_reason else "FINISHED"
        if trainer.stop_reason:
            self.tracker.set_tags({"multitalent.stop_reason": trainer.stop_reason})
        if trainer.state.iteration >= trainer.job.schedule.total_iterations or trainer.stop_reason:
            self.tracker.end(status)
        else:
            self.tracker.flush(force=True)  # an early stop (stop_after_iterations): the run continues later
        # A store that was slow or unreachable until now has created the run only in this last send: name it
        # in <run_dir>/mlflow_run_id so the launcher's summary (and the next launch) find it.
        self._remember_run_id(trainer)


def _read_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Checkpointing(CallbackBase):
    """When ``trainer.cadence.checkpoint_due``, and when the launch ends (all ranks)."""

    def _metrics(self, trainer: Trainer, result: StepResult | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "optimizer_steps": trainer.state.optimizer_steps,
            "skipped_nonfinite": trainer.state.skipped_nonfinite,
            "mlflow_run_id": trainer.state.mlflow_run_id or "",
        }
        if result is not None and not result.skipped:
            metrics["loss"] = result.loss
        if trainer.validation is not None and trainer.validation.iteration == trainer.state.iteration:
            metrics.update(trainer.validation.metrics)
        return metrics

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not trainer.stop_reason and trainer.cadence.checkpoint_due(result.iteration):
            trainer.save_checkpoint(self._metrics(trainer, result))

    def on_end(self, trainer: Trainer) -> None:
        if trainer.stop_reason:
            # Ray's result only carries metrics of checkpoints, so the stop is reported with one (the
            # weights are sound: skipped iterations never reached the optimizer).
            trainer.state.stop_reason = trainer.stop_reason
            trainer.save_checkpoint({**self._metrics(trainer, None), "stop_reason": trainer.stop_reason})
        elif trainer.last_checkpoint_iteration != trainer.state.iteration:
            trainer.save_checkpoint(self._metrics(trainer, None))


class Progress(CallbackBase):
    """Rank 0 appends one JSON object per line to ``run_dir/progress.jsonl`` (the driver prints them as
    they come: :mod:`multitalent.train.progress`): ``start``; ``epoch`` at every epoch end (mean loss,
    lr, samples/s, ETA, and the validation metrics when validation ran); ``step`` when an epoch runs
    longer than ``heartbeat_s`` without a line; ``end``. Field meanings: ``progress.py``."""

    def __init__(self, *, heartbeat_s: float = 60.0) -> None:
        self.heartbeat_s = heartbeat_s
        self.path: Path | None = None
        self.losses: list[float] = []
        self.iterations = 0
        self.launch_iterations = 0
        self.t_launch = self.t_epoch = self.t_line = time.perf_counter()
        self.cpu_launch = time.process_time()

    def _write(self, record: dict[str, Any]) -> None:
        import json

        if self.path is None:
            return
        record = {**record, "time": time.time()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False, default=float) + "\n")
        except (OSError, ValueError) as e:
            print(f"[multitalent] cannot write {self.path}: {e}", file=sys.stderr)

    def on_start(self, trainer: Trainer) -> None:
        if trainer.rank != 0:
            return
        from multitalent.train.progress import PROGRESS_FILE

        self.path = trainer.run_dir / PROGRESS_FILE
        self.t_launch = self.t_epoch = self.t_line = time.perf_counter()
        self.cpu_launch = time.process_time()
        s = trainer.job.schedule
        self._write(
            {
                "event": "start",
                "iteration": trainer.state.iteration,
                "total": s.total_iterations,
                "stop": trainer.stop_iteration,
                "epochs": s.epochs,
                "iterations_per_epoch": s.iterations_per_epoch,
                "world_size": trainer.world_size,
                "global_batch": trainer.job.batch.global_size,
                "resumed_from": None if trainer.resumed_from is None else trainer.resumed_from.name,
            }
        )

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.path is None:
            return
        if not result.skipped:
            self.losses.append(result.loss)
        self.iterations += 1
        self.launch_iterations += 1
        i, cadence = result.iteration, trainer.cadence
        now = time.perf_counter()
        epoch_end = cadence.epoch_end(i)
        if not epoch_end and now - self.t_line < self.heartbeat_s:
            return
        seconds = max(now - self.t_epoch, 1e-9)
        remaining = trainer.stop_iteration - (i + 1)
        record: dict[str, Any] = {
            "event": "epoch" if epoch_end else "step",
            "epoch": cadence.epochs_done(i) if epoch_end else cadence.epochs_done(i) + 1,
            "epochs": trainer.job.schedule.epochs,
            "iteration": i + 1,
            "total": trainer.job.schedule.total_iterations,
            "loss": sum(self.losses) / len(self.losses) if self.losses else None,
            "lr": result.lr,
            "samples_per_s": self.iterations * trainer.job.batch.global_size / seconds,
            "seconds": seconds,
            "eta_s": (now - self.t_launch) / self.launch_iterations * remaining,
            "skipped_nonfinite": trainer.state.skipped_nonfinite,
            "cpu_s": time.process_time() - self.cpu_launch,
        }
        validation = trainer.validation
        if validation is not None and validation.iteration == i + 1:
            record["validation"] = validation.metrics
        self._write(record)
        self.t_line = now
        if epoch_end:
            self.losses, self.iterations, self.t_epoch = [], 0, now

    def on_end(self, trainer: Trainer) -> None:
        v = trainer.validation
        self._write(
            {
                "event": "end",
                "iteration": trainer.state.iteration,
                "total": trainer.job.schedule.total_iterations,
                "seconds": time.perf_counter() - self.t_launch,
                "cpu_s": time.process_time() - self.cpu_launch,
                "stop_reason": trainer.stop_reason,
                "validation_iteration": None if v is None else v.iteration,
            }
        )


class FaultInjection(CallbackBase):
    """Test-time faults (the job's ``debug:`` section): a NaN input image on rank 0 at the given
    iterations (its loss becomes non-finite), and a sleep after every step (slows a run down so a test
    can kill it mid-way)."""

    def __init__(self, *, nan_input_at: list[int], sleep_per_iteration_s: float = 0.0) -> None:
        self.nan_input_at = set(nan_input_at)
        self.sleep_per_iteration_s = sleep_per_iteration_s

    def on_step_start(self, trainer: Trainer, iteration: int, batch: Any) -> None:
        if iteration in self.nan_input_at and trainer.rank == 0:
            groups = (
                [g for g in (batch.wide, batch.narrow) if g is not None]
                if isinstance(batch, DrawnBatch)
                else [batch]
            )
            for g in groups:  # float NaN in place of int16 HU too (DrawnBatch normalises int16 only)
                g.image_bczyx = torch.full(g.image_bczyx.shape, float("nan"))

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.sleep_per_iteration_s:
            time.sleep(self.sleep_per_iteration_s)


def callbacks_for(job: TrainJob) -> list[Callback]:
    """Validation, tracking, checkpointing and progress in the order they must run, plus the job's
    fault injection when its ``debug:`` section asks for one."""
    callbacks: list[Callback] = [Validation(), Tracking(), Checkpointing(), Progress()]
    d = job.debug
    if d.poison_loss_at or d.sleep_per_iteration_s:
        callbacks.append(
            FaultInjection(nan_input_at=d.poison_loss_at, sleep_per_iteration_s=d.sleep_per_iteration_s)
        )
    return callbacks
