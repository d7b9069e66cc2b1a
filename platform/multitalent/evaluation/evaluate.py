"""Evaluating a prediction folder against the raw ground truth of the catalog's datasets.

For every ground-truth case of a dataset (found by the raw layout readers), the prediction is
``PRED/<case name>/<dataset>.nii.gz`` (``multitalent predict``'s layout; the case name comes from the
image path, :func:`multitalent.rawio.naming.case_name`). Each class the dataset annotates is scored on
its region: the raw values of the class in the reference and in the prediction (both in the dataset's
raw numbering). Classes of other datasets are never scored on that case.

Aggregates: per class the mean over cases (Dice over all cases, HD95 over cases where it is defined);
per dataset the mean of its classes; the class average (all classes), the dataset average (of dataset
means) and the catalog's groups ("difficult", "cancer": means over member classes). The empty-mask
rules are in :mod:`multitalent.evaluation.overlap`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitalent.catalog import Catalog, DatasetSpec
from multitalent.catalog.model import GROUPS
from multitalent.evaluation.overlap import EMPTY_RULES, HD95_DEFINITION, STATUSES, overlap
from multitalent.metric_names import metric_key


@dataclass(frozen=True)
class ClassScore:
    """One (case, class) row of the per-case table."""

    dataset_id: str
    case: str
    class_name: str
    dice: float
    hd95_mm: float
    tp: int
    fp: int
    fn: int
    status: str

    @property
    def class_key(self) -> str:
        return f"{self.dataset_id}:{self.class_name}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


@dataclass
class Summary:
    """Aggregates (see the module docstring); ``nan`` where nothing was scored."""

    per_class: dict[str, dict[str, float]]  # class key -> {dice, hd95_mm, cases, and status counts}
    per_dataset: dict[str, dict[str, float]]  # dataset -> {dice, hd95_mm, classes}
    class_average: dict[str, float]
    dataset_average: dict[str, float]
    groups: dict[str, dict[str, float]]
    status_counts: dict[str, int]


def summarise(scores: Sequence[ClassScore], catalog: Catalog) -> Summary:
    by_class: dict[str, list[ClassScore]] = {}
    for s in scores:
        by_class.setdefault(s.class_key, []).append(s)
    order = [c.key for c in catalog.classes if c.key in by_class]
    per_class = {}
    for key in order:
        rows = by_class[key]
        per_class[key] = {
            "dice": _mean([r.dice for r in rows]),
            "hd95_mm": _mean([r.hd95_mm for r in rows]),
            "cases": len(rows),
            **{status: sum(r.status == status for r in rows) for status in STATUSES},
        }
    per_dataset = {}
    for d in catalog.datasets:
        keys = [k for k in order if k.split(":", 1)[0] == d.id]
        if keys:
            per_dataset[d.id] = {
                "dice": _mean([per_class[k]["dice"] for k in keys]),
                "hd95_mm": _mean([per_class[k]["hd95_mm"] for k in keys]),
                "classes": len(keys),
            }
    groups = {}
    for group in GROUPS:
        keys = [catalog.classes[i].key for i in catalog.group_members(group)]
        keys = [k for k in keys if k in per_class]
        if keys:
            groups[group] = {
                "dice": _mean([per_class[k]["dice"] for k in keys]),
                "hd95_mm": _mean([per_class[k]["hd95_mm"] for k in keys]),
                "classes": len(keys),
            }
    return Summary(
        per_class=per_class,
        per_dataset=per_dataset,
        class_average={
            "dice": _mean([v["dice"] for v in per_class.values()]),
            "hd95_mm": _mean([v["hd95_mm"] for v in per_class.values()]),
        },
        dataset_average={
            "dice": _mean([v["dice"] for v in per_dataset.values()]),
            "hd95_mm": _mean([v["hd95_mm"] for v in per_dataset.values()]),
        },
        groups=groups,
        status_counts={status: sum(s.status == status for s in scores) for status in STATUSES},
    )


def score_case(
    pred_label: np.ndarray,
    gt_label: np.ndarray,
    spacing_mm: Sequence[float],
    dataset: DatasetSpec,
    case: str,
) -> list[ClassScore]:
    """Every class of ``dataset`` on one case; both maps in the dataset's raw numbering."""
    rows = []
    for c in dataset.classes:
        o = overlap(np.isin(pred_label, c.raw_values), np.isin(gt_label, c.raw_values), spacing_mm)
        rows.append(ClassScore(dataset.id, case, c.name, o.dice, o.hd95_mm, o.tp, o.fp, o.fn, o.status))
    return rows


@dataclass
class EvaluationReport:
    scores: list[ClassScore]
    summary: Summary
    missing: list[str] = field(default_factory=list)  # "<dataset>/<case>": no prediction
    errors: list[str] = field(default_factory=list)  # "<dataset>/<case>: reason"

    # ------------------------------------------------------------------------------------ outputs
    def cases_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["dataset", "case", "class", "dice", "hd95_mm", "tp", "fp", "fn", "status"])
        for s in self.scores:
            w.writerow(
                [
                    s.dataset_id,
                    s.case,
                    s.class_name,
                    f"{s.dice:.6f}",
                    _num(s.hd95_mm, 4),
                    s.tp,
                    s.fp,
                    s.fn,
                    s.status,
                ]
            )
        return buf.getvalue()

    def summary_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["level", "name", "dice", "hd95_mm", "n", *STATUSES])
        s = self.summary
        for key, v in s.per_class.items():
            w.writerow(
                [
                    "class",
                    key,
                    _num(v["dice"], 6),
                    _num(v["hd95_mm"], 4),
                    v["cases"],
                    *(v[x] for x in STATUSES),
                ]
            )
        for key, v in s.per_dataset.items():
            w.writerow(["dataset", key, _num(v["dice"], 6), _num(v["hd95_mm"], 4), v["classes"]])
        for key, v in s.groups.items():
            w.writerow(["group", key, _num(v["dice"], 6), _num(v["hd95_mm"], 4), v["classes"]])
        w.writerow(
            ["average", "class", _num(s.class_average["dice"], 6), _num(s.class_average["hd95_mm"], 4)]
        )
        w.writerow(
            ["average", "dataset", _num(s.dataset_average["dice"], 6), _num(s.dataset_average["hd95_mm"], 4)]
        )
        return buf.getvalue()

    def markdown(self) -> str:
        s = self.summary
        lines = [
            "# Evaluation",
            "",
            f"- {HD95_DEFINITION}.",
            f"- Empty masks: {EMPTY_RULES}.",
            "- Counts over all (case, class) pairs: "
            + ", ".join(f"{k} {v}" for k, v in s.status_counts.items())
            + f"; missing predictions {len(self.missing)}; errors {len(self.errors)}.",
            "",
            "| class | cases | Dice | HD95 (mm) | both empty | pred empty | gt empty |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, v in s.per_class.items():
            lines.append(
                f"| {key} | {v['cases']} | {_num(v['dice'], 3)} | {_num(v['hd95_mm'], 2)} | "
                f"{v['both_empty']} | {v['pred_empty']} | {v['gt_empty']} |"
            )
        lines += ["", "| dataset / group / average | classes | Dice | HD95 (mm) |", "|---|---:|---:|---:|"]
        for key, v in s.per_dataset.items():
            lines.append(f"| {key} | {v['classes']} | {_num(v['dice'], 3)} | {_num(v['hd95_mm'], 2)} |")
        for key, v in s.groups.items():
            lines.append(
                f"| group: {key} | {v['classes']} | {_num(v['dice'], 3)} | {_num(v['hd95_mm'], 2)} |"
            )
        lines.append(
            f"| class average | {len(s.per_class)} | {_num(s.class_average['dice'], 3)} | "
            f"{_num(s.class_average['hd95_mm'], 2)} |"
        )
        lines.append(
            f"| dataset average | {len(s.per_dataset)} | {_num(s.dataset_average['dice'], 3)} | "
            f"{_num(s.dataset_average['hd95_mm'], 2)} |"
        )
        if self.missing or self.errors:
            lines += ["", "Not scored:", *[f"- {m}: no prediction" for m in self.missing]]
            lines += [f"- {e}" for e in self.errors]
        return "\n".join(lines) + "\n"

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat MLflow metric names (through :func:`metric_key`); ``nan`` values are left out."""
        out: dict[str, float] = {}

        def put(name: str, value: float) -> None:
            if not math.isnan(value):
                out[metric_key(name)] = float(value)

        s = self.summary
        for key, v in s.per_class.items():
            dataset_id, _, name = key.partition(":")
            put(f"{prefix}/dice/{dataset_id}/{name.replace('/', '_')}", v["dice"])
            put(f"{prefix}/hd95/{dataset_id}/{name.replace('/', '_')}", v["hd95_mm"])
        for key, v in s.per_dataset.items():
            put(f"{prefix}/dice_dataset/{key}", v["dice"])
            put(f"{prefix}/hd95_dataset/{key}", v["hd95_mm"])
        for group, v in s.groups.items():
            put(f"{prefix}/dice_mean/{group}", v["dice"])
            put(f"{prefix}/hd95_mean/{group}", v["hd95_mm"])
        put(f"{prefix}/dice_mean/class", s.class_average["dice"])
        put(f"{prefix}/dice_mean/dataset", s.dataset_average["dice"])
        put(f"{prefix}/hd95_mean/class", s.class_average["hd95_mm"])
        put(f"{prefix}/hd95_mean/dataset", s.dataset_average["hd95_mm"])
        for status, n in s.status_counts.items():
            out[metric_key(f"{prefix}/count/{status}")] = float(n)
        out[metric_key(f"{prefix}/count/missing")] = float(len(self.missing))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "hd95_definition": HD95_DEFINITION,
            "empty_mask_rules": EMPTY_RULES,
            "summary": asdict(self.summary),
            "missing": self.missing,
            "errors": self.errors,
        }

    def write(self, out: Path) -> list[Path]:
        """``evaluation_cases.csv``, ``evaluation_summary.csv``, ``evaluation.md``, ``evaluation.json``."""
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "evaluation_cases.csv": self.cases_csv(),
            "evaluation_summary.csv": self.summary_csv(),
            "evaluation.md": self.markdown(),
            "evaluation.json": json.dumps(self.to_json(), indent=1, default=_json_nan),
        }
        written = []
        for name, text in files.items():
            tmp = out / f".tmp-{name}"
            tmp.write_text(text)
            tmp.replace(out / name)
            written.append(out / name)
        return written


def _num(v: float, digits: int) -> str:
    return "" if math.isnan(v) else f"{v:.{digits}f}"


def _json_nan(v: Any) -> Any:
    return None


def evaluate_folder(
    pred_root: Path,
    gt_root: Path,
    catalog: Catalog,
    *,
    datasets: Collection[str] | None = None,
    cases: Collection[tuple[str, str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Score every ground-truth case of ``catalog``'s datasets (or ``datasets``; or only ``cases``,
    ``(dataset_id, case_id)`` pairs) that has a prediction in ``pred_root``.

    Raw cases without a prediction are listed in ``missing`` (when ``cases`` is given, or when the
    prediction folder holds some case of that dataset); unreadable cases in ``errors``.
    """
    from multitalent.preprocess.orientation import voxel_spacing
    from multitalent.rawio import CaseError, discover_cases, load_case, read_volume
    from multitalent.rawio.naming import case_name

    scores: list[ClassScore] = []
    missing: list[str] = []
    errors: list[str] = []
    for dataset in catalog.datasets:
        if datasets is not None and dataset.id not in datasets:
            continue
        root = Path(gt_root) / dataset.location
        if not root.is_dir():
            if cases is not None and any(d == dataset.id for d, _ in cases):
                errors.append(f"{dataset.id}: ground-truth folder {root} missing")
            continue
        raw_cases = discover_cases(dataset, root)
        if cases is not None:
            raw_cases = [c for c in raw_cases if (dataset.id, c.case_id) in cases]
        for raw in raw_cases:
            name = case_name(raw.image_path)
            pred_path = Path(pred_root) / name / f"{dataset.id}.nii.gz"
            if not pred_path.is_file():
                missing.append(f"{dataset.id}/{raw.case_id}")
                continue
            try:
                loaded = load_case(raw, dataset)
                pred, pred_affine = read_volume(pred_path, what="prediction")
                if pred.shape != loaded.label.shape:
                    raise ValueError(f"prediction shape {pred.shape} != reference shape {loaded.label.shape}")
                if not np.allclose(pred_affine, loaded.affine, atol=1e-3):
                    raise ValueError("prediction affine differs from the reference's")
                spacing = [float(s) for s in voxel_spacing(loaded.affine)]
                scores += score_case(np.asarray(pred), loaded.label, spacing, dataset, raw.case_id)
            except (CaseError, ValueError) as e:
                errors.append(f"{dataset.id}/{raw.case_id}: {e}")
            if progress is not None:
                progress(f"{dataset.id}/{raw.case_id}")
    if cases is None:
        # without an explicit case list, a dataset none of whose cases was predicted is not "missing"
        predicted = {s.dataset_id for s in scores}
        missing = [m for m in missing if m.split("/", 1)[0] in predicted]
    return EvaluationReport(scores, summarise(scores, catalog), missing, errors)
