"""What the network's output channels mean: one sigmoid head per class, or one merged softmax.

An *output kind* says how many head channels a catalog needs and how to turn the network's raw output
into per-class logits of the catalog's global classes, the form everything after the network expects
(validation Dice during training, ``multitalent predict``'s sliding window and export, ``evaluate``):

``sigmoid_heads`` (MultiTalent, the default)
    One head group per dataset, one channel per (dataset, class); the logits are already per class.
``merged_softmax`` (the naive baseline, :mod:`multitalent.catalog.merge`)
    One head group of ``1 + M`` channels, a softmax ``p`` over background and the merged labels; the
    prediction is its argmax. Global class ``k`` covers some labels (``members[k]``; a region such as
    P01 liver = {liver, liver tumour} covers several). Its per-class logit is
    ``log(a_k / b_k)``, ``a_k`` the largest probability among its labels and ``b_k`` the largest among
    all others (background included), so ``logit_k > 0`` exactly when the argmax is one of its labels
    and ``sigmoid(logit_k) = a_k / (a_k + b_k)``: the class's share of the contest with its strongest
    rival (its probability when only the two have mass). The ``p > 0.5`` export and the ``logit > 0``
    validation are therefore the softmax's argmax, as a naive-merge nnU-Net would decide, with no change
    to them. The sliding window averages these scores over mirrorings and overlapping windows as it
    averages probabilities (nnU-Net averages the probabilities, then takes the argmax: the two can
    differ where passes disagree).

Kinds are registered (:func:`register_output`); the training objective of each kind is registered
separately (:func:`multitalent.train.step.register_objective`), since models know nothing of losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from multitalent.catalog import Catalog
from multitalent.catalog.merge import merge_by_name

SIGMOID_HEADS = "sigmoid_heads"
MERGED_SOFTMAX = "merged_softmax"


Convert = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OutputKind:
    """``heads(catalog)``: classes per head group; ``converter(catalog)``: raw full-resolution output
    ``(B, C, *spatial)`` -> per-class logits ``(B, K, *spatial)`` of the catalog's global classes, or
    ``None`` when the raw output already is that."""

    name: str
    heads: Callable[[Catalog], tuple[int, ...]]
    converter: Callable[[Catalog], Convert | None]
    description: str = ""


_OUTPUTS: dict[str, OutputKind] = {}


def register_output(kind: OutputKind) -> None:
    if kind.name in _OUTPUTS:
        raise ValueError(f"output kind {kind.name!r} is already registered")
    _OUTPUTS[kind.name] = kind


def available_outputs() -> tuple[str, ...]:
    return tuple(_OUTPUTS)


def output_kind(name: str) -> OutputKind:
    try:
        return _OUTPUTS[name]
    except KeyError:
        raise ValueError(f"unknown output kind {name!r}; choose one of {available_outputs()}") from None


def output_heads(name: str, catalog: Catalog) -> tuple[int, ...]:
    """Classes per head group that ``catalog`` needs under output kind ``name``."""
    return output_kind(name).heads(catalog)


def class_logits_network(network: nn.Module, *, output: str, catalog: Catalog) -> nn.Module:
    """``network`` with per-class logits of ``catalog``'s global classes as its output (itself for
    ``sigmoid_heads``; a :class:`ClassLogits` wrapper otherwise)."""
    convert = output_kind(output).converter(catalog)
    return network if convert is None else ClassLogits(network, convert)


def class_logits_forward(
    forward: Callable[[torch.Tensor], Any], *, output: str, catalog: Catalog
) -> Callable[[torch.Tensor], Any]:
    """:func:`class_logits_network` for any callable (a DeepSpeed engine during validation)."""
    convert = output_kind(output).converter(catalog)
    if convert is None:
        return forward

    def class_logits(x_bczyx: torch.Tensor) -> torch.Tensor:
        return _converted(forward(x_bczyx), convert)

    return class_logits


def _converted(out: Any, convert: Convert) -> torch.Tensor:
    logits = out[0] if isinstance(out, list | tuple) else out  # deep supervision: full resolution
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return convert(logits)


def merged_class_logits(logits_bm: torch.Tensor, members_km: torch.Tensor) -> torch.Tensor:
    """Per-class logits ``(B, K, *spatial)`` from merged-softmax logits ``(B, M, *spatial)``:
    ``log(a_k / b_k)``, ``a_k`` the largest softmax probability among class ``k``'s labels, ``b_k``
    the largest among the others (see the module docstring); positive exactly where the argmax is one of
    ``k``'s labels.

    ``members_km``: bool ``(K, M)`` (:attr:`MergedLabelSpace.members_km`); every class must leave at
    least one label (background) out. Computed in float32, one class at a time (memory: a few
    ``(B, *spatial)`` maps, whatever ``K`` and ``M``).
    """
    if logits_bm.ndim < 3 or logits_bm.shape[1] != members_km.shape[1]:
        raise ValueError(
            f"merged_class_logits: logits {tuple(logits_bm.shape)} do not have the {members_km.shape[1]} "
            "merged channels"
        )
    members = torch.as_tensor(members_km, dtype=torch.bool).cpu()
    if bool(members.all(dim=1).any()) or not bool(members.any(dim=1).all()):
        raise ValueError("merged_class_logits: every class needs at least one label and one label outside")
    log_p = torch.log_softmax(logits_bm.float(), dim=1)
    out = log_p.new_empty((log_p.shape[0], members.shape[0], *log_p.shape[2:]))
    for k in range(members.shape[0]):
        inside = torch.nonzero(members[k]).flatten().tolist()
        outside = torch.nonzero(~members[k]).flatten().tolist()
        out[:, k] = log_p[:, inside].amax(dim=1) - log_p[:, outside].amax(dim=1)
    return out


class ClassLogits(nn.Module):
    """A network seen through its output kind's converter: ``forward(x)`` gives the per-class logits of
    the network's full-resolution output, in float32 (autocast off for the conversion). ``network`` stays
    the wrapped module; load weights into it, not into the wrapper."""

    def __init__(self, network: nn.Module, convert: Convert) -> None:
        super().__init__()
        self.network = network
        self.convert = convert

    def forward(self, x_bczyx: torch.Tensor) -> torch.Tensor:
        return _converted(self.network(x_bczyx), self.convert)


def _merged_converter(catalog: Catalog) -> Convert:
    members = torch.as_tensor(merge_by_name(catalog).members_km, dtype=torch.bool)

    def convert(logits: torch.Tensor) -> torch.Tensor:
        return merged_class_logits(logits, members)

    return convert


register_output(
    OutputKind(
        SIGMOID_HEADS,
        heads=lambda catalog: catalog.classes_per_dataset(),
        converter=lambda catalog: None,
        description="one sigmoid head per (dataset, class), partial-label loss (MultiTalent)",
    )
)
register_output(
    OutputKind(
        MERGED_SOFTMAX,
        heads=lambda catalog: (merge_by_name(catalog).num_channels,),
        converter=_merged_converter,
        description="one softmax over the labels merged by name, unannotated classes as background (naive)",
    )
)
