"""Predict one scan: the converter's preprocessing, the sliding window, and the way back.

A :class:`Predictor` holds one loaded network and is reused for every case of a cohort (re-creating
it per image dominated cohort time in TotalSegmentator, issue #581). :meth:`Predictor.predict_file`
writes, per requested dataset, ``<dataset>.nii.gz`` (a label map in the dataset's raw numbering) and
with ``masks`` one binary ``<dataset>/<class>.nii.gz`` per class, all with exactly the input's shape,
affine and qform/sform codes. Every file is written under a hidden temporary name and renamed, so no
half-written NIfTI ever carries its final name.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitalent.catalog import Catalog, GlobalClass
from multitalent.inference.export import InverseGeometry, class_region, restore_label_map, restore_mask
from multitalent.inference.model import LoadedModel
from multitalent.inference.probability_store import SparseProbabilities
from multitalent.preprocess import preprocess_image
from multitalent.rawio import read_volume

# spacing further than this factor from the plan's (either way) earns a warning
SPACING_WARN_FACTOR = 3.0
# voxel axes further than this from the nearest world axis (degrees) earn a warning
OBLIQUE_WARN_DEG = 10.0
# the ring of patch rows the sliding window blends in is kept in float16 past this size (float32 below)
FLOAT32_BAND_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class PredictSettings:
    """Inference settings (``--step``, ``--no-mirror``, ``--device``, ...).

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. ``precision``: ``auto``
    (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
    """

    step: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 2
    device: str = "auto"
    precision: str = "auto"
    threshold: float = 0.5

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} asked for, but CUDA is not available")
        return self.device

    def resolved_precision(self, device: str) -> str:
        if self.precision == "auto":
            return "bf16" if device.startswith("cuda") else "fp32"
        return self.precision


def select_classes(
    catalog: Catalog, *, datasets: Sequence[str] | None = None, classes: Sequence[str] | None = None
) -> list[GlobalClass]:
    """The global classes to predict: all, those of ``datasets``, or those named in ``classes``.

    ``classes`` entries are ``"<dataset>:<class>"`` keys or bare class names (every dataset's class of
    that name). Raises ``ValueError`` naming unknown datasets or classes.
    """
    selected = list(catalog.classes)
    if datasets:
        unknown = sorted(set(datasets) - set(catalog.dataset_ids))
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; the model knows {list(catalog.dataset_ids)}")
        selected = [c for c in selected if c.dataset_id in set(datasets)]
    if classes:
        wanted = set(classes)
        matched = {w for w in wanted for c in selected if w in (c.key, c.name)}
        if wanted - matched:
            raise ValueError(
                f"unknown classes {sorted(wanted - matched)}; use '<dataset>:<class>' keys, e.g. "
                f"{selected[0].key!r}"
            )
        selected = [c for c in selected if c.key in wanted or c.name in wanted]
    if not selected:
        raise ValueError("no class selected")
    return selected


def geometry_warnings(
    affine: np.ndarray, spacing_zyx_mm: Sequence[float], target_zyx_mm: Sequence[float]
) -> list[str]:
    """Warnings for a scan far from what the model was trained on."""
    out = []
    for name, s, t in zip("zyx", spacing_zyx_mm, target_zyx_mm):
        if s > t * SPACING_WARN_FACTOR or s < t / SPACING_WARN_FACTOR:
            out.append(
                f"spacing {name} {s:.3g} mm is far from the plan's {t:.3g} mm: the scan is resampled "
                f"by {s / t:.3g}x along {name}; predictions may be poor"
            )
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    cols = a / np.linalg.norm(a, axis=0)
    worst = float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0), -1, 1))).max())
    if worst > OBLIQUE_WARN_DEG:
        out.append(
            f"oblique scan: a voxel axis is {worst:.0f} degrees from the nearest world axis; it is "
            "reoriented to the closest axes, not resampled, as in training"
        )
    return out


@dataclass
class CasePrediction:
    """Probabilities of the selected classes on the preprocessed grid, and the way back."""

    probs_kzyx: SparseProbabilities  # (K_selected, z, y, x), each class kept only where it is not ~0
    classes: list[GlobalClass]
    geometry: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Predictor:
    """One loaded model, reused for many scans."""

    def __init__(
        self,
        model: LoadedModel,
        settings: PredictSettings | None = None,
        *,
        lr_permutation: Sequence[int] | None = None,
    ) -> None:
        """``lr_permutation``: optional ``(K,)`` channel permutation applied after flipping back along
        the left-right axis (left/right class pairs of the catalog), see ``mirrored_probabilities``."""
        self.model = model
        self.settings = settings or PredictSettings()
        self.device = self.settings.resolved_device()
        self.precision = self.settings.resolved_precision(self.device)
        self.lr_permutation = None if lr_permutation is None else list(lr_permutation)
        model.network.to(self.device)

    @property
    def catalog(self) -> Catalog:
        return self.model.catalog

    def predict(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        *,
        classes: Sequence[GlobalClass],
        name: str = "case",
        progress: Callable[[int, int], None] | None = None,
    ) -> CasePrediction:
        """Probabilities of ``classes`` for a stored ``(i, j, k)`` image and its affine."""
        import torch

        from multitalent.inference.sliding_window import SlidingWindowSettings, mirrored_probabilities, stitch

        t0 = time.perf_counter()
        plan = self.model.plan
        image_zyx, _, geometry = preprocess_image(image, affine, plan=plan, name=name)
        spacing = geometry["spacing_before_zyx_mm"]
        warnings = geometry_warnings(affine, spacing, plan.target_spacing_zyx_mm)
        x = torch.from_numpy(plan.normalization.apply(image_zyx))[None].to(self.device)
        on_gpu = self.device.startswith("cuda")
        band_bytes = 4 * len(classes) * self.model.patch_zyx[0] * x.shape[2] * x.shape[3]
        half = on_gpu or band_bytes > FLOAT32_BAND_LIMIT_BYTES
        settings = SlidingWindowSettings(
            patch_zyx=self.model.patch_zyx,
            step=self.settings.step,
            batch_size=self.settings.batch_size,
            pad_value=plan.normalization.air,
            precision=self.precision,
            accumulate_dtype=torch.float16 if half else torch.float32,
        )
        predict = mirrored_probabilities(
            self.model.network,
            mirror_axes=self.settings.mirror_axes,
            lr_permutation=self.lr_permutation,
            channels=[c.index for c in classes],
        )
        probs = SparseProbabilities.empty(len(classes), x.shape[1:])
        stitch(predict, x, settings, sink=probs.add_slab, progress=progress)
        return CasePrediction(probs, list(classes), geometry, warnings, time.perf_counter() - t0)

    def predict_file(
        self,
        image_path: Path,
        out_dir: Path,
        *,
        classes: Sequence[GlobalClass],
        masks: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Predict ``image_path`` and write its outputs into ``out_dir``; returns the case's record.

        Raises:
            CaseError: the input is unreadable, not NIfTI or not 3-D (the message names the file).
            PreprocessError: the image cannot be preprocessed (bad affine, NaN voxels).
        """
        import nibabel as nib

        t0 = time.perf_counter()
        image, affine = read_volume(Path(image_path))
        header = nib.load(image_path).header
        pred = self.predict(
            np.asarray(image, dtype=np.float32), affine, classes=classes, name=str(image_path)
        )
        t_net = time.perf_counter() - t0
        geometry = InverseGeometry.from_record(pred.geometry)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        found: dict[str, list[str]] = {}
        by_dataset: dict[str, list[int]] = {}
        for j, c in enumerate(pred.classes):
            by_dataset.setdefault(c.dataset_id, []).append(j)
        for dataset_id, channels in by_dataset.items():
            values = [pred.classes[j].raw_values for j in channels]
            result = restore_label_map(
                pred.probs_kzyx.select(channels), values, geometry, threshold=self.settings.threshold
            )
            write_like(result.label, header, out_dir / f"{dataset_id}.nii.gz")
            written.append(f"{dataset_id}.nii.gz")
            found[dataset_id] = [pred.classes[j].name for j, n in zip(channels, result.voxels_per_class) if n]
            if masks:
                for j in channels:
                    c = pred.classes[j]
                    origin, region = class_region(pred.probs_kzyx, j)
                    mask = restore_mask(
                        region, geometry, threshold=self.settings.threshold, origin_zyx=origin
                    )
                    rel = f"{dataset_id}/{safe_name(c.name)}.nii.gz"
                    write_like(mask, header, out_dir / rel)
                    written.append(rel)
        return {
            "input": str(image_path),
            "files": written,
            "classes_found": found,
            "warnings": pred.warnings,
            "shape": [int(n) for n in image.shape],
            "seconds": round(time.perf_counter() - t0, 3),
            "seconds_network": round(t_net, 3),
        }


def safe_name(name: str) -> str:
    """A class name as a file name: spaces and path characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def write_like(data: np.ndarray, header: Any, path: Path) -> None:
    """Write ``data`` (uint8) with the input's header: same shape, affine, qform/sform and their codes.

    Written to a hidden temporary sibling, then renamed: the final name never holds a partial file.
    """
    import nibabel as nib

    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), None, header=hdr)
    img.header.set_qform(qform if qform is not None else header.get_best_affine(), code=int(qcode))
    img.header.set_sform(sform if sform is not None else header.get_best_affine(), code=int(scode))
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        nib.save(img, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
