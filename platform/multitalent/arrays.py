"""Array conversion shared by every layer (numpy only; torch is never imported here)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any, *, dtype: Any = None) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device, detached and copied to the host)
    or a nested sequence; converted to ``dtype`` when given (a copy only where needed)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
