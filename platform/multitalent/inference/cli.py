"""``multitalent predict``: scans in, label maps in the scans' geometry out.

``--model`` is a training run folder (``run.storage_path/run.name``): its newest *verified* checkpoint
(:func:`multitalent.train.checkpoint.choose_resume`, the rule training resumes by) gives ``model.pt``;
the run's MLflow artifacts (``model.json``, ``plan.json``, ``label_space.json``, which the training run
logs at its start under ``<run>/mlartifacts/<run id>/artifacts``) say how to rebuild the network, how
to preprocess and what the channels mean. A checkpoint folder itself is accepted too. Model packages
(``models:/...``) go through ``multitalent.registry`` once that package exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from multitalent.jobs import JobError
from multitalent.preprocess.plan import PLAN_FILE

ARTIFACT_FILES = ("model.json", PLAN_FILE, "label_space.json")


class ModelNotFound(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ the model
def _artifact_dirs(run_dir: Path, run_id: str | None) -> list[Path]:
    """Where a run's artifacts may lie, most specific first."""
    dirs = [run_dir]
    root = run_dir / "mlartifacts"
    if run_id:
        dirs.append(root / run_id / "artifacts")
    if root.is_dir():
        # <experiment artifact location>/<run id>/artifacts, newest first
        found = sorted(root.glob("*/artifacts"), key=lambda p: p.stat().st_mtime, reverse=True)
        dirs += [d for d in found if d not in dirs]
    return dirs


def resolve_run(path: Path) -> Any:
    """:class:`~multitalent.inference.model.ModelFiles` of a training run folder (or one checkpoint)."""
    from multitalent.catalog import Catalog
    from multitalent.inference.model import ModelFiles, file_sha256, network_arguments, read_json
    from multitalent.preprocess import Plan
    from multitalent.train.checkpoint import (
        MODEL_INFO_FILE,
        RUN_ID_FILE,
        WEIGHTS_FILE,
        choose_resume,
        parse_dir_name,
        run_checkpoints,
    )

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such model folder")
    if parse_dir_name(path.name) is not None:
        run_dir, candidates = path.parent, [path]
    else:
        run_dir, candidates = path, run_checkpoints(path)
    if not candidates:
        raise ModelNotFound(f"{path}: no checkpoint folders (ckpt-it*) - is this a training run folder?")
    choice = choose_resume(candidates)
    if choice.folder is None or choice.state is None:
        raise ModelNotFound(f"{path}: no verified checkpoint; rejected: " + "; ".join(choice.rejected))
    weights = choice.folder / WEIGHTS_FILE
    run_id = choice.state.mlflow_run_id
    if run_id is None and (run_dir / RUN_ID_FILE).is_file():
        run_id = (run_dir / RUN_ID_FILE).read_text().strip() or None
    sha = file_sha256(weights)
    source = {
        "id": f"sha256:{sha[:16]}",
        "kind": "training run",
        "run_dir": str(run_dir),
        "checkpoint": choice.folder.name,
        "iteration": choice.state.iteration,
        "mlflow_run_id": run_id,
        "weights_sha256": sha,
        "rejected_checkpoints": choice.rejected,
    }
    info_file, plan_file = choice.folder / MODEL_INFO_FILE, choice.folder / PLAN_FILE
    if info_file.is_file() and plan_file.is_file():
        # Checkpoints carry the network's arguments, the label space and the plan themselves: no
        # MLflow store needed (wherever it lives, or with tracking off).
        info = read_json(info_file, "the checkpoint's model description")
        training_only = ("deep_supervision", "gradient_checkpointing")
        return ModelFiles(
            weights=weights,
            network={k: v for k, v in info["architecture"].items() if k not in training_only},
            plan=Plan.load(plan_file),
            catalog=Catalog.from_dict(info["catalog"]),
            source={**source, "laterality": info.get("training", {}).get("laterality", "naive")},
        )
    # Checkpoints written before they carried model_info.json: the run's MLflow artifacts.
    art = next(
        (d for d in _artifact_dirs(run_dir, run_id) if all((d / f).is_file() for f in ARTIFACT_FILES)), None
    )
    if art is None:
        raise ModelNotFound(
            f"{run_dir}: none of {', '.join(str(d) for d in _artifact_dirs(run_dir, run_id))} holds "
            f"{', '.join(ARTIFACT_FILES)} (logged by a training run with tracking enabled)"
        )
    return ModelFiles(
        weights=weights,
        network=network_arguments(read_json(art / "model.json", "the network description")),
        plan=Plan.load(art / PLAN_FILE),
        catalog=Catalog.from_dict(read_json(art / "label_space.json", "the label space")),
        source=source,
    )


def resolve_package(spec: str) -> Any:
    """:class:`~multitalent.inference.model.ModelFiles` of a model package folder or a ``models:/`` URI.

    Registry URIs resolve against ``MLFLOW_TRACKING_URI``, else the default store of the jobs' storage
    path, ``sqlite:///runs/mlflow.db`` (relative to the current directory).
    """
    import os

    from multitalent.inference.model import ModelFiles
    from multitalent.registry import PackageError, RegistryError, load_package

    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/mlflow.db').resolve()}"
    try:
        package = load_package(spec, tracking_uri=tracking)
    except (PackageError, RegistryError) as e:
        raise ModelNotFound(str(e)) from None
    build = package.architecture["build"]
    training_only = ("deep_supervision", "gradient_checkpointing")
    return ModelFiles(
        weights=package.folder / "weights.safetensors",
        network={k: v for k, v in build.items() if k not in training_only},
        plan=package.plan,
        catalog=package.catalog,
        source={
            "id": f"package:{package.digest[:16]}",
            "kind": "model package",
            "uri": spec,
            "resolved": package.source,
            "version": package.version,
            "manifest_digest": package.digest,
            "laterality": package.architecture.get("laterality", "naive"),
        },
    )


def resolve_model(spec: str) -> Any:
    """A training run folder, one checkpoint folder, a model package folder, or a ``models:/`` URI."""
    if spec.startswith("models:/") or (Path(spec) / "manifest.json").is_file():
        return resolve_package(spec)
    return resolve_run(Path(spec))


# -------------------------------------------------------------------------------------- command
def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """Job fields given as flags (taken as typed, never parsed as YAML: ``-o 001`` stays a string)."""
    top: dict[str, Any] = {}
    for key in ("input", "out", "model", "datasets", "classes"):
        if getattr(args, key, None):
            top[key] = getattr(args, key)
    if args.masks:
        top["masks"] = True
    if args.overwrite:
        top["overwrite"] = True
    inference: dict[str, Any] = {}
    if args.no_mirror:
        inference["mirror_axes"] = []
    if args.step is not None:
        inference["step"] = float(args.step)
    if args.device:
        inference["device"] = args.device
    if args.batch_size is not None:
        inference["batch_size"] = int(args.batch_size)
    if inference:
        top["inference"] = inference
    return top


def load_command_job(args: argparse.Namespace) -> Any:
    """The job of ``--job FILE`` (with ``--set``), or of the flags alone; flags win."""
    from pydantic import ValidationError

    from multitalent.inference.job import PredictJob, load_predict_job

    flags = _flag_values(args)
    if args.job:
        data = load_predict_job(args.job, args.overrides).model_dump()
    else:
        missing = [f for f, k in (("-i", "input"), ("-o", "out"), ("--model", "model")) if k not in flags]
        if missing:
            raise JobError(f"{', '.join(missing)} required (or --job FILE)")
        data = {}
    for key, value in flags.items():
        data[key] = {**data.get(key, {}), **value} if key == "inference" else value
    try:
        return PredictJob.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise JobError("invalid arguments\n" + "\n".join(lines)) from None


def run(args: argparse.Namespace) -> int:
    from multitalent.inference.cohort import (
        CohortRequest,
        OutputConflict,
        RaySlots,
        predict_local,
        predict_ray,
    )
    from multitalent.inference.model import ModelError
    from multitalent.inference.predictor import PredictSettings
    from multitalent.rawio.naming import find_scans, nifti_stem

    try:
        job = load_command_job(args)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = Path(job.input)
    if source.is_dir():
        inputs = find_scans(source)
        if not inputs:
            print(f"error: {source}: no NIfTI scans (.nii.gz, .nii) in this folder", file=sys.stderr)
            return 2
    elif source.is_file() and nifti_stem(source) is not None:
        inputs = [source]
    else:
        print(f"error: {source}: not a NIfTI file (.nii.gz, .nii) or a folder of them", file=sys.stderr)
        return 2
    try:
        model = resolve_model(job.model)
    except (ModelNotFound, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    i = job.inference
    request = CohortRequest(
        inputs=inputs,
        out=Path(job.out),
        model=model,
        settings=PredictSettings(
            step=i.step,
            mirror_axes=tuple(i.mirror_axes),
            batch_size=i.batch_size,
            device=i.device,
            precision=i.precision,
        ),
        datasets=job.datasets,
        classes=job.classes,
        masks=job.masks,
        overwrite=job.overwrite,
    )
    try:
        keys = request.class_keys()
        where = model.source.get("checkpoint") or model.source.get("resolved", "")
        print(
            f"model {model.model_id} ({model.source.get('kind', '?')} {where}); "
            f"{len(inputs)} scan(s); {len(keys)} classes of {len({k.split(':')[0] for k in keys})} dataset(s)"
        )
        if job.ray.enabled:
            from multitalent.raycluster import ray_session

            r = job.ray
            with ray_session(address=r.address, num_cpus=r.num_cpus) as ray:
                summary = predict_ray(request, ray, RaySlots(r.num_workers, r.use_gpu, r.cpus_per_worker))
        else:
            summary = predict_local(request)
    except (OutputConflict, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{len(summary.done) - len(summary.skipped)} predicted, {len(summary.skipped)} already done, "
        f"{len(summary.failures)} failed in {summary.seconds:.1f} s; see {summary.out / 'predictions.json'}"
    )
    for f in summary.failures:
        print(f"FAILED {f['case']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    return 1 if summary.failures else 0
