"""The poly learning-rate schedule and the optimizer it drives."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from multitalent.train.job import OptimiserSection


@dataclass(frozen=True)
class PolySchedule:
    """``lr(i) = base_lr * (1 - epoch(i) / epochs) ** exponent``, ``epoch(i) = i // iterations_per_epoch``.

    Stepped at epoch starts as in nnU-Net, so every iteration of an epoch shares one rate. A pure
    function of the iteration counter: restoring the counter restores the schedule exactly; the
    state dict exists to detect a checkpoint written under another schedule.
    """

    base_lr: float
    epochs: int
    iterations_per_epoch: int
    exponent: float = 0.9

    def __post_init__(self) -> None:
        if self.base_lr <= 0 or self.epochs < 1 or self.iterations_per_epoch < 1 or self.exponent < 0:
            raise ValueError(f"invalid poly schedule {self}")

    def lr_at(self, iteration: int) -> float:
        epoch = min(max(iteration, 0) // self.iterations_per_epoch, self.epochs)
        return self.base_lr * (1.0 - epoch / self.epochs) ** self.exponent

    def apply(self, optimizer: Any, iteration: int) -> float:
        """Set the rate of every parameter group (a torch optimizer or DeepSpeed's wrapper)."""
        lr = self.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_state(self, state: Mapping[str, Any], *, where: str) -> None:
        """Refuse to continue a checkpoint written under another schedule."""
        if dict(state) != self.state_dict():
            raise ValueError(
                f"{where}: the checkpoint's schedule {dict(state)} differs from the job's "
                f"{self.state_dict()}; resume with the job it was written with (or start a new run name)"
            )


def build_optimizer(params: Iterable[Any], config: OptimiserSection) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (paper) or AdamW, at the base rate (the schedule sets it per epoch)."""
    import torch

    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    beta1, beta2 = config.betas
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=(beta1, beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        amsgrad=config.amsgrad,
    )
