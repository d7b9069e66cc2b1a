"""The conversion job file (``jobs/convert.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from multitalent.jobs import StrictModel
from multitalent.preprocess.plan import DEFAULT_SPACING_ZYX_MM


class SynthSection(StrictModel):
    """Generate the phantom collection into ``raw_root`` first when that folder does not exist."""

    seed: int = 0
    scale: float = Field(default=1.0, gt=0)


class NormalizationSection(StrictModel):
    """CT normalisation: statistics of the whole collection's foreground, or fixed values.

    ``rule`` says which foreground voxels the statistics see: ``every_nth`` (default; nnU-Net v1's
    rule that produced the paper's values: every ``every_nth``-th foreground voxel of each case, so
    cases weigh by their foreground volume) or ``draws`` (``samples_per_case`` random draws per case,
    every case weighing the same).
    """

    source: Literal["collection", "fixed"] = "collection"
    clip: list[float] | None = None
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)
    rule: Literal["every_nth", "draws"] = "every_nth"
    every_nth: int = Field(default=10, gt=0)
    samples_per_case: int = Field(default=10_000, gt=0)

    @model_validator(mode="after")
    def _fixed_needs_values(self) -> NormalizationSection:
        given = [self.clip is not None, self.mean is not None, self.std is not None]
        if self.source == "fixed" and not all(given):
            raise ValueError("source 'fixed' needs clip, mean and std")
        if self.source == "collection" and any(given):
            raise ValueError("clip/mean/std are only for source 'fixed'")
        if self.clip is not None and (len(self.clip) != 2 or self.clip[0] >= self.clip[1]):
            raise ValueError("clip must be [low, high] with low < high")
        return self


class PreprocessSection(StrictModel):
    target_spacing_zyx_mm: list[float] = Field(default_factory=lambda: list(DEFAULT_SPACING_ZYX_MM))
    normalization: NormalizationSection = NormalizationSection()
    fg_locations_per_class: int = Field(default=10_000, gt=0)
    anisotropy_threshold: float = Field(default=3.0, gt=1)

    @model_validator(mode="after")
    def _three_positive(self) -> PreprocessSection:
        s = self.target_spacing_zyx_mm
        if len(s) != 3 or min(s) <= 0:
            raise ValueError("target_spacing_zyx_mm must be three positive numbers (z, y, x)")
        return self


class ShardSection(StrictModel):
    max_cases_per_shard: int | None = Field(default=16, gt=0)
    max_shard_bytes: int | None = Field(default=1 << 30, gt=0)


class RaySection(StrictModel):
    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)
    cpus_per_task: float = Field(default=1.0, gt=0)


class ConvertJob(StrictModel):
    kind: Literal["convert"] = "convert"
    catalog: str = "phantom"
    datasets: list[str] | None = None
    # Reuse a model package's plan (spacing, normalisation, ...) instead of planning: a package folder or
    # models:/NAME@ALIAS | models:/NAME/VERSION (registry at tracking_uri). preprocess: is then unused.
    plan: str | None = None
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    raw_root: str
    out: str
    synth: SynthSection | None = None
    preprocess: PreprocessSection = PreprocessSection()
    shards: ShardSection = ShardSection()
    ray: RaySection = RaySection()
