"""``ray job submit --working-dir . -- multitalent convert jobs/convert.yaml`` against a local head (issue 2).

A real head started with ``ray start`` (token auth, its own token), the repository uploaded as the job's
working directory exactly as the README says, absolute output paths given with ``--set``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import LocalRayCluster, local_ray_cluster
from multitalent.preprocess.plan import PLAN_FILE, Plan
from multitalent.shards import load_manifest, verify_case_zarr

pytestmark = pytest.mark.slow

DATASETS = ["P02", "P04"]


@pytest.fixture(scope="module")
def head() -> Iterator[LocalRayCluster]:
    with local_ray_cluster(head_cpus=2) as cluster:
        yield cluster


def test_submitted_convert_job_writes_plan_manifest_and_shards(head: LocalRayCluster, tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    result = head.submit_job(
        [
            "multitalent",
            "convert",
            "jobs/convert.yaml",
            "--set",
            f"raw_root={raw}",
            "--set",
            f"out={out}",
            "--set",
            "synth.scale=0.3",
            "--set",
            f"datasets=[{','.join(DATASETS)}]",
        ],
        timeout_s=240,
    )
    assert result.status == "SUCCEEDED", result.logs[-3000:]

    # The job ran in the uploaded copy but wrote where the absolute paths point.
    plan = Plan.load(out / PLAN_FILE)
    manifest = load_manifest(out)
    assert plan.catalog_hash == manifest.catalog_hash
    assert {c.dataset_id for c in manifest.cases} == set(DATASETS)
    for case in manifest.cases:
        record = verify_case_zarr(out / case.zarr_path)
        assert record is not None and record.sha256 == case.sha256
    assert sorted((out / "wds").glob("shard-*.tar"))
    assert not list(out.rglob(".tmp-*"))

    # The CLI's summary line reached the job's logs (and the submitting terminal).
    summary = f"{len(manifest.cases)} converted, 0 up to date, 0 failed"
    assert summary in result.logs
    assert summary in result.cli_output

    # Ray 2.60 reads the repository's .gitignore for the working-dir upload: the unpacked copy holds
    # the code and jobs but no venv, caches or data.
    unpacked = head.temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
    uploads = [p for p in unpacked if p.is_dir()]
    assert len(uploads) == 1
    assert (uploads[0] / "jobs" / "convert.yaml").is_file()
    assert (uploads[0] / "platform" / "multitalent" / "cli.py").is_file()
    for ignored in [".venv", "data_shards/raw", "runs", "mlruns", ".mypy_cache", ".pytest_cache"]:
        assert not (uploads[0] / ignored).exists(), f"{ignored} was uploaded with the working dir"


def test_a_submitted_convert_with_a_relative_out_is_an_error(head: LocalRayCluster, tmp_path: Path) -> None:
    """Issue 14: the default ``out: data_shards/phantom`` would land in the job's temporary working
    directory (and the summary used to say "output in data_shards/phantom"); it is an error naming the
    field and the fix, before anything is written."""
    result = head.submit_job(
        ["multitalent", "convert", "jobs/convert.yaml", "--set", f"raw_root={tmp_path / 'raw'}"],
        timeout_s=120,
    )
    assert result.status == "FAILED", result.logs[-3000:]
    assert "error: jobs/convert.yaml: relative path(s) out=data_shards/phantom" in result.logs
    assert "submitted Ray job" in result.logs and "--set out=/shared/" in result.logs
    assert "Traceback" not in result.logs
    assert not (tmp_path / "raw").exists()
