"""The evaluation job (``jobs/evaluate.yaml``, ``kind: evaluate``); ``multitalent evaluate`` flags fill the
same model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from multitalent.jobs import StrictModel


class EvaluateJob(StrictModel):
    """Score a prediction folder against raw ground truth."""

    kind: Literal["evaluate"] = "evaluate"
    pred: str  # multitalent predict's output folder
    gt: str  # raw data root holding the catalog's dataset folders
    catalog: str | None = None  # preset or file; None: the model's, named in PRED/predictions.json
    datasets: list[str] | None = None  # only these datasets
    splits: str | None = None  # a converted collection's splits.json: score one fold's validation cases
    fold: int | None = Field(default=None, ge=0)
    out: str | None = None  # where the tables go (default: pred)
    mlflow_run: str | None = None  # log metrics and tables to this MLflow run
    tracking_uri: str | None = None

    @model_validator(mode="after")
    def _fold_with_splits(self) -> EvaluateJob:
        if (self.splits is None) != (self.fold is None):
            raise ValueError("splits and fold go together: the validation cases of one fold")
        return self
