"""Training: Ray Train orchestrating one DeepSpeed engine per worker, MLflow tracking on rank 0,
verified checkpoints that resume exactly.

Command line::

    multitalent train jobs/pretrain_cpu_tiny.yaml [--set key=value ...] [--address ADDR] [--dry-run]
    ray job submit --working-dir . -- multitalent train jobs/pretrain.yaml --set run.storage_path=/shared/runs

Python::

    from multitalent.train import load_train_job, run_training, dry_run
    job = load_train_job("jobs/pretrain_cpu_tiny.yaml", ["run.storage_path=/tmp/runs"])
    result = run_training(job, address=None)   # -> TrainResult
    report = dry_run(job)                      # -> DryRunReport (builds everything, no step, no Ray)

Public API (lazily imported from this package):

- ``TrainJob`` / ``load_train_job(path, overrides=())`` (:mod:`.job`): the strict job model.
- ``run_training(job, *, address=None) -> TrainResult`` (:mod:`.launch`): local Ray when no address
  (inside ``ray job submit``: the job's cluster). ``TrainResult`` fields: ``ray_result`` (Ray's
  ``Result``), ``run_dir`` (``storage_path/name``), ``checkpoint`` (final checkpoint folder),
  ``mlflow_run_id``, ``tracking_uri``, ``iterations`` (done in the run, all launches), ``optimizer_steps``,
  ``skipped_nonfinite``, ``loss_iterations``/``losses`` (mean loss over ranks per iteration, NaN when
  skipped), ``stop_reason``. Raises ``NonFiniteLossError`` (:mod:`.loop`) after too many consecutive
  non-finite losses.
- ``dry_run(job) -> DryRunReport`` (:mod:`.launch`).
- Checkpoint folders (:mod:`.checkpoint`): ``<storage_path>/<name>/ckpt-it<iteration:09d>-<attempt>/``
  with DeepSpeed's files under ``deepspeed/``, ``model.pt`` (full state dict, rank 0),
  ``trainer_state.json``, ``history.npz``, ``rank-<r>.rng.pt`` and ``rank-<r>.sha256.json`` manifests;
  ``verify_checkpoint(folder)``, ``run_checkpoints(run_dir)``, ``choose_resume(candidates)``.
- The MLflow store defaults to ``sqlite:///<storage_path>/mlflow.db`` (artifacts in
  ``<storage_path>/mlartifacts``); ``<run_dir>/mlflow_run_id`` names the run, so every launch and restart
  of a run directory logs to one MLflow run.
- Object storage (``run.storage_path: s3://bucket/prefix``): Ray uploads the checkpoint folders to
  ``<storage_path>/<name>/`` (``TrainJob.run_location``); a launch downloads the newest that verifies
  (``checkpoint_locations``, ``choose_remote_resume``). What cannot live there (``progress.jsonl``,
  ``mlflow_run_id``, the default sqlite store) goes to ``run.local_path`` (``TrainJob.run_dir`` is then
  ``<local_path>/<name>``, ``TrainResult.checkpoint`` a URL).

Modules: ``job``, ``launch`` (driver), ``loop`` (worker: ``train_loop_per_worker``, ``Trainer``),
``callbacks`` (tracking, validation, checkpoint cadence), ``batches`` (per-iteration reproducible data),
``validation``, ``checkpoint``, ``schedule`` (poly LR, optimizer), ``step`` (the objective), ``cli``.
DeepSpeed and Ray specifics live in :mod:`multitalent.distributed`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainJob": "multitalent.train.job",
    "load_train_job": "multitalent.train.job",
    "run_training": "multitalent.train.launch",
    "TrainResult": "multitalent.train.launch",
    "dry_run": "multitalent.train.launch",
    "DryRunReport": "multitalent.train.launch",
    "NonFiniteLossError": "multitalent.train.loop",
    "verify_checkpoint": "multitalent.train.checkpoint",
    "run_checkpoints": "multitalent.train.checkpoint",
    "choose_resume": "multitalent.train.checkpoint",
    "CheckpointError": "multitalent.train.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multitalent.train' has no attribute {name!r}")
