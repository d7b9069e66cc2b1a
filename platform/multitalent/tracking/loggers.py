"""What a training run logs: the job, the label space, the plan, structured files and pictures.

Each function encodes its subject now (so later changes to it do not leak in) and hands the result
to a :class:`~multitalent.tracking.run.MlflowRun`; a subject that cannot be encoded is skipped with
a :class:`~multitalent.tracking.outbox.TrackingWarning`. Nothing here raises or talks to MLflow.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from multitalent.catalog import Catalog
    from multitalent.preprocess.plan import Plan
    from multitalent.tracking.run import MlflowRun


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists stay values (JSON-encoded when logged)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_dict(run: MlflowRun, data: Mapping[str, Any], artifact_file: str) -> None:
    """A JSON (or, for ``.yaml``/``.yml``, YAML) artifact."""
    if not run.enabled:
        return
    try:
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)
        else:
            text = json.dumps(data, indent=2, default=str)
    except Exception as e:
        run.warnings.warn("log_dict:bad", f"log_dict({artifact_file}): cannot serialise: {e}")
        return
    run.log_text(text, artifact_file)


def log_job(run: MlflowRun, resolved_yaml: str) -> None:
    """The resolved job file as artifact ``job.yaml``, and its leaves as ``job.*`` parameters."""
    if not run.enabled:
        return
    run.log_text(resolved_yaml, "job.yaml")
    try:
        import yaml

        job = yaml.safe_load(resolved_yaml)
    except Exception as e:
        run.warnings.warn("log_job:parse", f"log_job: job YAML does not parse, logged as text only: {e}")
        return
    if isinstance(job, Mapping):
        run.log_params(flatten(job, "job."))


def log_label_space(run: MlflowRun, catalog: Catalog) -> None:
    """``label_space.json`` (``catalog.to_dict()``) and the catalog's name, hash and size."""
    if not run.enabled:
        return
    try:
        data = catalog.to_dict()
        params = {
            "catalog.name": catalog.name,
            "catalog.hash": catalog.hash,
            "catalog.num_classes": catalog.num_classes,
            "catalog.num_datasets": len(catalog.datasets),
        }
    except Exception as e:
        run.warnings.warn("log_label_space", f"log_label_space: {e}")
        return
    log_dict(run, data, "label_space.json")
    run.log_params(params)


def log_plan(run: MlflowRun, plan: Plan) -> None:
    """The preprocessing plan as artifact ``plan.json`` (the bytes :meth:`Plan.save` writes, so
    :meth:`Plan.load` reads a downloaded copy) and its settings as ``plan.*`` parameters (the catalog
    part is left to :func:`log_label_space`)."""
    if not run.enabled:
        return
    try:
        data = plan.to_dict()
    except Exception as e:
        run.warnings.warn("log_plan", f"log_plan: {e}")
        return
    from multitalent.preprocess.plan import PLAN_FILE

    run.log_bytes(plan.to_json().encode("utf-8"), PLAN_FILE, kind="log_plan")
    run.log_params(flatten({k: v for k, v in data.items() if k != "catalog"}, "plan."))


def log_image(run: MlflowRun, image: Image.Image | Path | str, artifact_file: str) -> None:
    """A PIL image (encoded as PNG now) or an image file (read now), stored at ``artifact_file``."""
    if not run.enabled:
        return
    try:
        if isinstance(image, str | Path):
            data = Path(image).read_bytes()
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
    except Exception as e:
        run.warnings.warn("log_image:bad", f"log_image({artifact_file}): {e}")
        return
    run.log_bytes(data, artifact_file, kind="log_image")


def log_figure_curves(
    run: MlflowRun, history: Mapping[str, Any], artifact_file: str = "curves/curves.png"
) -> None:
    """Loss and Dice curves (``history``: name -> [(step, value), ...]) as a PNG."""
    if not run.enabled:
        return
    try:
        from multitalent.tracking.pictures import curves_png

        picture = curves_png(history)
    except Exception as e:
        run.warnings.warn("curves", f"log_figure_curves: {e}")
        return
    log_image(run, picture, artifact_file)
