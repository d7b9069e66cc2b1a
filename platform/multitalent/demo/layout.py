"""Where the demo's files live, its two label spaces, and the held-out cases it predicts.

Everything sits under one working directory (the repository root for ``./scripts/demo.sh``)::

    data_shards/raw/phantom                 the phantom collection (shared with jobs/convert.yaml)
    data_shards/demo/without-P03            every dataset but the held-out one, converted (own plan)
    data_shards/demo/P03                    the held-out dataset, converted with the champion's plan
    data_shards/demo/catalog-*.json         the two label spaces (subsets of the ``phantom`` preset)
    runs/mlflow.db, runs/mlartifacts        the MLflow store: both runs and the model registry
    runs/demo-without-P03                   the pre-training run
    runs/demo-finetune-P03                  the fine-tuning run
    runs/demo                               inputs/, predictions, evaluation tables, overlay.png,
                                            results.md/json, logs/ (one per stage)

A ``scale`` other than 1 (smaller collections, for tests) gets its own raw and shards folders
(``phantom-scale0.5``, ``demo-scale0.5``) so it never mixes with the full collection.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitalent.catalog import Catalog, load_catalog
from multitalent.demo import ALIAS, DEFAULT_HOLDOUT, FOLD
from multitalent.jobs import UserError


@dataclass(frozen=True)
class DemoLayout:
    """The demo's paths and names for one held-out dataset (absolute once ``workdir`` is)."""

    workdir: Path
    holdout: str = DEFAULT_HOLDOUT
    scale: float = 1.0

    @property
    def _suffix(self) -> str:
        return "" if self.scale == 1.0 else f"-scale{self.scale:g}"

    @property
    def raw(self) -> Path:
        return self.workdir / "data_shards" / "raw" / f"phantom{self._suffix}"

    @property
    def shards_root(self) -> Path:
        return self.workdir / "data_shards" / f"demo{self._suffix}"

    @property
    def pretrain_shards(self) -> Path:
        return self.shards_root / f"without-{self.holdout}"

    @property
    def target_shards(self) -> Path:
        return self.shards_root / self.holdout

    @property
    def pretrain_catalog_file(self) -> Path:
        return self.shards_root / f"catalog-without-{self.holdout}.json"

    @property
    def target_catalog_file(self) -> Path:
        return self.shards_root / f"catalog-{self.holdout}.json"

    @property
    def runs(self) -> Path:
        return self.workdir / "runs"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.runs / 'mlflow.db'}"

    @property
    def model_name(self) -> str:
        return f"phantom-without-{self.holdout}"

    @property
    def champion(self) -> str:
        return f"models:/{self.model_name}@{ALIAS}"

    @property
    def pretrain_run(self) -> str:
        return f"demo-without-{self.holdout}"

    @property
    def finetune_run(self) -> str:
        return f"demo-finetune-{self.holdout}"

    @property
    def out(self) -> Path:
        return self.workdir / "runs" / "demo"


N_SPLITS = 5  # the converter's folds (splits.json); a dataset needs this many cases to have held-out ones


def demo_catalogs(holdout: str, *, scale: float = 1.0) -> tuple[Catalog, Catalog]:
    """``(pre-training catalog, held-out catalog)``: the ``phantom`` preset without / with only ``holdout``.

    Raises:
        UserError: ``holdout`` is not a phantom dataset, or has too few cases (at ``scale``) for fold 0
            to hold any out.
    """
    from multitalent.synth.collection import case_count

    phantom = load_catalog("phantom")
    if holdout not in phantom.dataset_ids:
        raise UserError(
            f"--holdout {holdout}: not a phantom dataset (one of {', '.join(phantom.dataset_ids)})"
        )
    usable = [d.id for d in phantom.datasets if case_count(d, scale) >= N_SPLITS]
    if holdout not in usable:
        n = case_count(phantom.dataset(holdout), scale)
        raise UserError(
            f"--holdout {holdout}: {n} case(s) at scale {scale:g}, too few to keep any out of fine-tuning "
            f"for the evaluation ({N_SPLITS} folds); choose one of {', '.join(usable)}"
        )
    rest = [d for d in phantom.dataset_ids if d != holdout]
    return (
        phantom.subset(rest, name=f"phantom-without-{holdout}"),
        phantom.subset([holdout], name=f"phantom-{holdout}"),
    )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary sibling, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_catalog(catalog: Catalog, path: Path) -> Path:
    """The catalog file (rewritten only when its content changed, so its mtime means something)."""
    data = catalog.to_dict()
    if path.is_file():
        try:
            if json.loads(path.read_text()) == data:
                return path
        except ValueError:
            pass
    write_json_atomic(path, data)
    return path


def write_phantom(raw: Path, *, seed: int = 0, scale: float = 1.0) -> int:
    """Write the phantom collection into a hidden sibling of ``raw``, then rename it into place.
    Returns the number of cases written."""
    from multitalent.synth import write_phantom_collection

    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = raw.with_name(f".tmp-{raw.name}-{uuid.uuid4().hex[:8]}")
    try:
        summary = write_phantom_collection(tmp, seed=seed, scale=scale)
        tmp.rename(raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(len(v["cases"]) for v in summary.values())


def heldout_cases(shards: Path, catalog: Catalog, raw_root: Path, *, fold: int = FOLD) -> list[Any]:
    """The raw cases (:class:`~multitalent.rawio.RawCase`) of ``fold``'s validation split of a converted
    collection (its ``splits.json``), in catalog order.

    Raises:
        ValueError: the splits file is unreadable, or names a case the raw folder lacks.
    """
    from multitalent.data.sampling import fold_keys, load_splits
    from multitalent.rawio import discover_cases

    _, val = fold_keys(load_splits(shards / "splits.json"), fold)
    wanted = set(val)
    found = []
    for dataset in catalog.datasets:
        ids = {case for d, case in wanted if d == dataset.id}
        if not ids:
            continue
        cases = [c for c in discover_cases(dataset, raw_root / dataset.location) if c.case_id in ids]
        lacking = ids - {c.case_id for c in cases}
        if lacking:
            raise ValueError(
                f"{shards / 'splits.json'}: {dataset.id} cases {sorted(lacking)} are not in "
                f"{raw_root / dataset.location}"
            )
        found += cases
    return found


def link_inputs(cases: list[Any], folder: Path) -> Path:
    """A folder of links to the cases' images that ``multitalent predict -i`` reads with the raw case
    names (``<case>/imaging.nii.gz`` layouts keep their case folder). Replaces ``folder`` whole."""
    from multitalent.rawio.naming import GENERIC_IMAGE_NAMES, nifti_stem

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for case in cases:
            image = Path(case.image_path).resolve()
            link = tmp / image.name
            if nifti_stem(image) in GENERIC_IMAGE_NAMES:
                link = tmp / image.parent.name / image.name
                link.parent.mkdir(exist_ok=True)
            link.symlink_to(image)
        if folder.exists():
            shutil.rmtree(folder)  # the previous run's links (rmtree removes links, never their targets)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
