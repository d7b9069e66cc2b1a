"""Predicting a cohort: in this process, or on Ray with one actor per GPU/CPU slot.

Layout of the output folder ``OUT``:

* ``OUT/<case>/<dataset>.nii.gz``: label map per requested dataset (raw numbering);
* ``OUT/<case>/<dataset>/<class>.nii.gz``: binary masks (with ``masks``);
* ``OUT/<case>/prediction.json``: the case's record, written last: a case is finished when it is
  there and names the same model and class selection, so a rerun skips it;
* ``OUT/predictions.json``: the model, the settings, every finished case and every failure.

A failing case (unreadable file, bad geometry) is recorded with its reason and the others complete.
An ``OUT`` holding predictions of another model is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multitalent.inference.model import ModelFiles, load_model
from multitalent.inference.predictor import Predictor, PredictSettings, select_classes
from multitalent.rawio.naming import case_name

PREDICTIONS_FILE = "predictions.json"
CASE_FILE = "prediction.json"


class OutputConflict(RuntimeError):
    """``OUT`` holds predictions of another model (or another class selection)."""


@dataclass(frozen=True)
class CohortRequest:
    """What to predict, with which model, where to."""

    inputs: Sequence[Path]
    out: Path
    model: ModelFiles
    settings: PredictSettings = field(default_factory=PredictSettings)
    datasets: Sequence[str] | None = None
    classes: Sequence[str] | None = None
    masks: bool = False
    overwrite: bool = False

    def class_keys(self) -> list[str]:
        return [
            c.key for c in select_classes(self.model.catalog, datasets=self.datasets, classes=self.classes)
        ]

    def stamp(self) -> dict[str, Any]:
        """What a finished case must match to be skipped on a rerun."""
        return {"model": self.model.model_id, "classes": self.class_keys(), "masks": self.masks}


@dataclass
class CohortSummary:
    out: Path
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # case -> record
    skipped: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def named_cases(inputs: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(case name, path)``; two inputs with one name are an error (their outputs would collide)."""
    seen: dict[str, Path] = {}
    for p in inputs:
        name = case_name(p)
        if name in seen:
            raise ValueError(
                f"{p} and {seen[name]} both name case {name!r}; predict them into separate folders"
            )
        seen[name] = Path(p)
    return list(seen.items())


def check_output(request: CohortRequest) -> None:
    """Refuse an ``OUT`` with predictions of another model unless ``overwrite``."""
    if request.overwrite or not request.out.exists():
        return
    model_id = request.model.model_id
    previous = _read_json(request.out / PREDICTIONS_FILE)
    others = set()
    if isinstance(previous, dict) and previous.get("model", {}).get("id") not in (None, model_id):
        others.add(str(previous["model"]["id"]))
    for case_file in request.out.glob(f"*/{CASE_FILE}"):
        record = _read_json(case_file)
        if isinstance(record, dict) and record.get("stamp", {}).get("model") not in (None, model_id):
            others.add(str(record["stamp"]["model"]))
    if others:
        raise OutputConflict(
            f"{request.out} holds predictions of another model ({', '.join(sorted(others))}); "
            f"this model is {model_id}. Choose another output folder or pass --overwrite"
        )


def is_finished(case_dir: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    record = _read_json(case_dir / CASE_FILE)
    if isinstance(record, dict) and record.get("stamp") == stamp:
        return record
    return None


# --------------------------------------------------------------------------------------- one case
def mirroring_for(model: ModelFiles, settings: PredictSettings) -> tuple[PredictSettings, list[int] | None]:
    """Test-time mirroring that matches how the model was trained (``data.augmentation.laterality``):
    ``swap`` flips along x and swaps the catalog's left/right channels back; ``off`` never flips along
    x; ``naive`` (and models trained before the setting existed) flips along x without a swap."""
    from dataclasses import replace

    from multitalent.catalog import lateral_swap

    mode = str(model.source.get("laterality", "naive"))
    if mode == "off":
        return replace(settings, mirror_axes=tuple(a for a in settings.mirror_axes if a != 2)), None
    if mode == "swap":
        swap = [int(k) for k in lateral_swap(model.catalog)]
        return settings, None if swap == list(range(len(swap))) else swap
    return settings, None


class CaseRunner:
    """One loaded model predicting case after case (in the driver, or inside a Ray actor)."""

    def __init__(self, model: ModelFiles, settings: PredictSettings) -> None:
        settings, lr_permutation = mirroring_for(model, settings)
        self.settings = settings
        self.predictor = Predictor(
            load_model(model, device=settings.resolved_device()), settings, lr_permutation=lr_permutation
        )

    def run(
        self,
        name: str,
        path: Path,
        out: Path,
        class_keys: Sequence[str],
        masks: bool,
        stamp: dict[str, Any],
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """The case's record (``status`` ``ok`` or ``failed`` with ``error``); never raises for a bad case."""
        catalog = self.predictor.catalog
        classes = select_classes(catalog, classes=list(class_keys))
        case_dir = Path(out) / name
        cpu0 = time.process_time()  # this process's CPU (every thread): the case's cost on a shared machine
        try:
            record = self.predictor.predict_file(
                Path(path), case_dir, classes=classes, masks=masks, progress=progress
            )
        except Exception as e:
            reason = str(e) if str(e) else type(e).__name__
            if type(e).__name__ not in ("CaseError", "PreprocessError", "ValueError"):
                reason = f"{type(e).__name__}: {reason}\n{traceback.format_exc(limit=3)}"
            return {"case": name, "input": str(path), "status": "failed", "error": reason}
        record = {"case": name, "status": "ok", **record, "stamp": stamp}
        record["cpu_seconds"] = round(time.process_time() - cpu0, 3)
        _atomic_json(case_dir / CASE_FILE, record)
        return record


def summary_line(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{record['case']}: FAILED: {record['error'].splitlines()[0]}"
    found = sum(len(v) for v in record["classes_found"].values())
    names = "; ".join(f"{d}: {', '.join(v) or '-'}" for d, v in record["classes_found"].items())
    warn = f" [{len(record['warnings'])} warning(s): {record['warnings'][0]}]" if record["warnings"] else ""
    return f"{record['case']}: {record['seconds']:.1f} s, {found} classes found ({names}){warn}"


def _pending(request: CohortRequest, summary: CohortSummary) -> list[tuple[str, Path]]:
    stamp = request.stamp()
    todo = []
    for name, path in named_cases(request.inputs):
        record = is_finished(request.out / name, stamp)
        if record is not None:
            summary.done[name] = record
            summary.skipped.append(name)
        else:
            todo.append((name, path))
    return todo


def _finish(request: CohortRequest, summary: CohortSummary, t0: float) -> CohortSummary:
    summary.seconds = time.perf_counter() - t0
    m = request.model
    data = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "id": m.model_id,
            "source": dict(m.source),
            "network": dict(m.network),
            "catalog": {"name": m.catalog.name, "hash": m.catalog.hash},
            "plan_sha256": m.plan.sha256,
        },
        "settings": {**asdict(request.settings), "mirror_axes": list(request.settings.mirror_axes)},
        "classes": request.class_keys(),
        "masks": request.masks,
        "cases": {
            k: {kk: v for kk, v in r.items() if kk != "stamp"} for k, r in sorted(summary.done.items())
        },
        "failures": summary.failures,
    }
    _atomic_json(request.out / PREDICTIONS_FILE, data)
    return summary


# ------------------------------------------------------------------------------------ in process
def _start(request: CohortRequest, log: Callable[[str], None]) -> tuple[CohortSummary, Any]:
    """Check ``OUT``, create it, and list the cases still to predict (finished ones are skipped)."""
    check_output(request)
    request.out.mkdir(parents=True, exist_ok=True)
    summary = CohortSummary(request.out)
    todo = _pending(request, summary)
    if summary.skipped:
        log(f"{len(summary.skipped)} case(s) already predicted by this model: skipped")
    return summary, todo


def predict_local(request: CohortRequest, *, log: Callable[[str], None] = print) -> CohortSummary:
    """Predict every input in this process, one model load, a progress bar per case and for the cohort."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary, todo = _start(request, log)
    if not todo:
        return _finish(request, summary, t0)
    runner = CaseRunner(request.model, request.settings)
    keys, stamp = request.class_keys(), request.stamp()
    with tqdm(total=len(todo), desc="cohort", unit="case", file=sys.stderr, disable=None, position=0) as bar:
        for name, path in todo:
            with tqdm(
                desc=name, unit="window", file=sys.stderr, disable=None, leave=False, position=1
            ) as case_bar:

                def progress(done: int, total: int, b: Any = case_bar) -> None:
                    b.total = total
                    b.n = done
                    b.refresh()

                record = runner.run(name, path, request.out, keys, request.masks, stamp, progress)
            _collect(summary, record)
            bar.write(summary_line(record))
            bar.update(1)
    return _finish(request, summary, t0)


def _collect(summary: CohortSummary, record: dict[str, Any]) -> None:
    if record["status"] == "ok":
        summary.done[record["case"]] = record
    else:
        summary.failures.append({k: record[k] for k in ("case", "input", "error")})


# ------------------------------------------------------------------------------------------ Ray
@dataclass(frozen=True)
class RaySlots:
    """Actors of a Ray cohort: one per GPU (``use_gpu``) or per ``cpus_per_worker`` CPUs."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


class _Actor:
    """Loads the model once; predicts the cases it is handed (rows in: paths; rows out: small records)."""

    def __init__(self, model: dict[str, Any], settings: dict[str, Any]) -> None:
        settings = {**settings, "mirror_axes": tuple(settings["mirror_axes"])}
        self.runner = CaseRunner(ModelFiles.from_dict(model), PredictSettings(**settings))

    def run(self, *args: Any) -> dict[str, Any]:
        return self.runner.run(*args)


def predict_ray(
    request: CohortRequest, ray: Any, slots: RaySlots, *, log: Callable[[str], None] = print
) -> CohortSummary:
    """Predict on a running Ray (local or cluster): ``slots.num_workers`` actors, each loading the model
    once; a case is handed to whichever actor is free. An actor that dies fails its case and leaves the
    pool; the others finish the cohort. ``OUT`` must be on storage every node shares."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary, todo = _start(request, log)
    if not todo:
        return _finish(request, summary, t0)
    settings = {**asdict(request.settings), "mirror_axes": list(request.settings.mirror_axes)}
    options: dict[str, Any] = (
        {"num_gpus": 1, "num_cpus": 0} if slots.use_gpu else {"num_cpus": slots.cpus_per_worker}
    )
    actor_cls = ray.remote(_Actor).options(**options, max_restarts=0)
    n = min(slots.num_workers, len(todo))
    actors = [actor_cls.remote(request.model.to_dict(), settings) for _ in range(n)]
    keys, stamp = request.class_keys(), request.stamp()
    queue = list(todo)
    running: dict[Any, tuple[Any, str, Path]] = {}

    def submit(actor: Any) -> None:
        name, path = queue.pop(0)
        ref = actor.run.remote(name, str(path), str(request.out), keys, request.masks, stamp)
        running[ref] = (actor, name, path)

    for actor in actors:
        if queue:
            submit(actor)
    with tqdm(total=len(todo), desc="cohort", unit="case", file=sys.stderr, disable=None) as bar:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            actor, name, path = running.pop(ref)
            try:
                record = ray.get(ref)
                alive = True
            except Exception as e:  # the actor died (out of memory, node lost) or could not load the model
                record = {
                    "case": name,
                    "input": str(path),
                    "status": "failed",
                    "error": f"worker failed: {e}",
                }
                alive = False
            _collect(summary, record)
            bar.write(summary_line(record))
            bar.update(1)
            if alive and queue:
                submit(actor)
            elif not alive:
                actors.remove(actor)
                if not actors:
                    for name, path in queue:
                        _collect(
                            summary,
                            {"case": name, "input": str(path), "status": "failed", "error": "no worker left"},
                        )
                    queue.clear()
    return _finish(request, summary, t0)
