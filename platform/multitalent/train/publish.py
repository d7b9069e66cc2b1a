"""A model package from a training run's checkpoint, and publishing it to the run's MLflow store.

The weights are DeepSpeed's fp32 master weights, reconstructed from the checkpoint's ZeRO optimizer
files with ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (every ZeRO stage,
fp32 or bf16). ``model.pt`` is not used: under bf16 it holds the bf16 module weights. The checkpoint is
verified (its rank manifests) before anything in it is read; its own files are trusted (they are this
platform's, written by the trainer), so DeepSpeed may unpickle them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.registry.package import ModelCard, PackageError, write_package

if TYPE_CHECKING:
    import torch

    from multitalent.registry.store import Published


@dataclass(frozen=True)
class RunCheckpoint:
    """A verified checkpoint folder of a run and what the trainer recorded in it."""

    folder: Path
    iteration: int
    mlflow_run_id: str | None
    info: dict[str, Any]


def find_checkpoint(
    run_dir: str | Path, checkpoint: str | Path | None = None, *, scratch: Path | None = None
) -> RunCheckpoint:
    """The newest verified checkpoint of ``run_dir`` (or ``checkpoint``, which must verify).

    ``run_dir`` may be a run on object storage (``s3://bucket/runs/<name>``): its newest verified
    checkpoint is then downloaded into ``scratch`` (required), as a resumed launch would choose it.

    Raises:
        FileNotFoundError: no verified checkpoint (the rejected ones are listed).
        PackageError: a checkpoint written before checkpoints carried ``model_info.json``.
    """
    from multitalent import storage
    from multitalent.train.checkpoint import (
        MODEL_INFO_FILE,
        RUN_ID_FILE,
        CheckpointError,
        checkpoint_locations,
        choose_remote_resume,
        choose_resume,
        run_checkpoints,
        verify_checkpoint,
    )

    remote = checkpoint is None and storage.is_url(run_dir)
    if remote:
        if scratch is None:
            raise ValueError(f"{run_dir}: a run on object storage needs a scratch folder to download into")
        choice = choose_remote_resume(checkpoint_locations(str(run_dir)), scratch)
        if choice.folder is None or choice.state is None:
            why = "; ".join(choice.rejected) or "none found"
            raise FileNotFoundError(f"{run_dir}: no verified checkpoint ({why})")
        folder, state = choice.folder, choice.state
    elif checkpoint is not None:
        folder = Path(checkpoint)
        try:
            state = verify_checkpoint(folder)
        except CheckpointError as e:
            raise FileNotFoundError(f"not a verified checkpoint: {e}") from None
    else:
        choice = choose_resume(run_checkpoints(Path(run_dir)))
        if choice.folder is None or choice.state is None:
            why = "; ".join(choice.rejected) or "none found"
            raise FileNotFoundError(f"{run_dir}: no verified checkpoint ({why})")
        folder, state = choice.folder, choice.state
    path = folder / MODEL_INFO_FILE
    if not path.is_file():
        raise PackageError(f"{path}: missing; the checkpoint predates publishable checkpoints (train again)")
    run_id = state.mlflow_run_id
    if run_id is None and not remote and (Path(run_dir) / RUN_ID_FILE).is_file():
        run_id = (Path(run_dir) / RUN_ID_FILE).read_text().strip() or None
    return RunCheckpoint(folder, state.iteration, run_id, json.loads(path.read_text()))


def fp32_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint folder (DeepSpeed's consolidated ZeRO state)."""
    import contextlib
    import io
    import os
    import sys

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from multitalent.train.checkpoint import DEEPSPEED_TAG

    # It prints a line per parameter group and a progress bar per shard: kept out of the output unless it
    # fails, when what it printed to stderr helps.
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    except Exception:
        sys.stderr.write(err.getvalue())
        raise
    return {k: v.float() for k, v in state.items()}


def package_from_checkpoint(ckpt: RunCheckpoint, out: str | Path) -> Path:
    """Write the package of a verified checkpoint into the new folder ``out``."""
    from multitalent.catalog import Catalog
    from multitalent.models import build_network
    from multitalent.preprocess.plan import Plan
    from multitalent.train.checkpoint import PLAN_FILE

    info = ckpt.info
    b = dict(info["architecture"])
    model = build_network(b.pop("arch"), b.pop("heads"), **b)
    card = ModelCard(
        cases=info.get("cases", {}),
        validation=info.get("validation", {}),
        training={
            **{f"optimiser.{k}": v for k, v in info["training"].get("optimiser", {}).items()},
            **{k: v for k, v in info["training"].items() if k != "optimiser"},
            "checkpoint": ckpt.folder.name,
        },
        run_id=ckpt.mlflow_run_id,
        git_commit=info.get("git_commit"),
        parent=info.get("parent"),
        date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
    )
    return write_package(
        out,
        model=model,
        state_dict=fp32_weights(ckpt.folder),
        plan=Plan.load(ckpt.folder / PLAN_FILE),
        catalog=Catalog.from_dict(info["catalog"]),
        card=card,
        laterality=str(info["training"].get("laterality", "naive")),
    )


def publish_run(
    run_dir: str | Path,
    *,
    name: str,
    alias: str | None = None,
    checkpoint: str | Path | None = None,
    tracking_uri: str | None = None,
    workdir: str | Path | None = None,
) -> Published:
    """Package the newest verified checkpoint of ``run_dir`` and publish it into the run's MLflow run.

    ``run_dir``: a run folder, or a run on object storage (``<storage_path>/<name>``, e.g.
    ``s3://bucket/runs/pretrain``). ``tracking_uri`` defaults to the store the run logged to (recorded
    in the checkpoint).

    Raises:
        FileNotFoundError, PackageError, RegistryError
    """
    import tempfile

    from multitalent.registry.store import RegistryError, publish_package

    with tempfile.TemporaryDirectory(prefix="multitalent-publish-", dir=workdir) as tmp:
        ckpt = find_checkpoint(run_dir, checkpoint, scratch=Path(tmp) / "checkpoint")
        uri = tracking_uri or ckpt.info.get("tracking_uri")
        if not uri:
            raise RegistryError(f"{run_dir}: no tracking URI recorded; pass --tracking-uri")
        if ckpt.mlflow_run_id is None:
            raise RegistryError(
                f"{run_dir}: the run has no MLflow run id (tracking was off); cannot publish into it"
            )
        folder = package_from_checkpoint(ckpt, Path(tmp) / "package")
        return publish_package(
            folder,
            name=name,
            run_id=ckpt.mlflow_run_id,
            tracking_uri=uri,
            alias=alias,
            parent=ckpt.info.get("parent"),
            description=f"{ckpt.info.get('run_name', '')} {ckpt.folder.name}",
        )
