"""When things happen in a run: epoch ends, validation passes, checkpoints, log points.

Owned here once; the loop and every callback ask :class:`Cadence` instead of recomputing it.
Iterations are counted from 0; ``i`` below is the iteration that just ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multitalent.train.job import TrainJob


@dataclass(frozen=True)
class Cadence:
    iterations_per_epoch: int
    total_iterations: int
    checkpoint_every: int
    validate_every_epochs: int | None  # None: no validation (validation.fold is None)
    log_every: int
    checkpoint_at_epoch_ends: bool = True

    @classmethod
    def of(cls, job: TrainJob) -> Cadence:
        return cls(
            iterations_per_epoch=job.schedule.iterations_per_epoch,
            total_iterations=job.schedule.total_iterations,
            checkpoint_every=job.checkpoint.every_iterations,
            validate_every_epochs=None if job.validation.fold is None else job.validation.every_epochs,
            log_every=job.tracking.log_every,
            checkpoint_at_epoch_ends=job.checkpoint.at_epoch_ends,
        )

    def epoch_end(self, i: int) -> bool:
        return (i + 1) % self.iterations_per_epoch == 0

    def epochs_done(self, i: int) -> int:
        return (i + 1) // self.iterations_per_epoch

    def last(self, i: int) -> bool:
        return i + 1 == self.total_iterations

    def validation_due(self, i: int) -> bool:
        """At every ``validate_every_epochs``-th epoch end, and at the end of the last epoch."""
        if self.validate_every_epochs is None or not self.epoch_end(i):
            return False
        return self.epochs_done(i) % self.validate_every_epochs == 0 or self.last(i)

    def checkpoint_due(self, i: int) -> bool:
        """Every ``checkpoint_every`` iterations, after each validation pass (its metrics travel with the
        checkpoint) and, with ``checkpoint_at_epoch_ends``, at every epoch end. (The end of a launch
        checkpoints too: the trainer's ``on_end``.)"""
        if (i + 1) % self.checkpoint_every == 0 or self.validation_due(i):
            return True
        return self.checkpoint_at_epoch_ends and self.epoch_end(i)

    def log_due(self, i: int) -> bool:
        return (i + 1) % self.log_every == 0
