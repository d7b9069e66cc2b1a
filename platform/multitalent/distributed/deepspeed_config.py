"""The DeepSpeed configuration, derived from plain settings (:class:`DeepSpeedSettings`).

Each value has exactly one source: the settings, which the caller fills from its job file
(:func:`multitalent.train.components.deepspeed_settings`). A pass-through mapping adds other
DeepSpeed options (e.g. ``zero_optimization.overlap_comm``), but a key that is already derived is an
error naming the key and the setting that owns it: a second source of the same value would silently
win or lose depending on merge order.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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


# The setting each derived key comes from, for error messages; a caller with its own names for
# them (a job file) passes ``DeepSpeedSettings.owners``.
DERIVED_KEYS = {
    "train_batch_size": "global_batch",
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_accumulation_steps": "(always 1)",
    "gradient_clipping": "grad_clip",
    "zero_optimization.stage": "zero_stage",
    "bf16.enabled": "precision",
    "zero_allow_untested_optimizer": "(always true: the trainer passes a torch optimizer)",
    "steps_per_print": "(never: the trainer logs; DeepSpeed's own prints are noise)",
    "wall_clock_breakdown": "(always false)",
}


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What the DeepSpeed configuration is derived from.

    ``precision`` is ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``; ``passthrough`` is merged
    on top (derived keys are errors); ``owners`` maps a derived dotted key to the name of the setting
    that owns it in the caller's configuration (defaults: :data:`DERIVED_KEYS`).
    """

    global_batch: int
    micro_batch: int
    grad_clip: float
    zero_stage: int
    precision: str = "auto"
    use_gpu: bool = False
    passthrough: Mapping[str, Any] = field(default_factory=dict)
    owners: Mapping[str, str] = field(default_factory=dict)


def derived_config(settings: DeepSpeedSettings) -> tuple[dict[str, Any], dict[str, str]]:
    """``(config, owners)``: the derived DeepSpeed values and, per dotted key, the setting it comes
    from."""
    precision = resolve_precision(settings.precision, use_gpu=settings.use_gpu)
    config: dict[str, Any] = {
        "train_batch_size": settings.global_batch,
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed prints a progress report every ``steps_per_print`` steps; 2**31 - 1 means never.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return config, {**DERIVED_KEYS, **settings.owners}


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


def derive_deepspeed_config(settings: DeepSpeedSettings) -> dict[str, Any]:
    """The DeepSpeed config dict of ``settings`` (see the module docstring).

    Raises:
        DeepSpeedConfigError: the pass-through sets a derived or trainer-owned key.
    """
    config, owners = derived_config(settings)
    _merge_passthrough(config, settings.passthrough, owners)
    return config
