"""What happens around the training step: tracking, validation, checkpoint cadence.

Each callback has ``on_start(trainer)``, ``on_step_end(trainer, result)`` and ``on_end(trainer)`` and
never changes the math. Order matters at epoch ends: validation, then logging (its curves include the
new Dice), then the checkpoint (its reported metrics include them too).

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

from multitalent.train.checkpoint import RUN_ID_FILE

if TYPE_CHECKING:
    from multitalent.tracking import Tracker
    from multitalent.train.loop import StepResult, Trainer


def _epoch_end(trainer: Trainer, iteration: int) -> bool:
    return (iteration + 1) % trainer.job.schedule.iterations_per_epoch == 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Validation:
    """Every ``validation.every_epochs`` epochs and at the last epoch: Dice on the fold's patches."""

    def __init__(self, tracking: Tracking) -> None:
        self.tracking = tracking
        self.validator: Any = None
        self.last: dict[str, float] = {}
        self.ran_at = -1  # iterations done at the latest pass

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
            patch_zyx=tuple(job.architecture.patch_zyx),  # type: ignore[arg-type]
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
        i = result.iteration
        if self.validator is None or trainer.stop_reason or not _epoch_end(trainer, i):
            return
        epoch = (i + 1) // trainer.job.schedule.iterations_per_epoch  # epochs done
        last = i + 1 == trainer.job.schedule.total_iterations
        if epoch % trainer.job.validation.every_epochs and not last:
            return
        engine = trainer.engine
        engine.eval()
        try:
            outcome = self.validator.run(
                engine, device=trainer.device, dtype=trainer.dtype, lut=trainer.lut, title=f"epoch {epoch}"
            )
        finally:
            engine.train()
        self.last, self.ran_at = outcome.metrics, i + 1
        if trainer.rank == 0:
            self.tracking.on_validation(trainer, i + 1, outcome.metrics, outcome.overlays, epoch)

    def on_end(self, trainer: Trainer) -> None:
        pass


class Tracking:
    """Rank 0's MLflow run: job, plan, label space at start; loss, lr, samples/s and peak memory every
    ``tracking.log_every`` iterations; validation Dice, overlays and curves at validation epochs."""

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
        self.tracker = Tracker.start(
            tracking_uri=job.tracking.uri,
            experiment=job.tracking.experiment,
            run_name=job.run.name,
            run_dir=trainer.run_dir,
            run_id=run_id,
            tags={"multitalent.attempt": trainer.attempt},
        )
        t = self.tracker
        t.log_job(resolved_yaml(job))
        t.log_plan(trainer.setup.plan_path)
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
        i = result.iteration
        if (i + 1) % trainer.job.tracking.log_every == 0 or result.skipped:
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
        if _epoch_end(trainer, i) and self.epoch_losses:
            epoch_loss = sum(self.epoch_losses) / len(self.epoch_losses)
            self.tracker.log_metrics({"train/epoch_loss": epoch_loss}, step=i)
            trainer.state.curves.setdefault("train/epoch_loss", []).append([i + 1, epoch_loss])
        if _epoch_end(trainer, i):
            self.epoch_losses = []
        if (i + 1) % trainer.job.checkpoint.every_iterations == 0 or _epoch_end(trainer, i):
            # A checkpoint follows: send what is buffered, so a worker lost before the next flush loses
            # no metric the checkpoint already covers (a restart resumes after that checkpoint).
            self.tracker.flush(force=True)
        if trainer.state.mlflow_run_id is None:
            self._remember_run_id(trainer)

    def on_validation(
        self,
        trainer: Trainer,
        iteration: int,
        metrics: dict[str, float],
        overlays: dict[str, Any],
        epoch: int,
    ) -> None:
        if self.tracker is None:
            return
        self.tracker.log_metrics(metrics, step=iteration - 1)
        for name in ("val/dice_mean/class", "val/dice_mean/dataset"):
            if name in metrics:
                trainer.state.curves.setdefault(name, []).append([iteration, metrics[name]])
        for dataset_id, picture in overlays.items():
            self.tracker.log_image(picture, f"validation/epoch_{epoch:04d}/overlay_{dataset_id}.png")
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


def _read_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Checkpointing:
    """Every ``checkpoint.every_iterations``, at epoch ends, and when the launch ends (all ranks)."""

    def __init__(self, validation: Validation) -> None:
        self.validation = validation

    def on_start(self, trainer: Trainer) -> None:
        pass

    def _metrics(self, trainer: Trainer, result: StepResult | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "optimizer_steps": trainer.state.optimizer_steps,
            "skipped_nonfinite": trainer.state.skipped_nonfinite,
            "mlflow_run_id": trainer.state.mlflow_run_id or "",
        }
        if result is not None and not result.skipped:
            metrics["loss"] = result.loss
        if self.validation.ran_at == trainer.state.iteration:
            metrics.update(self.validation.last)
        return metrics

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if trainer.stop_reason:
            return
        i = result.iteration
        if (i + 1) % trainer.job.checkpoint.every_iterations == 0 or _epoch_end(trainer, i):
            trainer.save_checkpoint(self._metrics(trainer, result))

    def on_end(self, trainer: Trainer) -> None:
        if trainer.stop_reason:
            # Ray's result only carries metrics of checkpoints, so the stop is reported with one (the
            # weights are sound: skipped iterations never reached the optimizer).
            trainer.state.stop_reason = trainer.stop_reason
            trainer.save_checkpoint({**self._metrics(trainer, None), "stop_reason": trainer.stop_reason})
        elif trainer.last_checkpoint_iteration != trainer.state.iteration:
            trainer.save_checkpoint(self._metrics(trainer, None))


def default_callbacks() -> list[Any]:
    """Tracking, validation, checkpointing, in the order they must run."""
    tracking = Tracking()
    validation = Validation(tracking)
    return [tracking, validation, Checkpointing(validation)]
