"""The tracker the training callbacks hold: an MLflow run plus what a training run logs.

The parts live in their own modules: :mod:`~multitalent.tracking.run` (open or resume the run,
params, tags, metrics, artifacts, end), :mod:`~multitalent.tracking.outbox` (buffering, back-off
and spill while the store is unreachable) and :mod:`~multitalent.tracking.loggers` (the job, label
space, plan, dicts, images and curves). Like the run, no method raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.tracking import loggers
from multitalent.tracking.run import MlflowRun

if TYPE_CHECKING:
    from PIL import Image

    from multitalent.catalog import Catalog
    from multitalent.preprocess.plan import Plan


class Tracker(MlflowRun):
    """One MLflow run with the domain loggers. Build with :meth:`start` (or :meth:`disabled`);
    call on rank 0 only. As a context manager it ends the run with the status an exception implies."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end(
            "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        )

    def log_job(self, resolved_yaml: str) -> None:
        """The resolved job file as artifact ``job.yaml``, and its leaves as ``job.*`` parameters."""
        loggers.log_job(self, resolved_yaml)

    def log_plan(self, plan: Plan) -> None:
        """The plan as artifact ``plan.json`` and its settings as ``plan.*`` parameters."""
        loggers.log_plan(self, plan)

    def log_label_space(self, catalog: Catalog) -> None:
        """``label_space.json`` and the catalog's name, hash and size as ``catalog.*`` parameters."""
        loggers.log_label_space(self, catalog)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON (or, for ``.yaml``/``.yml``, YAML) artifact, serialised now."""
        loggers.log_dict(self, data, artifact_file)

    def log_image(self, image: Image.Image | Path | str, artifact_file: str) -> None:
        """A PIL image (encoded as PNG now) or an image file, stored at ``artifact_file``."""
        loggers.log_image(self, image, artifact_file)

    def log_figure_curves(self, history: Mapping[str, Any], artifact_file: str = "curves/curves.png") -> None:
        """Loss and Dice curves (``history``: name -> [(step, value), ...]) as a PNG."""
        loggers.log_figure_curves(self, history, artifact_file)
