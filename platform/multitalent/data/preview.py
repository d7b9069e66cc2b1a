"""``multitalent augment-preview``: a PNG grid of patches before and after augmentation.

Each row shows the mid axial slice of one patch as read (its centre crop) and after
:func:`~multitalent.data.augment.augment_batch`, with the raw label map overlaid in colour and the
applied transforms written above the augmented panel. Patches are read like the loader does: a
larger box (:func:`~multitalent.data.augment.read_shape_zyx`) centred on a random foreground voxel
(or a random voxel when the case has none), padded with air outside the volume.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multitalent.arrays import as_numpy
from multitalent.overlay import label_masks, overlay_slice

if TYPE_CHECKING:
    import torch
    from PIL import Image

_TITLE_LINES = 2
_LINE_PX = 12
_TITLE_PX = _TITLE_LINES * _LINE_PX + 2
_CHAR_PX = 6  # upper bound of a character width in PIL's default font
_MIN_PANEL_PX = 192


def _panel(image_yx: np.ndarray, label_yx: np.ndarray) -> np.ndarray:
    """uint8 (y, x, 3): grey image windowed to its 1st-99th percentile, labels blended, outlines solid
    (label value v in the class colour of channel v - 1, as in the validation overlays)."""
    lo, hi = np.percentile(image_yx, [1, 99]) if image_yx.size else (0.0, 1.0)
    masks_kyx = label_masks(label_yx)
    return overlay_slice(image_yx, masks_kyx, masks_kyx, window=(float(lo), float(hi)))


def render_grid(
    images: Sequence[Any], labels: Sequence[Any], titles: Sequence[str], *, columns: int = 2
) -> Image.Image:
    """One panel per (image, label, title), row-major with ``columns`` panels per row.

    Args:
        images: 2-D (y, x) float arrays or tensors, e.g. mid axial slices.
        labels: integer arrays of the same shapes (0 = background, not drawn).
        titles: one line of text per panel.

    Returns:
        An RGB ``PIL.Image``; panels are upscaled (nearest) to at least 192 px wide.
    """
    from PIL import Image, ImageDraw

    if not len(images) == len(labels) == len(titles) or len(images) == 0:
        raise ValueError(
            f"render_grid: need the same non-zero number of images ({len(images)}), labels ({len(labels)}) "
            f"and titles ({len(titles)})"
        )
    panels: list[np.ndarray] = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        img_yx, lab_yx = as_numpy(img).astype(np.float32), as_numpy(lab)
        if img_yx.ndim != 2 or img_yx.shape != lab_yx.shape:
            raise ValueError(
                f"render_grid: panel {i}: image {img_yx.shape} and label {lab_yx.shape} must be 2-D alike"
            )
        panels.append(_panel(img_yx, lab_yx))
    height = max(p.shape[0] for p in panels)
    width = max(p.shape[1] for p in panels)
    zoom = max(1, -(-_MIN_PANEL_PX // width))
    cell_h, cell_w = height * zoom + _TITLE_PX, width * zoom
    rows = -(-len(panels) // columns)
    canvas = Image.new(
        "RGB", (columns * cell_w + (columns - 1) * 2, rows * cell_h + (rows - 1) * 2), (0, 0, 0)
    )
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        r, c = divmod(i, columns)
        x0, y0 = c * (cell_w + 2), r * (cell_h + 2)
        tile = Image.fromarray(panel).resize(
            (panel.shape[1] * zoom, panel.shape[0] * zoom), Image.Resampling.NEAREST
        )
        canvas.paste(tile, (x0, y0 + _TITLE_PX))
        lines = textwrap.wrap(title, width=max(8, cell_w // _CHAR_PX - 1)) or [""]
        if len(lines) > _TITLE_LINES:
            lines = [*lines[: _TITLE_LINES - 1], lines[_TITLE_LINES - 1][:-3] + "..."]
        for k, line in enumerate(lines):
            draw.text((x0 + 2, y0 + 1 + k * _LINE_PX), line, fill=(255, 255, 255))
    return canvas


def _load_patches(
    shards_dir: Path, n: int, patch: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read ``n`` patches of the loader's read size for ``patch`` from the Zarr stores of a collection.

    Returns ``(image_bczyx float32 normalised, label_bzyx uint8, keys)``; cases are drawn uniformly
    with replacement. Normalisation ``(clip(x, lo, hi) - mean) / std`` comes from the collection's plan.

    Raises:
        PlanError / FileNotFoundError / ValueError naming the file when the plan or the stores are
        missing or bad.
    """
    import torch

    from multitalent.data.augment import AugmentConfig, read_shape_zyx
    from multitalent.data.sources import extract_patch
    from multitalent.preprocess.plan import PLAN_FILE, Plan
    from multitalent.shards import open_case_zarr

    plan_path = shards_dir / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path}: no {PLAN_FILE} (is --shards a converted output folder?)")
    normalization = Plan.load(plan_path).normalization
    stores = sorted((shards_dir / "zarr").glob("*/*.zarr"))
    if not stores:
        raise FileNotFoundError(f"{shards_dir / 'zarr'}: no case stores <dataset_id>/<case_id>.zarr")
    rng = np.random.default_rng(seed)
    read = read_shape_zyx(patch, AugmentConfig())
    images, labels, keys = [], [], []
    for store in rng.choice(len(stores), size=n, replace=True):
        case = open_case_zarr(stores[int(store)])
        shape = case.image.shape
        fg = np.asarray(case.fg_locations)
        # a foreground centre, as the loader's oversampling does, so the overlay has something to show
        if len(fg):
            center = [int(v) for v in fg[rng.integers(len(fg)), 1:4]]
        else:
            center = [int(rng.integers(s)) for s in shape]
        image_czyx, label_zyx = extract_patch(case.image, case.label, center, read, normalization)
        images.append(image_czyx[0])
        labels.append(label_zyx)
        keys.append(case.key)
    return (
        torch.from_numpy(np.stack(images))[:, None],
        torch.from_numpy(np.stack(labels).astype(np.uint8)),
        keys,
    )


def _parse_patch(text: str) -> tuple[int, int, int]:
    try:
        z, y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--patch {text!r}: expected three integers z,y,x") from None
    if min(z, y, x) < 1:
        raise ValueError(f"--patch {text!r}: sizes must be positive")
    return (z, y, x)


def preview(
    image_bczyx: torch.Tensor,
    label_bzyx: torch.Tensor,
    keys: Sequence[str],
    *,
    patch: tuple[int, int, int],
    seed: int,
) -> Image.Image:
    """Augment the patches with the default config and render originals beside augmented versions."""
    import torch

    from multitalent.data.augment import AugmentConfig, AugmentParams, apply_params, sample_params

    batch, channels = image_bczyx.shape[:2]
    params = sample_params(AugmentConfig(), batch, torch.Generator().manual_seed(seed), n_channels=channels)
    crop_img, crop_lab = apply_params(
        image_bczyx, label_bzyx, AugmentParams.identity(batch, channels), out_shape_zyx=patch
    )
    aug_img, aug_lab = apply_params(image_bczyx, label_bzyx, params, out_shape_zyx=patch)
    mid = patch[0] // 2
    images, labels, titles = [], [], []
    for b in range(batch):
        images += [crop_img[b, 0, mid], aug_img[b, 0, mid]]
        labels += [crop_lab[b, mid], aug_lab[b, mid]]
        titles += [keys[b], params.describe(b)]
    return render_grid(images, labels, titles)


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``--shards DIR --out grid.png [--n 8] [--patch 48,96,96] [--seed 0]``."""
    patch = _parse_patch(args.patch)
    if args.n < 1:
        raise ValueError(f"--n {args.n}: need at least one patch")
    image, label, keys = _load_patches(Path(args.shards), args.n, patch, args.seed)
    grid = preview(image, label, keys, patch=patch, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({args.n} patches, {grid.width}x{grid.height} px)")
    return 0
