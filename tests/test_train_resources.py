"""The resource check before launching (issue 14): a job the cluster can never run fails at once with the
demand and what the cluster has, instead of waiting forever in Ray's queue.

A table of small clusters with hand-counted capacities, then the real thing: ``multitalent train`` with
``--address`` of a real local Ray cluster (``ray start``, 2 CPUs, no GPU) and a job asking for GPUs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from multitalent.train.resources import capacity, check, describe, worker_demand

REPO = Path(__file__).resolve().parents[1]
MULTITALENT = str(Path(sys.executable).with_name("multitalent"))

CPU8 = {"CPU": 8.0, "GPU": 0.0, "memory": 1e10}
GPU2 = {"CPU": 16.0, "GPU": 2.0}


@pytest.mark.parametrize(
    ("use_gpu", "per_worker", "expected"),
    [
        (True, None, {"GPU": 1.0}),  # Ray Train's default: no CPU asked for
        (False, None, {"CPU": 1.0}),
        (True, {"CPU": 8}, {"CPU": 8.0, "GPU": 1.0}),  # use_gpu adds a GPU
        (False, {"CPU": 2, "GPU": 0}, {"CPU": 2.0}),  # zeros dropped
    ],
)
def test_worker_demand_follows_ray_train(use_gpu, per_worker, expected):
    assert worker_demand(use_gpu=use_gpu, resources_per_worker=per_worker) == expected


@pytest.mark.parametrize(
    ("nodes", "demand", "strategy", "expected"),
    [
        ([CPU8], {"GPU": 1}, "PACK", 0),  # no GPU anywhere
        ([CPU8, CPU8], {"CPU": 3}, "PACK", 4),  # 2 + 2
        ([CPU8, CPU8], {"CPU": 3}, "STRICT_PACK", 2),  # all on one node
        ([CPU8, CPU8], {"CPU": 3}, "STRICT_SPREAD", 2),  # one per node
        ([CPU8, {"CPU": 12.0, "GPU": 2.0}], {"CPU": 8, "GPU": 1}, "PACK", 1),  # CPUs for one worker
        ([GPU2, GPU2], {"CPU": 8, "GPU": 1}, "SPREAD", 4),
        ([{"CPU": 1.0}], {"CPU": 0.5}, "PACK", 2),
        ([], {"CPU": 1}, "PACK", 0),
    ],
)
def test_capacity(nodes, demand, strategy, expected):
    assert capacity(nodes, demand, strategy) == expected


def test_check_names_the_demand_the_cluster_and_the_fix():
    verdict = check(num_workers=2, demand={"CPU": 8, "GPU": 1}, strategy="PACK", nodes=[CPU8])
    assert not verdict.possible
    problem = verdict.problem()
    assert "2 worker(s) x {CPU: 8, GPU: 1} (PACK)" in problem and "{CPU: 8, GPU: 0}" in problem
    assert "workers.use_gpu=false" in problem and "memory" not in problem

    too_few = check(num_workers=3, demand={"CPU": 4}, strategy="PACK", nodes=[CPU8])
    assert not too_few.possible and "at most 2" in too_few.problem() and "num_workers" in too_few.problem()

    busy = check(num_workers=2, demand={"CPU": 4}, strategy="PACK", nodes=[CPU8], available={"CPU": 3.0})
    assert busy.possible and not busy.free_now
    assert "waiting for resources" in busy.waiting() and "available now {CPU: 3}" in busy.waiting()
    assert check(num_workers=2, demand={"CPU": 4}, strategy="PACK", nodes=[CPU8], available=CPU8).free_now
    assert describe({"CPU": 2.0, "bundle_group_0_abc": 999.0, "node:127.0.0.1": 1.0}) == "{CPU: 2}"


@pytest.mark.slow
def test_a_gpu_job_on_a_cluster_without_gpus_fails_at_once(phantom_shards, tmp_path):
    """Before the check this job waited forever (pending ``{'GPU': 1.0} * 2``)."""
    from cluster import local_ray_cluster

    sets = [
        f"shards.path={phantom_shards}",
        f"run.storage_path={tmp_path}",
        "workers.use_gpu=true",
        "workers.resources_per_worker=null",
    ]
    args = [arg for s in sets for arg in ("--set", s)]
    with local_ray_cluster(head_cpus=2) as head:
        start = time.monotonic()
        proc = subprocess.run(
            [MULTITALENT, "train", "jobs/pretrain_cpu_tiny.yaml", "--address", head.gcs_address, *args],
            env=head.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        seconds = time.monotonic() - start
        dry = subprocess.run(
            [
                MULTITALENT,
                "train",
                "jobs/pretrain_cpu_tiny.yaml",
                "--dry-run",
                "--address",
                head.gcs_address,
                *args,
            ],
            env=head.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    for p in (proc, dry):
        assert p.returncode == 2, p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        assert "error: jobs/pretrain_cpu_tiny.yaml: the job needs 2 worker(s) x {GPU: 1}" in p.stderr
        assert "{CPU: 2, GPU: 0}" in p.stderr and "at most 0" in p.stderr
    assert seconds < 120, "the check fails at once, before any worker is asked for"
    assert "the cluster at 127.0.0.1" in dry.stdout
    assert not (tmp_path / "pretrain-cpu-tiny" / "progress.jsonl").exists()
