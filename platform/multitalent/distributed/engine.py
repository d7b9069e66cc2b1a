"""The DeepSpeed engine in a worker whose process group already exists (Ray Train made it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def prepare_deepspeed_env(*, use_gpu: bool) -> None:
    """Process-wide settings DeepSpeed reads at import/initialise time; call before importing it.

    On CPU: ``DS_ACCELERATOR=cpu`` (no auto-detect warning), and the shared-memory comm op is marked
    incompatible so ``initialize`` does not JIT-compile it with g++ (~23 s, and no compiler on some
    hosts); gloo is used instead.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config: Mapping[str, Any],
    use_gpu: bool,
) -> Any:
    """``deepspeed.initialize`` with a torch optimizer object; returns the engine.

    The torch.distributed process group must exist (Ray Train's TorchTrainer creates it: gloo on CPU,
    NCCL on GPU); DeepSpeed reuses it. ``LOCAL_RANK`` must be set (Ray sets it).
    """
    prepare_deepspeed_env(use_gpu=use_gpu)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(config))
    return engine


def full_state_dict(engine: Any, *, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on CPU (on rank 0; ``None`` elsewhere under ZeRO-3).

    Call on every rank: under ZeRO-3 the parameters are partitioned and gathering them is collective.
    """
    import torch.distributed as dist

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        if dist.get_rank() != 0:
            return None
    else:
        state = engine.module.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
