"""The DeepSpeed configuration, derived from the training job.

Each value has exactly one source: the job's fields. The job's ``deepspeed:`` section passes other
DeepSpeed options through (e.g. ``zero_optimization.overlap_comm``), but a key that is already derived
from the job is an error naming the key and the job field to set instead: a second source of the same
value would silently win or lose depending on merge order.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from multitalent.train.job import TrainJob

Precision = Literal["fp32", "bf16"]

# Keys the trainer owns entirely: it passes its own optimizer object and sets the lr per iteration.
_OWNED = {
    "optimizer": "optimiser (the trainer passes a torch optimizer object)",
    "scheduler": "schedule (the poly schedule is the trainer's)",
    "fp16": "precision (fp16 is not supported; use bf16 or fp32)",
    "amp": "precision",
}


class DeepSpeedConfigError(ValueError):
    """A ``deepspeed:`` pass-through key that conflicts with a value derived from the job."""


def resolve_precision(precision: str, *, use_gpu: bool) -> Precision:
    """``auto`` is bf16 on GPU and fp32 on CPU (several CPU kernels, e.g. AvgPool3d, lack bf16)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision  # type: ignore[return-value]


def derived_config(job: TrainJob) -> tuple[dict[str, Any], dict[str, str]]:
    """``(config, sources)``: the derived DeepSpeed values and, per dotted key, the job field it
    comes from."""
    precision = resolve_precision(job.precision, use_gpu=job.workers.use_gpu)
    config: dict[str, Any] = {
        "train_batch_size": job.batch.global_size,
        "train_micro_batch_size_per_gpu": job.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": job.optimiser.grad_clip,
        "zero_optimization": {"stage": job.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed prints a progress report every ``steps_per_print`` steps; 2**31 - 1 means never.
        # The trainer logs (every tracking.log_every iterations); DeepSpeed's own prints are noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    sources = {
        "train_batch_size": "batch.global_size",
        "train_micro_batch_size_per_gpu": "batch.global_size / workers.num_workers",
        "gradient_accumulation_steps": "(always 1)",
        "gradient_clipping": "optimiser.grad_clip",
        "zero_optimization.stage": "zero_stage",
        "bf16.enabled": "precision",
        "zero_allow_untested_optimizer": "(always true: the trainer passes a torch optimizer)",
        "steps_per_print": "(never: the trainer logs every tracking.log_every iterations)",
        "wall_clock_breakdown": "(always false)",
    }
    return config, sources


def _merge_passthrough(
    config: dict[str, Any], extra: Mapping[str, Any], sources: Mapping[str, str], prefix: str = ""
) -> None:
    for key, value in extra.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in _OWNED:
            raise DeepSpeedConfigError(
                f"deepspeed.{dotted}: not allowed in the pass-through section; set {_OWNED[key]}"
            )
        if dotted in sources:
            raise DeepSpeedConfigError(
                f"deepspeed.{dotted}: derived from the job ({sources[dotted]}); "
                "set it there, not in the deepspeed section"
            )
        if isinstance(value, Mapping):
            node = config.setdefault(key, {})
            if not isinstance(node, dict):
                raise DeepSpeedConfigError(f"deepspeed.{dotted}: derived value is not a section")
            _merge_passthrough(node, value, sources, f"{dotted}.")
        else:
            config[key] = copy.deepcopy(value)


def derive_deepspeed_config(job: TrainJob) -> dict[str, Any]:
    """The DeepSpeed config dict of ``job`` (see the module docstring).

    Raises:
        DeepSpeedConfigError: the ``deepspeed:`` section sets a derived or trainer-owned key.
    """
    config, sources = derived_config(job)
    _merge_passthrough(config, job.deepspeed, sources)
    return config
