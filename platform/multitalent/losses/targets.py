"""Per-class binary targets from raw label maps, built where the batch lands (GPU)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def targets_from_labels(
    label_bzyx: Tensor, dataset_idx_b: Tensor, region_lut_dvk: Tensor | np.ndarray
) -> Tensor:
    """``target[b, k, ...] = region_lut_dvk[dataset_idx_b[b], label_bzyx[b, ...], k]``.

    Args:
        label_bzyx: (B, *spatial) raw label values of each sample's own dataset (uint8 or any integer).
        dataset_idx_b: (B,) integer index of each sample's dataset in ``catalog.datasets``.
        region_lut_dvk: ``Catalog.region_lut()`` as a bool tensor (convert it once, on the batch's
            device, with ``torch.as_tensor(catalog.region_lut(), device=...)``); a numpy array is
            accepted and copied to ``label_bzyx``'s device on every call.

    Returns:
        bool (B, K, *spatial), contiguous, on ``label_bzyx``'s device. A region class (e.g. liver =
        {liver, tumour}) is 1 wherever any of its raw values is; classes of other datasets are 0.

    Raises:
        TypeError / ValueError for wrong dtypes or shapes. Label values above the LUT's range are not
        checked here (that needs a host sync): the loaders validate labels against the catalog, and on
        the CPU ``torch.gather`` raises for them.
    """
    lut = check_label_inputs(label_bzyx, dataset_idx_b, region_lut_dvk, where="targets_from_labels")
    b = label_bzyx.shape[0]
    spatial = label_bzyx.shape[1:]
    k = lut.shape[2]
    lut_bkv = lut[dataset_idx_b.to(device=lut.device, dtype=torch.long)].transpose(1, 2)  # (B, K, V), tiny
    index = label_bzyx.reshape(b, 1, -1).to(torch.long).expand(b, k, -1)
    return torch.gather(lut_bkv, 2, index).reshape(b, k, *spatial)


def check_label_inputs(
    label_bzyx: Tensor, dataset_idx_b: Tensor, region_lut_dvk: Tensor | np.ndarray, *, where: str
) -> Tensor:
    """The region table as a bool tensor on the labels' device, after checking the three inputs' dtypes
    and shapes (``ValueError``/``TypeError`` naming ``where``)."""
    lut = torch.as_tensor(region_lut_dvk, device=label_bzyx.device)
    if lut.ndim != 3:
        raise ValueError(
            f"{where}: region_lut_dvk must be (datasets, values, classes), got {tuple(lut.shape)}"
        )
    if lut.dtype != torch.bool:
        raise TypeError(f"{where}: region_lut_dvk must be bool, got {lut.dtype}")
    if label_bzyx.is_floating_point() or label_bzyx.is_complex() or label_bzyx.dtype == torch.bool:
        raise TypeError(f"{where}: label_bzyx must hold integer raw label values, got {label_bzyx.dtype}")
    if dataset_idx_b.is_floating_point() or dataset_idx_b.dtype == torch.bool:
        raise TypeError(f"{where}: dataset_idx_b must be integer, got {dataset_idx_b.dtype}")
    if label_bzyx.ndim < 2:
        raise ValueError(f"{where}: label_bzyx must be (B, *spatial), got shape {tuple(label_bzyx.shape)}")
    b = label_bzyx.shape[0]
    if tuple(dataset_idx_b.shape) != (b,):
        raise ValueError(f"{where}: dataset_idx_b shape {tuple(dataset_idx_b.shape)} != (B,) = ({b},)")
    return lut
