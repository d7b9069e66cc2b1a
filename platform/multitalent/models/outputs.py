"""What the network's output channels mean: one sigmoid head per class, or one merged softmax.

An *output kind* says how many head channels a catalog needs and how to turn the network's raw output
into per-class logits of the catalog's global classes, the form everything after the network expects
(validation Dice during training, ``multitalent predict``'s sliding window and export, ``evaluate``):

``sigmoid_heads`` (MultiTalent, the default)
    One head group per dataset, one channel per (dataset, class); the logits are already per class.
``merged_softmax`` (the naive baseline, :mod:`multitalent.catalog.merge`)
    One head group of ``1 + M`` channels, a softmax over background and the merged labels. The
    probability of global class ``k`` is ``q_k = sum_m members[k, m] * softmax(z)_m`` and its
    per-class logit is ``log(q_k / (1 - q_k))``, so ``sigmoid(logit) = q_k``: the sliding window's
    sigmoid and mirroring average, the ``p > 0.5`` export and the ``logit > 0`` validation all work
    unchanged on it. (``p > 0.5`` equals the softmax's argmax wherever one label holds the majority;
    where none does, e.g. three labels at 0.4 / 0.35 / 0.25, no class is painted.)

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
# probabilities are clamped to [EPS, 1 - EPS] before the log-odds: finite logits, error <= EPS
PROBABILITY_EPS = 1e-6


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
    """Per-class log-odds ``(B, K, *spatial)`` from merged-softmax logits ``(B, M, *spatial)``.

    ``members_km``: bool or float ``(K, M)`` (:attr:`MergedLabelSpace.members_km`). Computed in float32.
    """
    if logits_bm.ndim < 3 or logits_bm.shape[1] != members_km.shape[1]:
        raise ValueError(
            f"merged_class_logits: logits {tuple(logits_bm.shape)} do not have the {members_km.shape[1]} "
            "merged channels"
        )
    p = torch.softmax(logits_bm.float(), dim=1)
    q = torch.einsum("bm...,km->bk...", p, members_km.to(p.device, torch.float32))
    q = q.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    return torch.log(q) - torch.log1p(-q)


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
