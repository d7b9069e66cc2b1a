"""Training progress a person can follow, on the driver's console.

Rank 0 appends records to ``run_dir/progress.jsonl`` (:class:`multitalent.train.callbacks.Progress`);
the driver follows that file while Ray Train runs (:class:`ProgressTail`; the run directory is on
storage every node shares, so this works on a cluster and inside ``ray job submit`` alike, and needs
no worker log forwarding) and hands each record to a printer: :func:`text_printer` (a line per epoch,
then the result table) or :func:`jsonl_printer` (the records as they are, for scripts).

Records (one JSON object per line; ``time`` is the Unix time of writing):

- ``{"event": "start", "iteration", "total", "stop", "epochs", "iterations_per_epoch", "world_size",
  "global_batch", "resumed_from"}``: the workers are up; ``iteration`` is where this launch starts.
- ``{"event": "epoch", "epoch", "epochs", "iteration", "total", "loss", "lr", "samples_per_s",
  "seconds", "eta_s", "skipped_nonfinite", "cpu_s", "validation"?}``: an epoch ended; ``loss`` is its mean
  loss over ranks (``null`` when every iteration was skipped), ``seconds`` its wall clock, ``eta_s`` the
  time left for this launch at the launch's pace so far, ``cpu_s`` the CPU seconds rank 0's process
  used since this launch started (every thread; the cost on a shared machine, where wall clock is not);
  ``validation`` (when it ran): the MLflow
  metrics of the pass (``val/dice/<dataset>/<class>``, ``val/dice_dataset/<dataset>``,
  ``val/dice_mean/{class,dataset,...}``).
- ``{"event": "step", ...}``: the same fields mid-epoch, when an epoch runs long (a heartbeat).
- ``{"event": "end", "iteration", "total", "seconds", "cpu_s", "stop_reason", "validation_iteration"}``.

Written by the driver only (never in the file): ``{"event": "waiting", "message"}`` while the workers
have not started, and ``{"event": "done", ...}`` (:func:`done_record`) at the end.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from multitalent.metric_names import metric_key

if TYPE_CHECKING:
    from multitalent.catalog import Catalog

PROGRESS_FILE = "progress.jsonl"
Record = dict[str, Any]
OnProgress = Callable[[Record], None]


class TrainResult(Protocol):
    """What the result printers read of :class:`multitalent.train.launch.TrainResult` (a protocol, so
    this module does not import the launcher that imports it)."""

    iterations: int
    optimizer_steps: int
    skipped_nonfinite: int
    checkpoint: Path | str | None  # a URL with object storage
    tracking_uri: str
    mlflow_run_id: str | None
    validation: dict[str, float]
    validation_iteration: int | None


class ProgressTail:
    """Follow ``path`` from its current end in a thread; call ``on_record`` for each new complete line.

    ``waiting()`` is asked for a message every ``notice_s`` seconds until the first ``start`` record
    arrives (it returns ``None`` to stay silent).
    """

    def __init__(
        self,
        path: Path,
        on_record: OnProgress,
        *,
        waiting: Callable[[], str | None] | None = None,
        notice_s: float = 30.0,
        poll_s: float = 0.5,
    ) -> None:
        self.path, self.on_record, self.waiting = path, on_record, waiting
        self.notice_s, self.poll_s = notice_s, poll_s
        self.offset = path.stat().st_size if path.is_file() else 0
        self.started = False
        self.buffer = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multitalent-progress", daemon=True)

    def __enter__(self) -> ProgressTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # whatever was written last

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        self.offset += len(chunk)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.started = self.started or record.get("event") == "start"
            self.on_record(record)

    def _run(self) -> None:
        next_notice = time.monotonic() + self.notice_s
        while not self._stop.wait(self.poll_s):
            self.poll()
            if not self.started and self.waiting is not None and time.monotonic() >= next_notice:
                next_notice = time.monotonic() + 2 * self.notice_s
                message = self.waiting()
                if message:
                    self.on_record({"event": "waiting", "message": message})


# ------------------------------------------------------------------------------------------ printing
def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = round(max(seconds, 0.0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def dataset_dice(metrics: Record) -> dict[str, float]:
    prefix = "val/dice_dataset/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def epoch_line(r: Record) -> str:
    """One line per epoch (``step`` records: the same, marked as running)."""
    width = len(str(r["total"]))
    loss = "   n/a" if r.get("loss") is None else f"{r['loss']:.4f}"
    head = "epoch" if r["event"] == "epoch" else "  ..."
    epoch = f"{r['epoch']:>{len(str(r['epochs']))}}/{r['epochs']}"
    line = (
        f"{head} {epoch}  it {r['iteration']:>{width}}/{r['total']}  "
        f"loss {loss}  lr {r['lr']:.2e}  {r['samples_per_s']:.1f} samples/s  "
        f"{duration(r['seconds'])}/epoch  ETA {duration(r['eta_s'])}"
    )
    if r.get("skipped_nonfinite"):
        line += f"  skipped {r['skipped_nonfinite']}"
    v = r.get("validation")
    if v:
        mean = v.get("val/dice_mean/class")
        per = "  ".join(f"{d} {x:.2f}" for d, x in sorted(dataset_dice(v).items()))
        line += f"\n  val Dice {'n/a' if mean is None else f'{mean:.3f}'} (mean of classes)  {per}"
    return line


def dice_table(metrics: Record, catalog: Catalog | None) -> list[str]:
    """Per-class validation Dice grouped by dataset; ``-`` for a class the pass did not score."""
    if catalog is None:
        rows = sorted(
            (k.removeprefix("val/dice/"), v) for k, v in metrics.items() if k.startswith("val/dice/")
        )
        return [f"  {name:40s} {value:.3f}" for name, value in rows]
    w = max(7, *(len(d.id) for d in catalog.datasets))
    cw = max(5, *(len(c.name) for c in catalog.classes))
    lines = [f"  {'dataset':{w}s}  {'class':{cw}s}  Dice"]
    unscored = []
    for d in catalog.datasets:
        keys = [
            metric_key(f"val/dice/{d.id}/{c.name.replace('/', '_')}")
            for c in catalog.classes
            if c.dataset_id == d.id
        ]
        if not any(k in metrics for k in keys):
            unscored.append(d.id)
            continue
        first = True
        for c in catalog.classes:
            if c.dataset_id != d.id:
                continue
            value = metrics.get(metric_key(f"val/dice/{d.id}/{c.name.replace('/', '_')}"))
            cell = "    -" if value is None else f"{value:.3f}"
            lines.append(f"  {d.id if first else '':{w}s}  {c.name:{cw}s}  {cell}")
            first = False
        mean = metrics.get(metric_key(f"val/dice_dataset/{d.id}"))
        if mean is not None:
            lines.append(f"  {'':{w}s}  {'(mean)':{cw}s}  {mean:.3f}")
    if unscored:
        lines.append(f"  not scored (no validation case of theirs in this pass): {', '.join(unscored)}")
    return lines


def result_text(result: TrainResult, catalog: Catalog | None) -> str:
    """What a finished launch prints: counts, the Dice table, the checkpoint, how to open MLflow."""
    lines = [
        f"done: {result.iterations} iterations ({result.optimizer_steps} optimizer steps, "
        f"{result.skipped_nonfinite} skipped as non-finite)"
    ]
    v = result.validation
    if v:
        where = f"iteration {result.validation_iteration}" if result.validation_iteration else "the last pass"
        lines += ["", f"validation Dice ({where}; per class, grouped by dataset):"]
        lines += dice_table(v, catalog)
        means = [
            f"{label} {v[key]:.3f}"
            for label, key in (("classes", "val/dice_mean/class"), ("datasets", "val/dice_mean/dataset"))
            if key in v
        ]
        if means:
            lines.append("  mean over " + ", over ".join(means))
    elif result.iterations:
        lines += ["", "no validation in this run (validation.fold is null, or no epoch ended)"]
    lines += ["", f"checkpoint: {result.checkpoint}"]
    if result.mlflow_run_id is not None:
        lines += [
            f"mlflow: {result.tracking_uri} run {result.mlflow_run_id}",
            f"  mlflow ui --backend-store-uri {result.tracking_uri}",
        ]
    return "\n".join(lines)


def done_record(result: TrainResult) -> Record:
    return {
        "event": "done",
        "iterations": result.iterations,
        "optimizer_steps": result.optimizer_steps,
        "skipped_nonfinite": result.skipped_nonfinite,
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "tracking_uri": result.tracking_uri,
        "mlflow_run_id": result.mlflow_run_id,
        "validation_iteration": result.validation_iteration,
        "validation": result.validation,
    }


def text_printer(out: IO[str] | None = None) -> OnProgress:
    """Human-readable lines: the start, one per epoch (validation Dice per dataset under it), waits."""

    def show(r: Record) -> None:
        stream = out or sys.stdout
        event = r.get("event")
        if event == "start":
            where = f"resumed from {r['resumed_from']}" if r.get("resumed_from") else "fresh start"
            print(
                f"training: {r['epochs']} epochs x {r['iterations_per_epoch']} iterations on "
                f"{r['world_size']} worker(s), global batch {r['global_batch']}; "
                f"from iteration {r['iteration']} ({where})",
                file=stream,
                flush=True,
            )
        elif event in ("epoch", "step"):
            print(epoch_line(r), file=stream, flush=True)
        elif event == "waiting":
            print(r["message"], file=stream, flush=True)
        elif event == "end" and r.get("iteration", 0) < r.get("total", 0) and not r.get("stop_reason"):
            print(
                f"stopped at iteration {r['iteration']} of {r['total']} (relaunch to continue)", file=stream
            )

    return show


def jsonl_printer(out: IO[str] | None = None) -> OnProgress:
    def show(r: Record) -> None:
        print(json.dumps(r, default=str), file=out or sys.stdout, flush=True)

    return show
