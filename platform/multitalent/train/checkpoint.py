"""Checkpoint folders: what each rank writes, how a folder is verified, which one a run resumes from.

Every rank saves into its own temporary folder (DeepSpeed's files for that rank, ``rank-<r>.rng.pt``
and, on rank 0, ``trainer_state.json``, ``history.npz`` and ``model.pt``), then writes
``rank-<r>.sha256.json``: the size and SHA-256 of each of its files. Ray merges the ranks' folders into
``<storage_path>/<name>/<checkpoint dir>``. A folder is *verified* when ``trainer_state.json`` parses,
the manifests of all ``world_size`` ranks are there and every file they list exists with its size and
digest. A run resumes from the newest verified folder and never from one that fails, whatever Ray
reports as its latest checkpoint.

With ``run.storage_path`` on object storage (``s3://...``) Ray uploads the merged folder to
``<storage_path>/<name>/<checkpoint dir>``; a launch lists the folders there, downloads the newest,
verifies it the same way and falls back to the next one when it fails (:func:`choose_remote_resume`):
an upload interrupted mid-way lacks a manifest or a listed object, so it is never resumed from.

Folder names are ``ckpt-it<iteration, 9 digits>-<attempt>``, ``iteration`` the next iteration to run
and ``attempt`` a random token per launch of the worker group, so a launch that falls back to an older
checkpoint never writes into the folder of a rejected one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitalent.preprocess.plan import PLAN_FILE as PLAN_FILE  # rank 0 saves the run plan here
from multitalent.shards import file_sha256

STATE_FILE = "trainer_state.json"
HISTORY_FILE = "history.npz"
WEIGHTS_FILE = "model.pt"  # rank 0's copy of the module's weights (bf16 under bf16; see MODEL_INFO_FILE)
MODEL_INFO_FILE = "model_info.json"  # rank 0: architecture, catalog, cases, validation, lineage (publish)
DEEPSPEED_TAG = "deepspeed"
RUN_ID_FILE = "mlflow_run_id"  # in the run directory: the MLflow run of this run directory
_DIR_RE = re.compile(r"^ckpt-it(\d{9})-([0-9a-z]+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; ``str`` names the folder and the reason."""


@dataclass
class TrainerState:
    """Counters and bookkeeping saved by rank 0 with each checkpoint (JSON).

    ``iteration`` is the next iteration to run (= iterations done); ``optimizer_steps`` excludes
    skipped (non-finite) iterations.
    """

    iteration: int = 0
    optimizer_steps: int = 0
    skipped_nonfinite: int = 0
    consecutive_nonfinite: int = 0
    world_size: int = 1
    seed: int = 0
    schedule: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    attempt: str = ""
    stop_reason: str | None = None  # set in the checkpoint a stopped launch leaves behind
    phase: str = ""  # the schedule phase whose optimiser wrote the checkpoint ("train", "heads", ...)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[iteration, value]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> TrainerState:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: invalid {STATE_FILE} ({e})") from None


def checkpoint_dir_name(iteration: int, attempt: str) -> str:
    return f"ckpt-it{iteration:09d}-{attempt}"


def parse_dir_name(name: str) -> int | None:
    """The iteration of a checkpoint folder name, ``None`` for other names."""
    m = _DIR_RE.match(name)
    return int(m.group(1)) if m else None


def manifest_name(rank: int) -> str:
    return f"rank-{rank}.sha256.json"


def write_rank_manifest(folder: Path, rank: int) -> Path:
    """List every file under ``folder`` (this rank's part of a checkpoint) with size and SHA-256.

    Written last and atomically: a folder whose manifest exists holds complete files.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if re.fullmatch(r"rank-\d+\.sha256\.json", rel):
            continue
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    out = folder / manifest_name(rank)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=1, sort_keys=True))
    tmp.replace(out)
    return out


def verify_checkpoint(folder: Path) -> TrainerState:
    """The checkpoint's trainer state, after checking every rank's files against its manifest.

    Raises:
        CheckpointError: missing/unreadable state or manifest, a missing file, a size or digest mismatch.
    """
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: no {STATE_FILE} (incomplete checkpoint)")
    try:
        state = TrainerState.from_json(state_path.read_text(), where=str(folder))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable {STATE_FILE} ({e})") from None
    listed: set[str] = set()
    for rank in range(state.world_size):
        mpath = folder / manifest_name(rank)
        try:
            entries = json.loads(mpath.read_text())["files"]
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: rank {rank}'s manifest {mpath.name} is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder}: unreadable manifest {mpath.name} ({e})") from None
        for rel, entry in entries.items():
            path = folder / rel
            if not path.is_file():
                raise CheckpointError(f"{folder}: {rel} (rank {rank}) is missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CheckpointError(f"{folder}: {rel} has {size} bytes, rank {rank} wrote {entry['bytes']}")
            if file_sha256(path) != entry["sha256"]:
                raise CheckpointError(f"{folder}: {rel} fails its SHA-256 check (rank {rank})")
            listed.add(rel)
    if STATE_FILE not in listed:
        raise CheckpointError(f"{folder}: {STATE_FILE} is in no rank's manifest")
    return state


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run directory, newest first (iteration, then modification time)."""
    if not run_dir.is_dir():
        return []
    found = [(it, p) for p in run_dir.iterdir() if p.is_dir() and (it := parse_dir_name(p.name)) is not None]
    found.sort(key=lambda ip: (ip[0], ip[1].stat().st_mtime), reverse=True)
    return [p for _, p in found]


@dataclass
class ResumeChoice:
    """The folder to resume from (``None``: start fresh) and the rejected newer candidates; ``source``:
    the URL the folder was downloaded from (object storage), else ``None``."""

    folder: Path | None
    state: TrainerState | None
    rejected: list[str]
    source: str | None = None


def choose_resume(candidates: Iterable[Path]) -> ResumeChoice:
    """The newest verified candidate (candidates are tried in order; duplicates are skipped)."""
    seen: set[Path] = set()
    rejected: list[str] = []
    for folder in candidates:
        folder = Path(folder).resolve()
        if folder in seen:
            continue
        seen.add(folder)
        try:
            return ResumeChoice(folder, verify_checkpoint(folder), rejected)
        except CheckpointError as e:
            rejected.append(str(e))
    return ResumeChoice(None, None, rejected)


def checkpoint_locations(run_location: str) -> list[str]:
    """Checkpoint folders of a run at a local path or a URL (``s3://bucket/runs/<name>``), newest first
    by iteration (then by name), as paths or URLs. Nothing is downloaded."""
    from multitalent import storage

    found = [(it, n) for n in storage.list_names(run_location) if (it := parse_dir_name(n)) is not None]
    found.sort(reverse=True)
    return [storage.join(run_location, n) for _, n in found]


def fetch_checkpoint(url: str, dest: Path) -> Path:
    """Download the checkpoint folder at ``url`` into ``dest/<folder name>`` (replacing what is there)
    and return that local folder. An object-store failure propagates (the launch fails; it is not a
    bad checkpoint)."""
    import shutil

    from multitalent import storage

    local = Path(dest) / storage.name_of(url)
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    fs, path = storage.filesystem(url)
    root = path.rstrip("/")
    # keys ending in "/" are folder markers some writers (pyarrow) create; they hold no data
    keys = [k for k in fs.find(root) if not k.endswith("/")]
    targets = [local / k[len(root) + 1 :] for k in keys]
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
    if keys:
        fs.get(keys, [str(t) for t in targets])
    return local


def choose_remote_resume(candidates: Iterable[str], scratch: Path) -> ResumeChoice:
    """:func:`choose_resume` for checkpoint folders in object storage: each candidate (newest first) is
    downloaded into ``scratch`` and verified there; the first that verifies is the choice, with
    ``folder`` its local copy and ``source`` its URL. A folder whose upload was interrupted (a rank's
    manifest or a listed file missing, a size or digest that differs) is rejected like a corrupt one."""
    import shutil

    rejected: list[str] = []
    for url in candidates:
        local = fetch_checkpoint(url, scratch)
        try:
            state = verify_checkpoint(local)
        except CheckpointError as e:
            rejected.append(str(e).replace(str(local), url))
            shutil.rmtree(local, ignore_errors=True)
            continue
        return ResumeChoice(local, state, rejected, source=url)
    return ResumeChoice(None, None, rejected)


def order_candidates(ray_latest: Path | None, listed: Sequence[Path]) -> list[Path]:
    """Newest first by iteration; Ray's latest goes first among equal iterations."""
    items = list(listed)
    if ray_latest is not None and ray_latest not in items:
        items.append(ray_latest)

    def key(p: Path) -> tuple[int, int]:
        it = parse_dir_name(p.name)
        return (it if it is not None else -1, 1 if p == ray_latest else 0)

    return sorted(items, key=key, reverse=True)


def save_history(folder: Path, iterations: np.ndarray, losses: np.ndarray) -> None:
    np.savez(folder / HISTORY_FILE, iteration=iterations.astype(np.int64), loss=losses.astype(np.float32))


def load_history(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(iterations int64, losses float32)``; NaN marks a skipped (non-finite) iteration."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    with np.load(path) as data:
        return data["iteration"], data["loss"]
