"""The experiment job file (``jobs/experiment.yaml``): MultiTalent vs naive merge vs one model per dataset.

Strict like every job file (:mod:`multitalent.jobs`). The collection and the base training job are other
job files (``convert``, ``train``; paths relative to this file), so the experiment trains exactly what
``multitalent train`` trains; the experiment sets, per run, only what distinguishes the arms and the
budget (listed in :data:`EXPERIMENT_KEYS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from multitalent.jobs import JobError, StrictModel, load_job

ARMS = ("multitalent", "naive_merge", "single")
Arm = Literal["multitalent", "naive_merge", "single"]

# Training job fields the experiment sets for each run (a train_set entry for one of them is an error).
EXPERIMENT_KEYS = (
    "catalog",
    "shards.path",
    "architecture.output",
    "schedule.epochs",
    "schedule.iterations_per_epoch",
    "schedule.stop_after_iterations",
    "validation.fold",
    "validation.every_epochs",
    "run.storage_path",
    "run.name",
    "run.seed",
)


class BudgetSection(StrictModel):
    """Iterations per run; every run has the same network, patch, batch and optimiser, so iterations are
    the compute.

    ``iterations``: each multi-dataset run (arms ``multitalent`` and ``naive_merge``: the same budget).
    ``single``: each per-dataset run's share. ``equal_total`` (default): ``iterations / K`` each, so the K
    per-dataset runs together train as many iterations as one multi-dataset run (the same compute; and
    about the same number of patches of each dataset as the multi-dataset run samples, which draws a
    dataset with probability ∝ √n). ``paper``: half of ``iterations`` each (the paper trained every
    single-dataset baseline the standard 1000 epochs and MultiTalent 2000), so the K runs cost K/2 times
    one multi-dataset run. A number: that fraction of ``iterations`` each. Runs are rounded to whole
    multiples of ``validations`` epochs (at least one). ``validations``: validation passes per run, evenly
    spaced, the last at the end (the curve that "training cost to a given Dice" reads).
    """

    iterations: int = Field(default=480, ge=1)
    single: Literal["equal_total", "paper"] | float = "equal_total"
    iterations_per_epoch: int = Field(default=20, ge=1)
    validations: int = Field(default=4, ge=1)

    def single_fraction(self, datasets: int) -> float:
        """Each per-dataset run's fraction of ``iterations`` when the collection has ``datasets``."""
        if self.single == "equal_total":
            return 1.0 / datasets
        if self.single == "paper":
            return 0.5
        return float(self.single)

    def epochs(self, fraction: float = 1.0) -> int:
        """Epochs of a run with ``fraction`` of the budget (a multiple of ``validations``, at least one)."""
        full = self.iterations / self.iterations_per_epoch
        blocks = max(1, round(full * fraction / self.validations))
        return blocks * self.validations

    @model_validator(mode="after")
    def _whole_epochs(self) -> BudgetSection:
        full = self.iterations / self.iterations_per_epoch
        if full != int(full) or int(full) % self.validations:
            raise ValueError(
                f"iterations {self.iterations} must be a whole number of epochs of "
                f"{self.iterations_per_epoch} iterations, divisible by validations ({self.validations})"
            )
        if isinstance(self.single, float) and not 0 < self.single <= 1:
            raise ValueError(f"single: a fraction must lie in (0, 1], got {self.single}")
        return self


class EvaluationSection(StrictModel):
    """Held-out scoring: every model predicts the ``fold``'s validation cases (the converter's
    ``splits.json``) with ``multitalent predict``; ``multitalent evaluate`` scores each model's datasets.

    A multi-dataset model predicts every held-out case; a single-dataset model its own dataset's, plus
    the ``timing_cases`` (the first held-out case of each of the first datasets that have one), which
    every model predicts: the inference time per case compares one model with the K on those.
    ``mirror``: 8-way mirroring at prediction (off: 8x less inference work; the same for every arm).
    ``dice_targets``: the validation Dice (mean over classes) whose training cost the report gives.
    ``conflicts``: classes whose protocol another dataset's same-name class contradicts (flagged).
    """

    fold: int = Field(default=0, ge=0, lt=5)
    timing_cases: int = Field(default=2, ge=1)
    mirror: bool = False
    dice_targets: list[float] = Field(default_factory=lambda: [0.2, 0.4])
    conflicts: list[str] = Field(default_factory=list)


def _every_arm() -> list[Arm]:
    return ["multitalent", "naive_merge", "single"]


class ExperimentJob(StrictModel):
    """See ``jobs/experiment.yaml`` for every field with its meaning."""

    kind: Literal["experiment"] = "experiment"
    out: str = "runs/experiment"
    convert: str = "convert.yaml"  # the collection's convert job, relative to this file
    train: str = "pretrain_cpu_tiny.yaml"  # the base training job of every run, relative to this file
    train_set: list[str] = Field(default_factory=list)  # KEY=VALUE overrides of every training run
    arms: list[Arm] = Field(default_factory=_every_arm)
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    budget: BudgetSection = BudgetSection()
    evaluation: EvaluationSection = EvaluationSection()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentJob:
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must list distinct arms of {ARMS}, got {self.arms}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        for item in self.train_set:
            key, sep, _ = item.partition("=")
            if not sep or not key:
                raise ValueError(f"train_set entry {item!r}: expected KEY=VALUE")
            if key in EXPERIMENT_KEYS:
                raise ValueError(f"train_set entry {item!r}: {key} is set by the experiment for each run")
        return self


def load_experiment_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentJob:
    """Read, merge (``extends:``), override and validate an experiment job; ``convert`` and ``train``
    become absolute paths (relative ones are taken from the job file's folder).

    Raises:
        JobError: naming the file and the field; also a ``convert``/``train`` file that does not exist.
    """
    path = Path(path)
    job = load_job(path, ExperimentJob, overrides)
    resolved = {}
    for field in ("convert", "train"):
        value = Path(getattr(job, field)).expanduser()
        full = value if value.is_absolute() else (path.parent / value)
        if not full.is_file():
            raise JobError(f"{path}: {field}: {full} does not exist")
        resolved[field] = str(full.resolve())
    return job.model_copy(update=resolved)
