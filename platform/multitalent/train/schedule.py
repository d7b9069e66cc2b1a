"""Learning-rate schedules, their phases, and the optimizer each phase drives.

A schedule is a pure function of the iteration counter (stepped at epoch starts, as in nnU-Net), split
into :class:`Phase` s: pre-training has one (``train``); fine-tuning (:class:`FinetuneSchedule`) has
``heads``, ``warmup`` and ``poly``. A phase says which parameters train, which optimiser they get and
whether gradients are clipped; the trainer builds a new optimiser (and DeepSpeed engine) when the phase
changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from multitalent.train.job import OptimiserSection


@dataclass(frozen=True)
class Phase:
    """Iterations ``[start, stop)`` with one optimiser.

    ``trains``: ``heads`` (backbone frozen) or ``all``; ``optimizer``: ``heads_adamw`` (AdamW with
    amsgrad on the heads) or ``job`` (the job's ``optimiser`` section); ``clip``: gradient clipping on.
    """

    name: str
    start: int
    stop: int
    trains: Literal["heads", "all"] = "all"
    optimizer: Literal["heads_adamw", "job"] = "job"
    clip: bool = True


class Schedule(Protocol):
    def lr_at(self, iteration: int) -> float: ...
    def phase_at(self, iteration: int) -> Phase: ...
    def apply(self, optimizer: Any, iteration: int) -> float: ...
    def state_dict(self) -> dict[str, Any]: ...
    def check_state(self, state: Mapping[str, Any], *, where: str) -> None: ...


def _apply(schedule: Schedule, optimizer: Any, iteration: int) -> float:
    lr = schedule.lr_at(iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _check_state(schedule: Schedule, state: Mapping[str, Any], where: str) -> None:
    if dict(state) != schedule.state_dict():
        theirs, ours = dict(sorted(state.items())), dict(sorted(schedule.state_dict().items()))
        raise ValueError(
            f"{where}: the checkpoint's schedule {theirs} differs from the job's {ours}; resume with the job "
            "it was written with (or start a new run name)"
        )


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

    def phase_at(self, iteration: int) -> Phase:
        return Phase("train", 0, self.epochs * self.iterations_per_epoch)

    def apply(self, optimizer: Any, iteration: int) -> float:
        """Set the rate of every parameter group (a torch optimizer or DeepSpeed's wrapper)."""
        return _apply(self, optimizer, iteration)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_state(self, state: Mapping[str, Any], *, where: str) -> None:
        """Refuse to continue a checkpoint written under another schedule."""
        _check_state(self, state, where)


@dataclass(frozen=True)
class FinetuneSchedule:
    """Fine-tuning from a pretrained backbone, epoch ``e = iteration // iterations_per_epoch``:

    ======  ==================  ==============================================================
    phase   epochs              lr
    ======  ==================  ==============================================================
    heads   ``[0, H)``          ``heads_lr * (e + 1) / H``
    warmup  ``[H, H + W)``      ``base_lr * (e - H + 1) / W``
    poly    ``[H + W, epochs)`` ``base_lr * (1 - (e - H - W) / (epochs - H - W)) ** exponent``
    ======  ==================  ==============================================================

    (``H = heads_epochs``, ``W = warmup_epochs``; the linear ramps reach their peak in their last epoch and
    never run an epoch at lr 0.) The heads phase trains the heads alone with AdamW (amsgrad) and no
    clipping; warmup re-creates the job's optimiser over the whole network, with clipping from then on.
    """

    heads_lr: float
    heads_epochs: int
    warmup_epochs: int
    base_lr: float
    epochs: int
    iterations_per_epoch: int
    exponent: float = 0.9

    def __post_init__(self) -> None:
        if min(self.heads_epochs, self.warmup_epochs, self.iterations_per_epoch) < 1 or (
            self.heads_epochs + self.warmup_epochs >= self.epochs
        ):
            raise ValueError(f"invalid fine-tuning schedule {self}")
        if self.heads_lr <= 0 or self.base_lr <= 0 or self.exponent < 0:
            raise ValueError(f"invalid fine-tuning schedule {self}")

    @property
    def phases(self) -> tuple[Phase, Phase, Phase]:
        n, h, w = self.iterations_per_epoch, self.heads_epochs, self.warmup_epochs
        return (
            Phase("heads", 0, h * n, trains="heads", optimizer="heads_adamw", clip=False),
            Phase("warmup", h * n, (h + w) * n),
            Phase("poly", (h + w) * n, self.epochs * n),
        )

    def phase_at(self, iteration: int) -> Phase:
        for phase in self.phases:
            if iteration < phase.stop:
                return phase
        return self.phases[-1]

    def lr_at(self, iteration: int) -> float:
        epoch = min(max(iteration, 0) // self.iterations_per_epoch, self.epochs)
        h, w = self.heads_epochs, self.warmup_epochs
        if epoch < h:
            return self.heads_lr * (epoch + 1) / h
        if epoch < h + w:
            return self.base_lr * (epoch - h + 1) / w
        return self.base_lr * (1.0 - (epoch - h - w) / (self.epochs - h - w)) ** self.exponent

    def apply(self, optimizer: Any, iteration: int) -> float:
        return _apply(self, optimizer, iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "finetune", **asdict(self)}

    def check_state(self, state: Mapping[str, Any], *, where: str) -> None:
        _check_state(self, state, where)


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


def build_phase_optimizer(
    model: Any, phase: Phase, config: OptimiserSection, *, lr: float
) -> torch.optim.Optimizer:
    """Freeze or unfreeze the backbone for ``phase`` and build its optimiser (at rate ``lr``).

    ``heads_adamw``: AdamW with amsgrad over the head parameters only, so only heads get optimiser
    state; ``job``: :func:`build_optimizer` over every parameter.
    """
    import torch

    heads_only = phase.trains == "heads"
    for p in model.backbone_parameters():
        p.requires_grad_(not heads_only)
    for p in model.head_parameters():
        p.requires_grad_(True)
    if phase.optimizer == "heads_adamw":
        return torch.optim.AdamW(
            list(model.head_parameters()), lr=lr, weight_decay=config.weight_decay, amsgrad=True
        )
    return build_optimizer(model.parameters(), config)
