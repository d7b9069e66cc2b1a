"""Session-wide fixtures shared by several test files.

``phantom_shards``: the phantom collection (scale 0.5) converted once per test session into Zarr
stores + WebDataset shards + ``plan.json`` + ``manifest.json``; treat the folder as read-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted phantom collection (catalog ``phantom``); read-only, shared by the session."""
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion
    from multitalent.jobs import load_job
    from multitalent.synth import write_phantom_collection

    root = tmp_path_factory.mktemp("phantom_shards")
    raw, out = root / "raw", root / "out"
    write_phantom_collection(raw, seed=0, scale=0.5)
    job = load_job(
        REPO / "jobs" / "convert.yaml",
        ConvertJob,
        [f"raw_root={raw}", f"out={out}", "ray.num_cpus=2", "synth=null"],
    )
    summary = run_conversion(job, log=lambda _: None)
    if not summary.ok:
        raise RuntimeError(f"phantom conversion failed: {summary.failures}")
    return out
