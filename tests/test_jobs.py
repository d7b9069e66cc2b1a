"""Job files: extends, overrides, strict validation with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitalent.convert.job import ConvertJob
from multitalent.jobs import JobError, StrictModel, apply_overrides, load_job, resolved_yaml

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_convert_job_loads_with_defaults():
    job = load_job(JOBS / "convert.yaml", ConvertJob)
    assert job.catalog == "phantom"
    assert job.preprocess.target_spacing_zyx_mm == [1.5, 1.0, 1.0]
    assert job.preprocess.normalization.source == "collection"
    assert "raw_root: data_shards/raw/phantom" in resolved_yaml(job)


def test_extends_merges_sections(tmp_path):
    child = load_job(JOBS / "convert_multitalent13.yaml", ConvertJob)
    assert child.catalog == "multitalent13"
    assert child.synth is None
    assert child.shards.max_cases_per_shard == 32
    assert child.preprocess.fg_locations_per_class == 10000  # inherited


def test_overrides_are_typed_and_dotted():
    job = load_job(
        JOBS / "convert.yaml",
        ConvertJob,
        ["shards.max_cases_per_shard=3", "out=/tmp/x", "preprocess.target_spacing_zyx_mm=[2, 2, 2]"],
    )
    assert job.shards.max_cases_per_shard == 3
    assert job.out == "/tmp/x"
    assert job.preprocess.target_spacing_zyx_mm == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("shards.max_cases_per_shard='many'", "shards.max_cases_per_shard"),
        ("preprocess.typo=1", "preprocess.typo"),
        ("ray.cpus_per_task=-1", "ray.cpus_per_task"),
        ("preprocess.normalization.mean=3", "preprocess.normalization"),
        ("preprocess.target_spacing_zyx_mm=[1, 1]", "preprocess"),
    ],
)
def test_invalid_fields_are_named(override, where):
    with pytest.raises(JobError) as e:
        load_job(JOBS / "convert.yaml", ConvertJob, [override])
    assert where in str(e.value) and "convert.yaml" in str(e.value)


def test_extends_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(JobError, match="cycle"):
        load_job(tmp_path / "a.yaml", ConvertJob)
    with pytest.raises(JobError, match="does not exist"):
        load_job(tmp_path / "missing.yaml", ConvertJob)


def test_override_syntax_errors():
    with pytest.raises(JobError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(JobError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


class _Optimiser(StrictModel):
    lr: float
    eps: float
    steps: int
    name: str


class _LrJob(StrictModel):
    optimiser: _Optimiser


@pytest.mark.parametrize(
    ("text", "value"),
    [("5e-4", 5e-4), ("1E3", 1000.0), ("-2e+5", -2e5), ("+3e0", 3.0), ("5.0e-4", 5e-4), ("1e-8", 1e-8)],
)
def test_exponent_numbers_without_a_dot_are_floats_in_files_and_overrides(tmp_path, text, value):
    """YAML 1.1 reads ``5e-4`` as a string; job files and ``--set`` read it as the number."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"optimiser:\n  lr: {text}\n  eps: 1e-4\n  steps: 10\n  name: sgd\n")
    job = load_job(job_file, _LrJob)
    assert job.optimiser.lr == value and isinstance(job.optimiser.lr, float)
    assert job.optimiser.eps == 1e-4
    overridden = load_job(job_file, _LrJob, [f"optimiser.eps={text}", "optimiser.lr=2"])
    assert overridden.optimiser.eps == value and overridden.optimiser.lr == 2.0
    assert apply_overrides({}, [f"x={text}"])["x"] == value


def test_number_parsing_leaves_other_scalars_alone(tmp_path):
    got = apply_overrides({}, ["i=10", "f=1.5", "s=e5", "t=5e", "h=0x10", "v=1.2.3", "b=true", "n=1_000"])
    assert got == {"i": 10, "f": 1.5, "s": "e5", "t": "5e", "h": 16, "v": "1.2.3", "b": True, "n": 1000}
    assert isinstance(got["i"], int)
    job_file = tmp_path / "job.yaml"
    job_file.write_text("optimiser:\n  lr: 1e-2\n  eps: 1e-4\n  steps: 1e3\n  name: 5e-4x\n")
    with pytest.raises(JobError, match=r"optimiser\.steps"):  # an int field still refuses a float
        load_job(job_file, _LrJob)
    # the global PyYAML loader is untouched
    import yaml

    assert yaml.safe_load("5e-4") == "5e-4"
