"""What the demo shows: a progress bar for a training stage, the final Dice/HD95 table, the overlay PNG.

:class:`TrainingBar` takes the records ``multitalent train`` reports while it runs
(:mod:`multitalent.train.progress`: ``waiting``, ``start``, ``epoch``, ``step``, ``end``). On a terminal it
redraws one line in place (iterations, loss, last validation Dice, elapsed, ETA), ticking every second
so a long epoch is never silent; elsewhere (a log, a pipe) it prints one line per record instead.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from multitalent.catalog import Catalog
from multitalent.train.progress import duration


class TrainingBar:
    """``on_progress`` for :func:`multitalent.train.launch.run_training`, drawing a bar on ``stream``.

    Use as a context manager (the ticker thread runs inside it, on a terminal only).
    """

    def __init__(
        self,
        label: str,
        *,
        stream: IO[str],
        tty: bool | None = None,
        width: int = 24,
        tick_s: float = 1.0,
    ) -> None:
        self.label, self.stream, self.width, self.tick_s = label, stream, width, tick_s
        self.tty = stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.iteration = 0
        self.total: int | None = None
        self.loss: float | None = None
        self.dice: float | None = None
        self.eta_s: float | None = None
        self.eta_at = self.t0
        self.message = "starting Ray Train workers"
        self.records = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0

    # ----------------------------------------------------------------------------------- records
    def __call__(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        with self._lock:
            self.records += 1
            if event == "waiting":
                self.message = str(record.get("message", ""))
            elif event == "start":
                self.iteration, self.total = int(record["iteration"]), int(record["total"])
                self.message = ""
            elif event in ("epoch", "step"):
                self.iteration, self.total = int(record["iteration"]), int(record["total"])
                self.loss = record.get("loss")
                self.eta_s, self.eta_at = float(record.get("eta_s") or 0.0), time.monotonic()
                validation = record.get("validation") or {}
                if "val/dice_mean/class" in validation:
                    self.dice = float(validation["val/dice_mean/class"])
            elif event == "end":
                self.iteration = int(record.get("iteration", self.iteration))
                self.eta_s, self.eta_at = 0.0, time.monotonic()
            else:
                return
            if self.tty:
                self._draw()
            elif event in ("waiting", "epoch", "step", "end") and (event != "end" or self.total is None):
                print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The bar as one line of text (no carriage return)."""
        elapsed = duration(time.monotonic() - self.t0)
        if self.total is None:
            return f"  {self.label}  {self.message}  {elapsed}"
        done = min(self.iteration / max(self.total, 1), 1.0)
        filled = round(done * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        text = f"  {self.label} [{bar}] {self.iteration:>{len(str(self.total))}}/{self.total} it"
        if self.loss is not None:
            text += f"  loss {self.loss:.3f}"
        if self.dice is not None:
            text += f"  val Dice {self.dice:.2f}"
        text += f"  {elapsed}"
        if self.eta_s is not None and self.iteration < self.total:
            left = max(self.eta_s - (time.monotonic() - self.eta_at), 0.0)
            text += f", ETA {duration(left)}"
        return text

    # ----------------------------------------------------------------------------------- drawing
    def _draw(self) -> None:
        text = self.line()
        pad = max(self._drawn - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._drawn = len(text)

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            with self._lock:
                self._draw()

    def __enter__(self) -> TrainingBar:
        if self.tty:
            with self._lock:
                self._draw()
            self._thread = threading.Thread(target=self._tick, name="demo-bar", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            with self._lock:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()


# -------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class ModelResult:
    """One model's evaluation: ``summary`` is the ``summary`` object of ``evaluation.json``."""

    label: str  # e.g. "pre-trained"
    summary: dict[str, Any]


def _cell(value: Any, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{fmt}}"


def results_table(results: Sequence[ModelResult], catalogs: Sequence[Catalog]) -> list[str]:
    """Dice and HD95 per model, dataset and class (catalog order), with each dataset's mean and each
    model's class average; ``-`` where a value is undefined (HD95 when both masks are empty)."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    for result, catalog in zip(results, catalogs):
        per_class = result.summary.get("per_class", {})
        per_dataset = result.summary.get("per_dataset", {})
        first_model = True
        for dataset in catalog.datasets:
            keys = [c.key for c in catalog.classes if c.dataset_id == dataset.id and c.key in per_class]
            first_dataset = True
            for key in keys:
                v = per_class[key]
                rows.append(
                    (
                        result.label if first_model else "",
                        dataset.id if first_dataset else "",
                        key.split(":", 1)[1],
                        str(int(v["cases"])),
                        _cell(v.get("dice"), ".3f", 6),
                        _cell(v.get("hd95_mm"), ".1f", 8),
                    )
                )
                first_model = first_dataset = False
            if len(keys) > 1 and dataset.id in per_dataset:
                d = per_dataset[dataset.id]
                rows.append(
                    ("", "", "(mean)", "", _cell(d.get("dice"), ".3f", 6), _cell(d.get("hd95_mm"), ".1f", 8))
                )
        average = result.summary.get("class_average", {})
        if len(per_dataset) < 2:  # one dataset: its mean is the class average
            continue
        rows.append(
            (
                "",
                "",
                "(class average)",
                "",
                _cell(average.get("dice"), ".3f", 6),
                _cell(average.get("hd95_mm"), ".1f", 8),
            )
        )
    header = ("model", "dataset", "class", "cases", "Dice", "HD95 mm")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    aligns = ["<", "<", "<", ">", ">", ">"]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, aligns, widths)).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


# ------------------------------------------------------------------------------------------ overlay
def write_overlay(
    *, raw_case: Any, dataset_id: str, catalog: Catalog, prediction: Path, out: Path, title: str
) -> Path:
    """An overlay PNG of one prediction (``multitalent predict``'s label map) over its scan, with the
    ground truth: fill = ground truth, outline = prediction, axial slices in canonical orientation
    (:func:`multitalent.tracking.pictures.overlay_png`). Written through a temporary sibling."""
    import uuid

    import numpy as np

    from multitalent.preprocess.orientation import to_canonical_zyx
    from multitalent.rawio import load_case, read_volume
    from multitalent.tracking.pictures import overlay_png

    dataset = catalog.dataset(dataset_id)
    loaded = load_case(raw_case, dataset)
    pred, _ = read_volume(prediction, what="prediction")
    if pred.shape != loaded.label.shape:
        raise ValueError(f"{prediction}: shape {pred.shape} differs from the scan's {loaded.label.shape}")
    image, gt, pr = (
        to_canonical_zyx(np.asarray(v), loaded.affine)[0] for v in (loaded.image, loaded.label, pred)
    )
    pred_k = np.stack([np.isin(pr, c.raw_values) for c in dataset.classes])
    gt_k = np.stack([np.isin(gt, c.raw_values) for c in dataset.classes])
    picture = overlay_png(
        image.astype(np.float32), pred_k, gt_k, [c.name for c in dataset.classes], title=title
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{out.name}")
    try:
        picture.save(tmp, format="PNG")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
