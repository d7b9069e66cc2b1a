"""Ray Train's ``TorchTrainer`` from plain settings (Train V2 API)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WorkerGroup:
    """The Ray Train worker group and run: one worker per GPU (or CPU slot)."""

    run_name: str
    num_workers: int
    use_gpu: bool
    resources_per_worker: Mapping[str, float] | None = None
    placement_strategy: str = "PACK"
    max_failures: int = 3  # worker-group restarts; -1 = unlimited
    keep_checkpoints: int = 3


def worker_env(group: WorkerGroup) -> dict[str, str]:
    """Environment of the workers (set through ``RunConfig(worker_runtime_env=...)``, which also works
    inside a submitted job, whose own runtime env must not be replaced)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if not group.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def scaling_config(group: WorkerGroup) -> Any:
    from ray.train import ScalingConfig

    resources = dict(group.resources_per_worker) if group.resources_per_worker is not None else None
    return ScalingConfig(
        num_workers=group.num_workers,
        use_gpu=group.use_gpu,
        resources_per_worker=resources,
        placement_strategy=group.placement_strategy,
    )


def run_config(group: WorkerGroup, storage_path: str | Path) -> Any:
    """Ray's run configuration; ``storage_path`` is a shared folder or a URL (``s3://bucket/runs``), which
    Ray opens with pyarrow's file system (``AWS_ENDPOINT_URL`` and the usual credentials apply)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(  # type: ignore[call-arg]  # mypy sees ray.air's RunConfig; Train V2 has the field
        name=group.run_name,
        storage_path=str(storage_path),
        checkpoint_config=CheckpointConfig(num_to_keep=group.keep_checkpoints),
        failure_config=FailureConfig(max_failures=group.max_failures),
        worker_runtime_env={"env_vars": worker_env(group)},
    )


def build_trainer(
    group: WorkerGroup,
    *,
    storage_path: str | Path,
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
) -> Any:
    """A ``TorchTrainer`` running ``train_loop(loop_config)`` on every worker (gloo on CPU, NCCL on GPU).

    Re-running with the same ``run_name`` and ``storage_path`` resumes that run: Ray hands the workers
    its latest checkpoint and the workers also list the run directory themselves.
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if group.use_gpu else "gloo"),
        scaling_config=scaling_config(group),
        run_config=run_config(group, storage_path),
    )
