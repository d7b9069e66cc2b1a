"""The driver side: :func:`run_training` (Ray Train on a local or given cluster) and :func:`dry_run`.

Both check the cluster's resources against the workers' demand first (:mod:`multitalent.train.resources`):
a demand the cluster can never meet is an error (a :class:`~multitalent.train.resources.ResourceError`),
in the dry run as in the real run; a demand it meets only later (busy) is reported as a wait.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitalent.data.batch import DrawnBatch
from multitalent.jobs import JobError, require_absolute_in_submitted_job
from multitalent.train.checkpoint import (
    RUN_ID_FILE,
    STATE_FILE,
    TrainerState,
    choose_resume,
    load_history,
    run_checkpoints,
)
from multitalent.train.job import TrainJob
from multitalent.train.progress import PROGRESS_FILE, OnProgress, ProgressTail, Record
from multitalent.train.resources import ResourceCheck, ResourceError, check, worker_demand


@dataclass
class TrainResult:
    """What a finished launch left behind.

    ``iterations``: iterations done in the run so far (over all launches); ``losses[i]`` is the mean
    loss over ranks of iteration ``loss_iterations[i]`` (NaN: skipped as non-finite); both cover
    the whole run (earlier launches included). ``checkpoint`` is the final checkpoint folder.
    ``validation``: the metrics of the last validation pass seen (``val/dice/...``), done at
    ``validation_iteration`` iterations; empty when none ran. ``run_dir`` is the run's local folder
    (:attr:`TrainJob.run_dir`); with object storage the checkpoints are under ``TrainJob.run_location``.
    """

    ray_result: Any
    run_dir: Path
    checkpoint: Path | str | None  # a URL when run.storage_path is object storage
    mlflow_run_id: str | None
    tracking_uri: str
    iterations: int
    optimizer_steps: int
    skipped_nonfinite: int
    loss_iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    validation: dict[str, float] = field(default_factory=dict)
    validation_iteration: int | None = None


def absolute_paths(job: TrainJob, base: Path | None = None) -> TrainJob:
    """The job with ``shards.path``, ``run.storage_path`` and a catalog file (``catalog:`` naming a
    file under ``base``, or such files joined by ``+``) made absolute against ``base`` (default: the
    current directory): Ray workers run in other directories. Preset names stay as they are."""
    base = (base or Path.cwd()).resolve()

    def absolute(p: str) -> str:
        if "://" in p:  # a URL (object storage) stays as it is
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    def catalog_part(p: str) -> str:
        return absolute(p) if (base / Path(p).expanduser()).is_file() else p

    catalog = job.catalog
    if (base / catalog).is_file():
        catalog = absolute(catalog)
    elif "+" in catalog:
        catalog = "+".join(catalog_part(p) for p in catalog.split("+"))
    return job.model_copy(
        update={
            "catalog": catalog,
            "shards": job.shards.model_copy(update={"path": absolute(job.shards.path)}),
            "run": job.run.model_copy(
                update={
                    "storage_path": absolute(job.run.storage_path),
                    "local_path": absolute(job.run.local_path),
                }
            ),
        }
    )


def tracking_uri(job: TrainJob) -> str:
    """The MLflow tracking URI the run logs to: ``tracking.uri``, else one sqlite store per storage path,
    ``sqlite:///<storage_path>/mlflow.db``, shared by every run of that path (its artifacts under
    ``<storage_path>/mlartifacts``), so one store holds the runs and the model registry.

    Before 2026-11-30 the default was one store per run (``<storage_path>/<name>/mlflow.db``); to keep
    logging an old run there, set ``tracking.uri: sqlite:///<storage_path>/<name>/mlflow.db``
    (README, "Where MLflow stores runs").

    With object storage (``storage_path: s3://...``) the sqlite store cannot live there: it is
    ``sqlite:///<run.local_path>/mlflow.db`` (default ``runs/mlflow.db``) on the machine of rank 0 and
    the driver; on a cluster of several machines set ``tracking.uri`` to an MLflow server instead.
    """
    return job.tracking.uri or f"sqlite:///{job.local_root / 'mlflow.db'}"


def check_locations(job: TrainJob, *, write: bool = True) -> None:
    """Before any work: a URL ``shards.path`` must be readable and a URL ``run.storage_path`` writable
    (``write``) with the credentials and endpoint of this environment (no-op for local paths).

    Raises:
        StorageError: ``"<URL>: <cause>"``: no credentials, unreachable endpoint, no such bucket, no
            permission.
    """
    from multitalent import storage

    storage.preflight(job.shards.path, write=False)
    storage.preflight(job.run.storage_path, write=write)


def _result_from_checkpoint(ray_result: Any, job: TrainJob) -> TrainResult:
    if job.remote_storage:
        return _result_from_remote_checkpoint(ray_result, job)
    run_dir = job.run_dir
    folder: Path | None = None
    if ray_result is not None and getattr(ray_result, "checkpoint", None) is not None:
        folder = Path(ray_result.checkpoint.path)
    if folder is None:
        folder = choose_resume(run_checkpoints(run_dir)).folder
    state = TrainerState()
    its: list[int] = []
    losses: list[float] = []
    if folder is not None:
        state = TrainerState.from_json((folder / STATE_FILE).read_text(), where=str(folder))
        i, lo = load_history(folder)
        its, losses = i.tolist(), lo.tolist()
    return _result(ray_result, job, folder, state, its, losses)


def _result_from_remote_checkpoint(ray_result: Any, job: TrainJob) -> TrainResult:
    """The result of a run whose checkpoints are in object storage: Ray's final checkpoint (its folder
    name under :attr:`TrainJob.run_location`), else the newest one there; read without downloading the
    weights."""
    import io

    import numpy as np

    from multitalent import storage
    from multitalent.train.checkpoint import HISTORY_FILE, checkpoint_locations

    folder: str | None = None
    if ray_result is not None and getattr(ray_result, "checkpoint", None) is not None:
        folder = storage.join(job.run_location, storage.name_of(ray_result.checkpoint.path))
    if folder is None:
        found = checkpoint_locations(job.run_location)
        folder = found[0] if found else None
    state = TrainerState()
    its: list[int] = []
    losses: list[float] = []
    if folder is not None:
        state = TrainerState.from_json(storage.read_text(storage.join(folder, STATE_FILE)), where=folder)
        history = storage.join(folder, HISTORY_FILE)
        if storage.is_file(history):
            with np.load(io.BytesIO(storage.read_bytes(history))) as data:
                its, losses = data["iteration"].tolist(), data["loss"].tolist()
    return _result(ray_result, job, folder, state, its, losses)


def _result(
    ray_result: Any,
    job: TrainJob,
    folder: Path | str | None,
    state: TrainerState,
    its: list[int],
    losses: list[float],
) -> TrainResult:
    run_dir = job.run_dir
    run_id = state.mlflow_run_id
    if run_id is None and (run_dir / RUN_ID_FILE).is_file():
        run_id = (run_dir / RUN_ID_FILE).read_text().strip() or None
    return TrainResult(
        ray_result=ray_result,
        run_dir=run_dir,
        checkpoint=folder,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri(job),
        iterations=state.iteration,
        optimizer_steps=state.optimizer_steps,
        skipped_nonfinite=state.skipped_nonfinite,
        loss_iterations=its,
        losses=losses,
        stop_reason=state.stop_reason,
    )


def resource_check(job: TrainJob, nodes: list[dict[str, float]], available: Any = None) -> ResourceCheck:
    w = job.workers
    return check(
        num_workers=w.num_workers,
        demand=worker_demand(use_gpu=w.use_gpu, resources_per_worker=w.resources_per_worker),
        strategy=w.placement_strategy,
        nodes=nodes,
        available=available,
    )


def _check_cluster(job: TrainJob, ray: Any, *, emit: OnProgress, wait: bool) -> Any:
    """Fail at once when the cluster can never run the workers (unless ``wait``: an autoscaler will add
    nodes; Ray does not tell which node types it can add); say so when they must wait. Returns a
    ``waiting()`` for :class:`ProgressTail`."""
    from multitalent.train.resources import cluster_nodes, placement_state

    nodes, available = cluster_nodes(ray)
    verdict = resource_check(job, nodes, available)
    if not verdict.possible:
        if not wait:
            raise ResourceError(verdict.problem())
        emit(
            {
                "event": "waiting",
                "message": verdict.problem().split(", so Ray")[0]
                + "; waiting for nodes to be added (--wait-for-resources)",
            }
        )
    elif not verdict.free_now:
        emit({"event": "waiting", "message": verdict.waiting()})

    def waiting() -> str | None:
        try:
            now = resource_check(job, *cluster_nodes(ray))
            state = placement_state(ray, num_workers=now.num_workers, demand=now.demand)
        except Exception:  # the cluster is going away; the launch reports it
            return None
        if state == "PENDING" or (state is None and not now.free_now):
            return now.waiting()
        n = job.workers.num_workers
        return f"the {n} worker(s) are starting (resources reserved; loading data and model)"

    return waiting


def run_training(
    job: TrainJob,
    *,
    address: str | None = None,
    on_progress: OnProgress | None = None,
    wait_for_resources: bool = False,
) -> TrainResult:
    """Train ``job`` with Ray Train: on the cluster at ``address``, the cluster of a submitted job
    (``RAY_ADDRESS``), or a local Ray started (and stopped) here.

    Relaunching a job with the same ``run.name``/``run.storage_path`` resumes it from its newest
    verified checkpoint, in the same MLflow run. ``on_progress`` receives the progress records
    (:mod:`multitalent.train.progress`) while the workers train; ``wait_for_resources``: wait, instead
    of failing, when the cluster lacks the resources (nodes will be added).

    Raises:
        ResourceError: the cluster can never run the workers (no GPUs, too few CPUs or nodes).
        JobError: a relative path inside a submitted Ray job, or a checkpoint to resume from that was
            written under another schedule.
        CredentialsRefused: the HTTP tracking server refuses this process's MLflow credentials.
        NonFiniteLossError: the loss was non-finite more than ``nonfinite.max_consecutive`` times in
            a row (the result so far stays in the run directory).
        RuntimeError: the training failed more often than ``workers.max_failures`` allows.
    """
    from multitalent.distributed.ray_launch import build_trainer
    from multitalent.raycluster import ray_session
    from multitalent.train.components import deepspeed_config, load_data_setup, worker_group
    from multitalent.train.loop import NonFiniteLossError, train_loop_per_worker

    require_absolute_in_submitted_job(
        {"shards.path": job.shards.path, "run.storage_path": job.run.storage_path}, where="train job"
    )
    check_locations(job)  # object storage: credentials, endpoint, buckets, write permission
    job = absolute_paths(job)
    deepspeed_config(job)  # configuration errors surface before any worker starts
    load_data_setup(job)
    if job.tracking.enabled:  # a server refusing the credentials would lose the run's tracking
        from multitalent.tracking.credentials import check_credentials

        check_credentials(tracking_uri(job))
    newest = newest_checkpoint_state(job)  # a resume under another schedule fails here, not in the workers
    if newest is not None:
        check_resume_schedule(job, *newest)
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    loop_config = {"job": job.model_dump(mode="python"), "run_dir": str(run_dir)}
    last_validation: list[Record] = []

    def on_record(record: Record) -> None:
        if record.get("validation"):
            last_validation[:] = [record]
        if on_progress is not None:
            on_progress(record)

    with ray_session(address=address) as ray:
        waiting = _check_cluster(job, ray, emit=on_record, wait=wait_for_resources)
        trainer = build_trainer(
            worker_group(job),
            storage_path=job.run.storage_path,
            train_loop=train_loop_per_worker,
            loop_config=loop_config,
        )
        with ProgressTail(run_dir / PROGRESS_FILE, on_record, waiting=waiting):
            ray_result = trainer.fit()
    if getattr(ray_result, "error", None) is not None:
        raise RuntimeError(f"training of {run_dir} failed: {ray_result.error}") from ray_result.error
    result = _result_from_checkpoint(ray_result, job)
    if last_validation:
        result.validation = dict(last_validation[0]["validation"])
        result.validation_iteration = int(last_validation[0]["iteration"])
    else:  # resumed after the last pass: the final checkpoint's report carries it, if any
        metrics = dict(getattr(ray_result, "metrics", None) or {})
        result.validation = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        result.validation_iteration = int(metrics["iteration"]) if result.validation else None
    if result.stop_reason:
        raise NonFiniteLossError(f"{run_dir}: training stopped: {result.stop_reason}")
    return result


def newest_checkpoint_state(job: TrainJob) -> tuple[str, TrainerState] | None:
    """``(location, state)`` of the run's newest checkpoint folder with a readable state file, local or in
    object storage (one small read; the workers verify the checkpoint they resume from), or None."""
    from multitalent import storage
    from multitalent.train.checkpoint import checkpoint_locations

    for location in checkpoint_locations(job.run_location):
        try:
            text = storage.read_text(storage.join(location, STATE_FILE))
            return location, TrainerState.from_json(text, where=location)
        except Exception:  # missing or partial: not the one the workers resume from either
            continue
    return None


def check_resume_schedule(job: TrainJob, location: str, state: TrainerState) -> None:
    """Raise :class:`JobError` (naming the checkpoint and both schedules) when the checkpoint at
    ``location`` that a relaunch would resume from was written under another schedule than ``job``'s:
    the workers would refuse it, and Ray would report that as a failed worker group (after retrying)."""
    if not state.schedule:
        return
    from multitalent.train.components import build_schedule

    try:
        build_schedule(job).check_state(state.schedule, where=location)
    except ValueError as e:
        raise JobError(str(e)) from None


# ---------------------------------------------------------------------------------------------- dry run
@dataclass
class DryRunReport:
    """Everything a launch would build, described. ``errors``: what would stop the real run (missing
    shards, a cluster that can never run the workers), so the dry run fails on them too; ``warnings``:
    what the real run only warns about (a bad checkpoint it skips, workers that must wait)."""

    lines: list[str]
    warnings: list[str]
    deepspeed_config: dict[str, Any]
    batch_shape: tuple[int, ...] | None  # the network's input (B, C, *patch), after any augmentation
    errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines + [f"WARNING: {w}" for w in self.warnings])


def dry_run(job: TrainJob, *, cluster: list[dict[str, float]] | None = None) -> DryRunReport:
    """Build every component of the job as rank 0 of a worker would, and take no step.

    The same :func:`~multitalent.train.components.assemble` as the workers: DeepSpeed config, catalog,
    plan and splits, network, objective, optimizer and schedule, the job's data source (Zarr or
    WebDataset) and one batch of it; then Ray's scaling/run configuration, the tracking and resume
    state. Missing shards are an error in ``errors`` (everything that does not need them is still
    built). ``cluster``: the nodes' total resources to check the workers against (see
    :func:`cluster_for_dry_run`); ``None`` checks nothing.

    Raises:
        DeepSpeedConfigError, ValueError: an inconsistent job (a derived key set twice, a patch the
            network cannot take, shards of another catalog).
    """
    from multitalent.distributed.ray_launch import run_config, scaling_config
    from multitalent.train.components import assemble, worker_group

    check_locations(job, write=False)
    job = absolute_paths(job)
    lines: list[str] = []
    warnings: list[str] = []
    parts = assemble(job, rank=0, require_data=False)
    w = job.workers
    lines.append(
        f"workers: {w.num_workers} x {'GPU' if w.use_gpu else 'CPU'} {w.resources_per_worker or ''} "
        f"{w.placement_strategy}; global batch {job.batch.global_size} = "
        f"{w.num_workers} x {job.micro_batch}; "
        f"ZeRO {job.zero_stage}; {parts.precision}"
    )
    lines.append(f"deepspeed: {json.dumps(parts.deepspeed_config, sort_keys=True)}")
    group = worker_group(job)
    scaling_config(group)
    run_config(group, job.run.storage_path)
    catalog = parts.catalog
    lines.append(f"catalog: {catalog.name} ({len(catalog.datasets)} datasets, {catalog.num_classes} classes)")
    batch_shape: tuple[int, ...] | None = None
    augment = parts.augment
    setup = parts.setup
    errors: list[str] = []
    if cluster is not None:
        verdict = resource_check(job, cluster)
        lines.append(f"cluster: {_describe_nodes(cluster)}; can run {verdict.capacity} such worker(s)")
        if not verdict.possible:
            errors.append(verdict.problem())
    if setup is None:
        errors.append(f"data: {parts.data_error}")
    else:
        lines.append(
            f"data: {setup.root} ({job.shards.source}); {len(setup.train_cases)} training / "
            f"{len(setup.val_cases)} validation cases (fold {job.validation.fold}); "
            f"spacing {parts.spacing_zyx_mm} mm"
        )
        _, batch = next(iter(parts.batches(0, 1, loader_workers=0)))
        drawn = isinstance(batch, DrawnBatch)  # augmented in the step: groups read enlarged / at the patch
        groups = {"enlarged": batch.wide, "at the patch": batch.narrow} if drawn else {"": batch}
        shapes = {k: tuple(g.image_bczyx.shape) for k, g in groups.items() if g is not None}
        image = "; ".join(f"{shape} {k}".rstrip() for k, shape in shapes.items())
        channels = next(iter(shapes.values()))[1]
        batch_shape = (len(batch), channels, *augment.patch_zyx)  # what the network receives
        lines.append(
            f"batch (rank 0, iteration 0): image {image}, read {augment.read_zyx}, "
            f"keys {batch.keys}, from {job.shards.source}"
        )
    n_params = sum(p.numel() for p in parts.model.parameters())
    s = job.schedule
    lines.append(
        f"model: {job.architecture.arch} ({job.architecture.size}), {n_params:,} parameters, "
        f"{parts.output_levels} output level(s), patch {job.architecture.patch_zyx}; "
        f"output {job.architecture.output}; loss {type(parts.objective.loss).__name__}"
        f"({type(getattr(parts.objective.loss, 'loss', None)).__name__})"
    )
    if parts.init is not None:  # fine-tuning / adding datasets: the package and the head layout
        from multitalent.train.components import describe_init

        lines += describe_init(parts)
        warnings += [f"init: {parts.init.error}"] if parts.init.error else []
    lines.append(
        f"optimiser: {type(parts.optimizer).__name__} lr {job.optimiser.lr} -> poly {s.poly_exponent}; "
        f"{s.epochs} epochs x {s.iterations_per_epoch} iterations; lr at the last epoch "
        f"{parts.schedule.lr_at(s.total_iterations - 1):.3g}"
    )
    lines.append(
        f"augmentation: {'off' if augment.config is None else ('loader' if augment.in_loader else 'device')}"
    )
    lines.append(
        f"tracking: {tracking_uri(job) if job.tracking.enabled else 'off'}, "
        f"experiment {job.tracking.experiment!r}"
    )
    if job.remote_storage:
        from multitalent.train.checkpoint import checkpoint_locations

        found = checkpoint_locations(job.run_location)
        where = (
            f"resume from the newest of {len(found)} checkpoint folder(s) that verifies, checked when the "
            f"workers start (newest {found[0].rsplit('/', 1)[-1]})"
            if found
            else "fresh start"
        )
        lines.append(
            f"run: {job.run_location} ({where}; keep {job.checkpoint.keep}, every "
            f"{job.checkpoint.every_iterations}); local files in {job.run_dir}"
        )
    else:
        resume = choose_resume(run_checkpoints(job.run_dir))
        where = f"resume from {resume.folder.name}" if resume.folder is not None else "fresh start"
        keep, every = job.checkpoint.keep, job.checkpoint.every_iterations
        lines.append(f"run: {job.run_dir} ({where}; keep {keep}, every {every})")
        warnings += [f"bad checkpoint: {r}" for r in resume.rejected]
    newest = newest_checkpoint_state(job)  # the state the launch checks, read the way the launch reads it
    if newest is not None:
        try:
            check_resume_schedule(job, *newest)
        except JobError as e:
            errors.append(str(e))
    return DryRunReport(lines, warnings, parts.deepspeed_config, batch_shape, errors)


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    from multitalent.train.resources import describe

    return f"{len(nodes)} node(s): " + ", ".join(describe(n) for n in nodes)


def cluster_for_dry_run(address: str | None) -> tuple[list[dict[str, float]], str]:
    """The nodes a real run of the same command would use: the cluster at ``address`` (or of a
    submitted job), else this machine (what a local Ray would start with). Also says which."""
    from multitalent.train.resources import cluster_nodes, local_machine

    if not (address or os.environ.get("RAY_ADDRESS")):
        return local_machine(), "this machine (local Ray)"
    from multitalent.raycluster import ray_session

    with ray_session(address=address) as ray:
        nodes, _ = cluster_nodes(ray)
    return nodes, f"the cluster at {address or os.environ.get('RAY_ADDRESS')}"
