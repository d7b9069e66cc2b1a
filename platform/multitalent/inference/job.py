"""The prediction job (``jobs/predict.yaml``, ``kind: predict``); ``multitalent predict`` flags fill the same
model, so a command line and a job file describe a run the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from multitalent.jobs import StrictModel, load_job


class InferenceSection(StrictModel):
    step: float = Field(default=0.5, gt=0, le=1)  # window step, fraction of the patch
    mirror_axes: list[int] = Field(default_factory=lambda: [0, 1, 2])  # [] = no mirroring; 0=z 1=y 2=x
    batch_size: int = Field(default=2, ge=1)  # windows per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    @model_validator(mode="after")
    def _axes(self) -> InferenceSection:
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2, got {self.mirror_axes}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


class RaySection(StrictModel):
    """Cohorts on Ray: one actor per GPU (``use_gpu``) or per ``cpus_per_worker`` CPUs, each loading the
    model once. ``enabled: false`` predicts in this process."""

    enabled: bool = False
    address: str | None = None  # None: RAY_ADDRESS of a submitted job, else a local Ray
    num_cpus: int | None = Field(default=None, ge=1)  # size of a local Ray (None: all cores)
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)


class PredictJob(StrictModel):
    """Predict a file or a folder of scans with a trained model."""

    kind: Literal["predict"] = "predict"
    input: str  # a NIfTI file or a folder of them (and of <case>/{imaging,ct}.nii.gz folders)
    out: str
    model: str  # a training run folder (its newest verified checkpoint), or a model package
    datasets: list[str] | None = None  # predict the classes of these datasets (default: all)
    classes: list[str] | None = None  # or of these classes ("<dataset>:<class>" or a class name)
    masks: bool = False  # also one binary mask per class
    overwrite: bool = False  # allow an output folder that holds another model's predictions
    inference: InferenceSection = InferenceSection()
    ray: RaySection = RaySection()


def load_predict_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PredictJob:
    return load_job(path, PredictJob, overrides)
