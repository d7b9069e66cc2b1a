"""A trained model as inference needs it: weights, how to rebuild the network, the plan, the label space.

:class:`ModelFiles` names plain files (a full ``state_dict`` in ``model.pt``, the network's description
``model.json`` as :meth:`MultiTalentNet.describe` writes it, ``plan.json`` and the label space); where
they come from (a training run folder, a model package) is resolved by the command line. Weights are
loaded with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.catalog import Catalog
from multitalent.preprocess.plan import Plan

if TYPE_CHECKING:
    import torch


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message names the file and the reason."""


@dataclass(frozen=True)
class ModelFiles:
    """Everything needed to rebuild a trained network; JSON-able through :meth:`to_dict`.

    ``network`` holds :func:`multitalent.models.build_network`'s arguments (``arch``, ``heads``, ``size``,
    ``in_channels``, ``patch_size_zyx``, ``spacing_zyx_mm``); ``source`` says where the files came from
    (written to ``predictions.json``; ``id`` identifies the model for ``--overwrite`` checks).
    """

    weights: Path
    network: Mapping[str, Any]
    plan: Plan
    catalog: Catalog
    source: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return str(self.source.get("id") or self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": str(self.weights),
            "network": dict(self.network),
            "plan": self.plan.to_dict(),
            "catalog": self.catalog.to_dict(),
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFiles:
        return cls(
            weights=Path(d["weights"]),
            network=dict(d["network"]),
            plan=Plan.from_dict(d["plan"]),
            catalog=Catalog.from_dict(d["catalog"]),
            source=dict(d.get("source", {})),
        )


def network_arguments(description: Mapping[str, Any]) -> dict[str, Any]:
    """``build_network`` arguments from a ``model.json`` (:meth:`MultiTalentNet.describe`)."""
    try:
        backbone = description.get("backbone", {})
        return {
            "arch": str(description["arch"]),
            "heads": [int(n) for n in description["head_groups"]],
            "size": str(description["size"]),
            "in_channels": int(description.get("in_channels", 1)),
            "patch_size_zyx": [int(p) for p in description["patch_size_zyx"]],
            "spacing_zyx_mm": [float(s) for s in backbone["spacing_zyx_mm"]],
            "output": str(description.get("output", "sigmoid_heads")),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"model description lacks or garbles {e}") from None


def file_sha256(path: Path) -> str:
    from multitalent.shards import file_sha256 as sha256_of_file

    return sha256_of_file(path)


@dataclass
class LoadedModel:
    """The rebuilt network (eval mode, deep supervision off) and its label space and plan.

    ``network`` outputs one logit per global class of the catalog whatever the model's output kind
    (``files.network["output"]``): a merged-softmax network is wrapped so that each class's logit is
    positive exactly where the softmax's argmax is one of its labels
    (:func:`multitalent.models.class_logits_network`), so the sliding window's sigmoid and ``p > 0.5``
    work unchanged."""

    network: torch.nn.Module
    files: ModelFiles

    @property
    def catalog(self) -> Catalog:
        return self.files.catalog

    @property
    def plan(self) -> Plan:
        return self.files.plan

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        p = self.files.network["patch_size_zyx"]
        return (int(p[0]), int(p[1]), int(p[2]))


def load_model(files: ModelFiles, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of ``files`` and load its weights.

    Raises:
        ModelError: missing weights, a label space other than the plan's, weights that do not fit.
    """
    import torch

    from multitalent.models import build_network, class_logits_network, output_heads

    if files.catalog.hash != files.plan.catalog_hash:
        raise ModelError(
            f"{files.weights}: label space {files.catalog.name!r} ({files.catalog.hash}) is not the plan's "
            f"({files.plan.catalog_hash})"
        )
    heads = [int(n) for n in files.network["heads"]]
    output = str(files.network.get("output", "sigmoid_heads"))  # models before output kinds: sigmoid
    try:
        expected = output_heads(output, files.catalog)
    except ValueError as e:
        raise ModelError(f"{files.weights}: {e}") from None
    if tuple(heads) != expected:
        raise ModelError(
            f"{files.weights}: network heads {heads} do not match the label space "
            f"({output}: {list(expected)})"
        )
    if not Path(files.weights).is_file():
        raise ModelError(f"{files.weights}: weights file missing")
    args = dict(files.network)
    args["output"] = output
    network = build_network(args.pop("arch"), args.pop("heads"), deep_supervision=False, **args)
    if Path(files.weights).suffix == ".safetensors":  # a model package (verified when it was opened)
        from multitalent.registry import PackageError, open_package

        try:
            open_package(Path(files.weights).parent).load_into(network)
        except (PackageError, RuntimeError) as e:
            raise ModelError(f"{files.weights}: {e}") from None
        network.eval().to(device)
        return LoadedModel(class_logits_network(network, output=output, catalog=files.catalog), files)
    try:
        state = torch.load(files.weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{files.weights}: cannot read weights ({e})") from None
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelError(f"{files.weights}: weights do not fit the network ({first})") from None
    network.eval().to(device)
    return LoadedModel(class_logits_network(network, output=output, catalog=files.catalog), files)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read {what} ({e})") from None
