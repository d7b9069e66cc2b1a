"""Job files: extends, overrides, strict validation with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitalent.convert.job import ConvertJob
from multitalent.jobs import JobError, apply_overrides, load_job, resolved_yaml

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
