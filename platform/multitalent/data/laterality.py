"""Mirroring that keeps laterality: for training augmentation and for test-time augmentation.

Arrays are ``(z, y, x)`` in RAS+ voxel order (docs/contracts.md), so the left-right axis is x: the
last axis of ``label_bzyx``, ``image_bczyx`` and ``outputs_bkzyx``. Mirroring along x moves the left
kidney to where the right one was; mirroring along z or y leaves every structure on its side.

The job setting ``data.augmentation.laterality`` chooses one of :data:`LATERALITY_MODES`:

- ``swap`` (default): mirror along x as configured and swap each lateral pair's targets in the
  mirrored samples, by permuting the samples' raw label values before they become targets
  (:func:`multitalent.catalog.mirror_label_lut`; regions are unions of raw values, so permuting the
  parts swaps the regions too). Samples of datasets with sided classes (a side, no counterpart) are
  not mirrored along x. Without pairs or sided classes in the catalog it is ``naive``.
- ``off``: no mirroring along x (TotalSegmentator's choice); z and y as configured.
- ``naive``: mirror along x and keep the labels (nnU-Net's and the MultiTalent reference's
  behaviour): a mirrored left kidney is still called "left kidney" on the right side.

``swap`` and ``naive`` break different cues. A network sees a patch, not its absolute position: it
tells left from right by anatomy (the liver is beside the right kidney) and by position within the
body (the body wall on one side). ``naive`` keeps labels with the organ (anatomy consistent,
position contradicted in mirrored samples); ``swap`` keeps labels with the side (position consistent,
but a mirrored sample is a situs-inversus body that test data never shows); ``off`` keeps both.
Which matters more is empirical (``bench/bench_laterality.py``, docs/results.md): on the phantom,
``naive`` loses on the paired classes (each lung head fires on both lungs) while ``swap`` and ``off``
handle them alike; ``off``'s further lead in short runs is shared by unpaired classes (less
augmentation converging faster), so ``swap`` stays the default.

For test-time augmentation, :func:`unmirror_outputs` maps the per-class outputs of a mirrored input
back to the input's frame (flip, then swap the paired channels); averaging it over mirror
combinations is mirror TTA with laterality kept. Match the training mode: ``swap`` -> x-mirror TTA
with the swap; ``naive`` -> x-mirror TTA without it (nnU-Net's TTA; the net follows the organ);
``off`` -> no x-mirroring at test time (the net never saw a mirrored body).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from multitalent.catalog import Catalog

# AugmentConfig / AugmentParams (multitalent.data.augment_params) hold a MirrorSwap, so this module
# names them without importing them: the import runs one way, augment_params -> laterality.
AugmentConfig = Any
AugmentParams = Any

Laterality = Literal["swap", "off", "naive"]
LATERALITY_MODES: tuple[str, ...] = ("swap", "off", "naive")
X_AXIS = 2  # index of x in (z, y, x); RAS+ voxel axes, docs/contracts.md


@dataclass(frozen=True)
class MirrorSwap:
    """What mirroring along x does to raw labels (``laterality: swap``), as plain tuples so the
    augmentation config stays hashable and picklable.

    ``label_lut_dv[d][v]``: raw value ``v`` of dataset ``d`` in a sample mirrored along x;
    ``allowed_d[d]``: whether samples of dataset ``d`` may be mirrored along x at all.
    """

    label_lut_dv: tuple[tuple[int, ...], ...]
    allowed_d: tuple[bool, ...]

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> MirrorSwap | None:
        """None when the catalog declares no lateral pairs and no sided classes (nothing to do)."""
        from multitalent.catalog.laterality import has_laterality, mirror_allowed, mirror_label_lut

        if not has_laterality(catalog):
            return None
        lut = mirror_label_lut(catalog)
        return cls(
            tuple(tuple(int(v) for v in row) for row in lut), tuple(bool(a) for a in mirror_allowed(catalog))
        )

    def restrict(self, params: AugmentParams, dataset_idx_b: Tensor) -> AugmentParams:
        """``params`` with mirroring along x switched off for samples of datasets that may not be
        mirrored (datasets with sided classes)."""
        allowed_b = torch.tensor(self.allowed_d, dtype=torch.bool)[dataset_idx_b.cpu().long()]
        if bool(allowed_b.all()):
            return params
        mirror = params.mirror_b3.clone()
        mirror[:, X_AXIS] &= allowed_b
        return replace(params, mirror_b3=mirror)

    def swap_labels(self, label_bzyx: Tensor, dataset_idx_b: Tensor, mirrored_b: Tensor) -> Tensor:
        """Raw label maps of the samples mirrored along x (``mirrored_b``) with their pairs' values
        swapped; other samples unchanged. Same dtype and device as ``label_bzyx``."""
        lut = torch.tensor(self.label_lut_dv, dtype=torch.long)
        rows = lut[dataset_idx_b.cpu().long()]  # (B, V)
        identity = torch.arange(lut.shape[1], dtype=torch.long)
        rows = torch.where(mirrored_b.cpu().bool()[:, None], rows, identity[None, :])
        if bool((rows == identity).all()):
            return label_bzyx
        b = label_bzyx.shape[0]
        flat = label_bzyx.reshape(b, -1).long()
        out = torch.gather(rows.to(label_bzyx.device), 1, flat)
        return out.reshape(label_bzyx.shape).to(label_bzyx.dtype)


def laterality_config(config: AugmentConfig, mode: str, catalog: Catalog | None) -> AugmentConfig:
    """The augmentation config of a laterality mode (see the module docstring).

    Raises:
        ValueError: an unknown mode, or ``swap`` without a catalog.
    """
    if mode not in LATERALITY_MODES:
        raise ValueError(f"laterality {mode!r} is not one of {', '.join(LATERALITY_MODES)}")
    if mode == "naive":
        return replace(config, mirror_swap=None)
    if mode == "off":
        z, y, _ = config.p_mirror_zyx
        return replace(config, p_mirror_zyx=(z, y, 0.0), mirror_swap=None)
    if catalog is None:
        raise ValueError("laterality 'swap' needs the catalog (its lateral pairs)")
    return replace(config, mirror_swap=MirrorSwap.from_catalog(catalog))


def unmirror_outputs(
    outputs_bkzyx: Tensor, *, mirrored_zyx: Sequence[bool], swap_k: Tensor | Sequence[int] | None
) -> Tensor:
    """Per-class outputs of a mirrored input, in the frame and channel order of the unmirrored input.

    Flips back the axes in ``mirrored_zyx`` and, when x was mirrored, permutes the channels with
    ``swap_k`` (:func:`multitalent.catalog.lateral_swap`): the mirrored input's "left kidney"
    channel lies on the original's right kidney. Channel permutation commutes with the flip.
    Sided classes (:func:`multitalent.catalog.sided_classes`) have no counterpart; leave them out
    of x-mirrored averages.

    Args:
        outputs_bkzyx: (B, K, Z, Y, X) logits or probabilities of the mirrored input.
        mirrored_zyx: which of z, y, x were mirrored in the input.
        swap_k: (K,) channel permutation; None keeps the channels (the ``naive`` behaviour).

    Returns:
        A new tensor of the same shape, dtype and device.

    Raises:
        ValueError: not 5-D, three flags not given, or ``swap_k`` not a permutation of K channels.
    """
    if outputs_bkzyx.ndim != 5:
        raise ValueError(
            f"unmirror_outputs: outputs must be (B, K, Z, Y, X), got {tuple(outputs_bkzyx.shape)}"
        )
    flags = [bool(m) for m in mirrored_zyx]
    if len(flags) != 3:
        raise ValueError(f"unmirror_outputs: mirrored_zyx needs 3 flags (z, y, x), got {list(mirrored_zyx)}")
    dims = [2 + a for a in range(3) if flags[a]]
    out = outputs_bkzyx.flip(dims) if dims else outputs_bkzyx.clone()
    if swap_k is None or not flags[X_AXIS]:
        return out
    perm = torch.as_tensor(swap_k, dtype=torch.long)
    k = outputs_bkzyx.shape[1]
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k)):
        raise ValueError(
            f"unmirror_outputs: swap_k must be a permutation of {k} channels, got {perm.tolist()}"
        )
    return out[:, perm.to(out.device)]
