"""The one distributed piece the losses need: a differentiable all-reduce sum, built by the caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def all_reduce_sum(group: Any = None) -> Callable[[Tensor], Tensor]:
    """A ``reduce`` for :class:`PartialLabelLoss` under data parallelism (DDP, DeepSpeed).

    Sums a tensor over the ranks of ``group`` (default: the world) and is differentiable: its backward
    sums the incoming gradients over the ranks too, so the gradient reaching a rank's own statistics is
    that of the sum of all ranks' (identical) losses, i.e. ``world_size`` x the single-process gradient;
    the usual gradient averaging (/ ``world_size``) then yields exactly the single-process gradient.
    An in-place ``torch.distributed.all_reduce`` must not be used instead: it is invisible to autograd,
    so each rank would only see its own samples' share of the Dice gradient.
    """
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as fc

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_sum: torch.distributed is not initialised (init_process_group first)")
    pg: Any = dist.group.WORLD if group is None else group

    def reduce(t: Tensor) -> Tensor:
        out = fc.wait_tensor(fc.all_reduce(t, "sum", pg))
        if t.requires_grad and not out.requires_grad:
            raise RuntimeError("all_reduce_sum: this torch's all_reduce is not differentiable")
        return out

    return reduce
