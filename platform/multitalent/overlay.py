"""Class masks drawn over a grey slice: the class colours and the one overlay renderer.

Used by the validation overlays (``tracking.pictures``) and the augmentation preview
(``data.preview``); numpy only, so any stage may import it.

Class ``k`` (channel ``k`` of a dataset's masks, or raw label value ``k + 1`` of a label map) is
drawn in ``PALETTE[k % len(PALETTE)]``: a translucent fill (``FILL_ALPHA``) where its fill mask is
set, then a solid outline along the border of its outline mask. A border is where a pixel of the
mask has a 4-neighbour inside the slice outside the mask; the slice's own edge is not a border (a
structure cut by the field of view is not outlined there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FILL_ALPHA = 0.45
# Saturated, mutually distinct colours (class k of a dataset gets PALETTE[k % len(PALETTE)]).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (255, 255, 255),
)


def class_colour(k: int) -> tuple[int, int, int]:
    """RGB of class channel ``k``."""
    return PALETTE[k % len(PALETTE)]


def label_masks(label_yx: Any) -> np.ndarray:
    """One-hot ``(K, Y, X)`` bool masks of an integer label map: channel ``k`` is label value ``k + 1``
    and ``K`` the largest value (0 is background and gets no channel)."""
    labels = np.asarray(label_yx).astype(np.int64)
    k = max(int(labels.max(initial=0)), 0)
    return labels[None] == np.arange(1, k + 1, dtype=np.int64)[:, None, None]


def outline(mask_yx: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask_yx`` within ``width`` steps (4-neighbourhood) of its border in the slice."""
    inner = mask_yx.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, mode="edge")  # beyond the edge continues the edge: not a border
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask_yx & ~inner


def overlay_slice(
    image_yx: np.ndarray,
    fill_kyx: np.ndarray,
    outline_kyx: np.ndarray,
    *,
    window: tuple[float, float],
    scale: int = 1,
    outline_px: int = 1,
) -> np.ndarray:
    """One RGB slice, uint8 ``(Y * scale, X * scale, 3)``.

    Args:
        image_yx: grey values ``(Y, X)``, mapped linearly from ``window = (lo, hi)`` to 0-255 and clipped.
        fill_kyx / outline_kyx: bool masks ``(K, Y, X)`` (``K`` may differ between the two, e.g. 0):
            filled translucent, then outlined, in class ``k``'s colour; later classes draw on top.
        scale: integer enlargement (nearest); pixel ``(row, col)`` shows ``(row // scale, col // scale)``.
        outline_px: outline width in output pixels (drawn after enlarging).
    """
    lo, hi = window
    grey = np.clip((image_yx.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb = rgb.repeat(scale, 0).repeat(scale, 1)
    for k in range(fill_kyx.shape[0]):
        if fill_kyx[k].any():
            mask = fill_kyx[k].repeat(scale, 0).repeat(scale, 1)
            colour = np.asarray(class_colour(k), dtype=np.float32)
            rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
    for k in range(outline_kyx.shape[0]):
        if outline_kyx[k].any():
            mask = outline_kyx[k].repeat(scale, 0).repeat(scale, 1)
            rgb[outline(mask, outline_px)] = class_colour(k)
    return np.round(rgb).astype(np.uint8)
