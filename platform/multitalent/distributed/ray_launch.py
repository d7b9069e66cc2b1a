"""Ray Train's ``TorchTrainer`` for a training job (Train V2 API)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multitalent.train.job import TrainJob


def worker_env(job: TrainJob) -> dict[str, str]:
    """Environment of the workers (set through ``RunConfig(worker_runtime_env=...)``, which also works
    inside a submitted job, whose own runtime env must not be replaced)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if not job.workers.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def scaling_config(job: TrainJob) -> Any:
    from ray.train import ScalingConfig

    w = job.workers
    resources = dict(w.resources_per_worker) if w.resources_per_worker is not None else None
    return ScalingConfig(
        num_workers=w.num_workers,
        use_gpu=w.use_gpu,
        resources_per_worker=resources,
        placement_strategy=w.placement_strategy,
    )


def run_config(job: TrainJob, storage_path: Path) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(  # type: ignore[call-arg]  # mypy sees ray.air's RunConfig; Train V2 has the field
        name=job.run.name,
        storage_path=str(storage_path),
        checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep),
        failure_config=FailureConfig(max_failures=job.workers.max_failures),
        worker_runtime_env={"env_vars": worker_env(job)},
    )


def build_trainer(
    job: TrainJob,
    *,
    storage_path: Path,
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
) -> Any:
    """A ``TorchTrainer`` running ``train_loop(loop_config)`` on every worker (gloo on CPU, NCCL on GPU).

    Re-running with the same ``run.name`` and ``run.storage_path`` resumes that run: Ray hands the
    workers its latest checkpoint and the workers also list the run directory themselves.
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if job.workers.use_gpu else "gloo"),
        scaling_config=scaling_config(job),
        run_config=run_config(job, storage_path),
    )
