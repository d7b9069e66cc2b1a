"""Pictures for the tracking UI: validation overlays and training curves.

Pillow and matplotlib are imported inside the functions. Overlays are drawn with numpy and Pillow
only (no pyplot state, no backend switching), so they are safe in worker processes.

Overlay layout (``overlay_png``): one panel per chosen axial slice, left to right, each
``GAP_PX`` apart and below a ``TITLE_PX`` strip; panel pixel ``(row, col)`` shows voxel
``(y, x) = (row // scale, col // scale)`` with ``scale = max(1, panel_px // max(Y, X))``; the
legend sits under the panels. Ground truth is a translucent fill, prediction a solid outline,
both in the class colour (drawn by :func:`multitalent.overlay.overlay_slice`, shared with the
augmentation preview).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from multitalent.overlay import class_colour, overlay_slice

if TYPE_CHECKING:
    from PIL import Image

TITLE_PX = 18
GAP_PX = 6
LEGEND_ROW_PX = 16
LEGEND_COL_PX = 220
BACKGROUND_RGB = (16, 16, 16)
TEXT_RGB = (235, 235, 235)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x: Any) -> np.ndarray:
    a = _numpy(x)
    return a if a.dtype == bool else a > 0.5


def pick_slices(target_kzyx: np.ndarray, pred_kzyx: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` axial indices, ascending, where the ground truth has most foreground.

    Each class's area is measured relative to its own largest cross-section, so a small tumour
    counts as much as the liver it sits in, and a class already shown counts a quarter: the picks
    tend to cover every class. Picks keep a minimum distance (neighbouring slices look alike).
    Falls back to the prediction, then to evenly spaced slices, when the case has no foreground.
    """
    nz = target_kzyx.shape[1]
    n = max(1, min(n, nz))
    area_kz = target_kzyx.sum(axis=(2, 3)).astype(np.float64)
    if not area_kz.any():
        area_kz = pred_kzyx.sum(axis=(2, 3)).astype(np.float64)
    if not area_kz.any():
        return sorted({round(v) for v in np.linspace(0, nz - 1, n + 2)[1:-1]})
    area_kz /= np.maximum(area_kz.max(axis=1, keepdims=True), 1.0)
    candidates = np.flatnonzero(area_kz.any(axis=0))
    min_gap = max(1, (candidates[-1] - candidates[0] + 1) // (2 * n))
    weight_k = np.ones(area_kz.shape[0])
    chosen: list[int] = []
    while len(chosen) < n:
        allowed = [int(z) for z in candidates if all(abs(int(z) - c) >= min_gap for c in chosen)]
        if not allowed:
            break
        score_z = weight_k @ area_kz[:, allowed]
        z = allowed[int(np.argmax(score_z))]  # ties: the lowest z
        chosen.append(z)
        weight_k[area_kz[:, z] > 0] = 0.25
    return sorted(chosen)


def _window(image_zyx: np.ndarray) -> tuple[float, float]:
    sample = image_zyx[::2, ::2, ::2].astype(np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0)
    return float(lo), (float(hi) if hi > lo else float(lo) + 1.0)


def _case_dice(pred: np.ndarray, target: np.ndarray) -> float | None:
    denom = int(pred.sum()) + int(target.sum())
    return 2.0 * int((pred & target).sum()) / denom if denom else None


def overlay_png(
    image_zyx: Any,
    pred_kzyx: Any,
    target_kzyx: Any,
    class_names: Sequence[str],
    *,
    slices: int = 3,
    panel_px: int = 256,
    title: str | None = None,
) -> Image.Image:
    """Axial slices of one validation case with ground truth and prediction per class.

    Args:
        image_zyx: the (normalised or HU) image ``(Z, Y, X)``; windowed to its 0.5-99.5 percentiles.
        pred_kzyx / target_kzyx: binary masks ``(K, Z, Y, X)`` of the case's dataset's ``K`` classes
            (bool, or probabilities/0-1 values binarised at 0.5); numpy or torch.
        class_names: ``K`` names, in channel order; colours follow this order.
        slices: number of axial slices, picked where the ground truth has most foreground.
        panel_px: target panel edge; slices are enlarged by an integer factor up to it.
        title: optional text above the legend (e.g. ``"03 / case_007, epoch 12"``).

    Raises:
        ValueError: when shapes disagree.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = _numpy(image_zyx)
    pred, target = _binary(pred_kzyx), _binary(target_kzyx)
    if image.ndim != 3:
        raise ValueError(f"overlay_png: image_zyx must be 3-D, got shape {image.shape}")
    for name, m in (("pred_kzyx", pred), ("target_kzyx", target)):
        if m.ndim != 4 or m.shape[1:] != image.shape:
            raise ValueError(f"overlay_png: {name} shape {m.shape} != (K, *{image.shape})")
    if pred.shape[0] != target.shape[0] or len(class_names) != pred.shape[0]:
        raise ValueError(
            f"overlay_png: {pred.shape[0]} prediction channels, {target.shape[0]} target channels, "
            f"{len(class_names)} class names"
        )

    zs = pick_slices(target, pred, slices)
    _, ny, nx = image.shape
    scale = max(1, panel_px // max(ny, nx))
    outline_px = 1 if scale < 4 else 2
    lo, hi = _window(image)
    panels = [
        overlay_slice(image[z], target[:, z], pred[:, z], window=(lo, hi), scale=scale, outline_px=outline_px)
        for z in zs
    ]

    present = [k for k in range(len(class_names)) if pred[k].any() or target[k].any()]
    legend: list[tuple[tuple[int, int, int] | None, str]] = [
        (class_colour(k), _legend_text(class_names[k], pred[k], target[k])) for k in present
    ]
    legend.append((None, "fill = ground truth, outline = prediction"))
    if title:
        legend.insert(0, (None, title))

    width = len(panels) * (nx * scale) + (len(panels) - 1) * GAP_PX
    per_column = max(1, math.ceil(len(legend) / max(1, width // LEGEND_COL_PX)))
    columns = math.ceil(len(legend) / per_column)
    width = max(width, columns * LEGEND_COL_PX)
    height = TITLE_PX + ny * scale + GAP_PX + per_column * LEGEND_ROW_PX + GAP_PX

    canvas = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (z, panel) in enumerate(zip(zs, panels)):
        left = i * (nx * scale + GAP_PX)
        canvas.paste(Image.fromarray(panel, "RGB"), (left, TITLE_PX))
        draw.text((left + 2, 3), f"z={z}", fill=TEXT_RGB, font=font)
    top = TITLE_PX + ny * scale + GAP_PX
    for j, (colour, text) in enumerate(legend):
        x0 = (j // per_column) * LEGEND_COL_PX
        y0 = top + (j % per_column) * LEGEND_ROW_PX
        if colour is not None:
            draw.rectangle((x0 + 2, y0 + 3, x0 + 12, y0 + 13), fill=colour)
        draw.text((x0 + 16, y0 + 2), text, fill=TEXT_RGB, font=font)
    return canvas


def _legend_text(name: str, pred: np.ndarray, target: np.ndarray) -> str:
    dice = _case_dice(pred, target)
    return f"{name}  Dice {dice:.2f}" if dice is not None else name


def curves_png(
    history: Mapping[str, Sequence[tuple[int, float]]],
    *,
    width_px: int = 1000,
    height_px: int = 400,
) -> Image.Image:
    """Loss and Dice curves: series whose name contains ``"loss"`` on the left panel, the rest
    (Dice, learning rate excluded by the caller) on the right; x is the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    series = {name: sorted(points) for name, points in history.items() if points}
    losses = {n: p for n, p in series.items() if "loss" in n.lower()}
    others = {n: p for n, p in series.items() if n not in losses}
    groups = [(title, group) for title, group in (("loss", losses), ("Dice", others)) if group]

    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    if not groups:
        fig.text(0.5, 0.5, "no data yet", ha="center", va="center")
    for i, (title, group) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for name, points in group.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, linewidth=1.2, marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy(), "RGB")
