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


def reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's cached process groups (module globals in ``deepspeed.utils.groups`` and
    ``deepspeed.comm``): after ``destroy_process_group`` they point at a dead group, and the next
    in-process engine would use them ("Group ... is not registered")."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in vars(groups).copy().items():
            if name.startswith("_") and name.isupper() and isinstance(value, dict):
                value.clear()
        groups._WORLD_GROUP = None
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group on a free port for in-process DeepSpeed engines; torn down with
    DeepSpeed's cached groups, so the next test's engine starts clean."""
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_deepspeed_groups()
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    reset_deepspeed_groups()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3-API server on 127.0.0.1 for the module's tests (see tests/s3_server.py)."""
    from s3_server import S3Server

    server = S3Server(log_path=tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()
