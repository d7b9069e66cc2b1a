"""The model package: a folder of plain files that holds everything needed to rebuild a trained network.

Layout (schema :data:`SCHEMA_VERSION`)::

    weights.safetensors  fp32 weights, keys as in MultiTalentNet.state_dict() (``backbone.*``, ``heads.*``);
                         a module reachable under two names (e.g. the U-Net decoder's reference to the
                         encoder) is stored once, under the name ``named_parameters()`` gives it
    architecture.json    ``{"schema_version", "build": build_network kwargs, "description": describe()}``
    plan.json            the preprocessing plan, written by ``Plan.save`` and read by ``Plan.load`` only
    labels.json          the catalog (datasets, classes, regions, groups) and each dataset's output channels
    MODEL_CARD.md        datasets and case counts, validation Dice, training configuration, lineage
    manifest.json        schema version, and the size and SHA-256 of every other file

Loading (:func:`open_package`) verifies the manifest first (:func:`verify_package`), then reads JSON and
safetensors only: nothing in a package is unpickled or executed. The network is built from
``architecture.json`` and loaded with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from multitalent.catalog import Catalog
from multitalent.preprocess.plan import PLAN_FILE

if TYPE_CHECKING:
    import torch

    from multitalent.models import MultiTalentNet
    from multitalent.preprocess.plan import Plan

SCHEMA_VERSION = 1
FORMAT = "multitalent-model-package"
WEIGHTS = "weights.safetensors"
ARCHITECTURE = "architecture.json"
PLAN = PLAN_FILE
LABELS = "labels.json"
CARD = "MODEL_CARD.md"
MANIFEST = "manifest.json"
REQUIRED = (WEIGHTS, ARCHITECTURE, PLAN, LABELS, CARD)
_CHUNK = 1 << 20


class PackageError(ValueError):
    """A package that cannot be trusted or used; the message names the file and the reason."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------- state dicts
def _canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every state-dict key of ``model`` -> the key its tensor is stored under (its first name)."""
    first: dict[int, str] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        first.setdefault(id(tensor), name)
    names: dict[str, str] = {}
    lookup = {
        name: first[id(t)]
        for name, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    }
    for key in model.state_dict():
        names[key] = lookup.get(key, key)
    return names


def package_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` (a full state dict of ``model``'s architecture) to store: one per
    distinct tensor, fp32, contiguous, on the CPU.

    Raises:
        PackageError: ``state_dict`` lacks a key of the model, has extra ones, or holds a non-fp32 float.
    """
    import torch

    names = _canonical_names(model)
    missing = sorted(set(names) - set(state_dict))
    extra = sorted(set(state_dict) - set(names))
    if missing or extra:
        raise PackageError(
            f"weights do not fit the architecture: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for canonical in sorted(set(names.values())):
        t = state_dict[canonical].detach().to("cpu")
        if t.is_floating_point() and t.dtype != torch.float32:
            raise PackageError(f"{canonical}: {t.dtype} weights; a package holds the fp32 master weights")
        out[canonical] = t.contiguous().clone()
    return out


def load_weights_into(model: torch.nn.Module, stored: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load stored tensors (:func:`package_state_dict`) into ``model`` with ``strict=True``."""
    names = _canonical_names(model)
    expected = set(names.values())
    missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
    if missing or extra:
        raise PackageError(
            f"{where}: weights do not fit the architecture: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    full = {key: stored[canonical] for key, canonical in names.items()}
    model.load_state_dict(full, strict=True)


# --------------------------------------------------------------------------------------- labels
def labels_dict(catalog: Catalog) -> dict[str, Any]:
    """``labels.json``: the catalog plus the output layout (channel slice per dataset, class list)."""
    outputs = []
    for d in catalog.datasets:
        s = catalog.class_slice(d.id)
        outputs.append(
            {"dataset": d.id, "channels": [s.start, s.stop], "classes": [c.name for c in d.classes]}
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "catalog_hash": catalog.hash,
        "num_classes": catalog.num_classes,
        "outputs": outputs,
        "classes": [
            {
                "index": c.index,
                "key": c.key,
                "dataset": c.dataset_id,
                "name": c.name,
                "raw_values": list(c.raw_values),
                "region": len(c.raw_values) > 1,
                "groups": list(c.groups),
            }
            for c in catalog.classes
        ],
        "groups": {g: list(catalog.group_members(g)) for g in ("difficult", "cancer")},
        "catalog": catalog.to_dict(),
    }


# --------------------------------------------------------------------------------------- model card
@dataclass(frozen=True)
class ModelCard:
    """What ``MODEL_CARD.md`` says beyond the architecture and the label space."""

    cases: Mapping[str, Mapping[str, int]]  # "train" / "val" -> dataset id -> cases
    validation: Mapping[str, float]  # metric name -> value (val/dice/<dataset>/<class> ...)
    training: Mapping[str, Any]  # flat settings worth stating (optimiser, schedule, precision ...)
    run_id: str | None = None
    git_commit: str | None = None
    parent: str | None = None  # "name/version" of the model this one was initialised from
    date: str = ""

    def render(self, *, catalog: Catalog, architecture: Mapping[str, Any], plan: Plan) -> str:
        train, val = self.cases.get("train", {}), self.cases.get("val", {})
        lines = [
            f"# MultiTalent model: {catalog.name}",
            "",
            f"{architecture['build']['arch']} ({architecture['build']['size']}), "
            f"{architecture['description']['parameters']['total']:,} parameters, "
            f"{_heads_phrase(catalog, architecture['build'].get('output', 'sigmoid_heads'))}; "
            f"patch {architecture['build']['patch_size_zyx']} (z, y, x) at "
            f"{list(plan.target_spacing_zyx_mm)} mm.",
            "",
            "## Datasets",
            "",
            "| dataset | channels | classes | training cases | validation cases |",
            "|---|---|---|---|---|",
        ]
        for d in catalog.datasets:
            s = catalog.class_slice(d.id)
            lines.append(
                f"| {d.id} {d.name} | {s.start}-{s.stop - 1} | {len(d.classes)} | "
                f"{train.get(d.id, 0)} | {val.get(d.id, 0)} |"
            )
        lines += ["", "## Validation Dice (training run, fixed patches of the validation fold)", ""]
        dice = {k: v for k, v in sorted(self.validation.items()) if k.startswith("val/dice")}
        if dice:
            lines += ["| metric | Dice |", "|---|---|"]
            lines += [f"| {k.removeprefix('val/dice/')} | {v:.4f} |" for k, v in dice.items()]
        else:
            lines.append("No validation pass in this run.")
        n = plan.normalization
        lines += ["", "## Training configuration", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(self.training.items())]
        lines += [
            f"- preprocessing: spacing {list(plan.target_spacing_zyx_mm)} mm, CT clip {list(n.clip)}, "
            f"mean {n.mean:.2f}, std {n.std:.2f}; plan sha256 {plan.sha256[:16]}",
            "",
            "## Lineage",
            "",
            f"- parent model: {self.parent or 'none (trained from scratch)'}",
            f"- MLflow run: {self.run_id or 'unknown'}",
            f"- git commit: {self.git_commit or 'unknown'}",
            f"- date: {self.date}",
            "",
        ]
        return "\n".join(lines)


def _heads_phrase(catalog: Catalog, output: str) -> str:
    if output == "sigmoid_heads":
        return f"{catalog.num_classes} sigmoid heads in {len(catalog.datasets)} groups"
    return f"output {output} read as {catalog.num_classes} classes of {len(catalog.datasets)} datasets"


# --------------------------------------------------------------------------------------- writing
def write_package(
    out: str | Path,
    *,
    model: MultiTalentNet,
    state_dict: Mapping[str, torch.Tensor],
    plan: Plan,
    catalog: Catalog,
    card: ModelCard,
    laterality: str = "naive",
) -> Path:
    """Write a package of ``model``'s architecture with the fp32 ``state_dict`` into the new folder ``out``.

    ``laterality``: how training mirrored left-right paired classes (``data.augmentation.laterality``),
    recorded in ``architecture.json`` so prediction mirrors the same way.

    The files are written into a hidden sibling folder that is renamed to ``out`` when complete, so
    ``out`` never holds a partial package.

    Raises:
        FileExistsError: ``out`` exists.
        PackageError: weights that do not fit the architecture, or a catalog the network's heads differ from.
    """
    from safetensors.torch import save_file

    from multitalent.models.outputs import output_heads

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new folder")
    expected = output_heads(model.output, catalog)
    if tuple(model.head_groups) != expected:
        raise PackageError(
            f"the network's head groups {list(model.head_groups)} differ from the catalog's "
            f"({model.output}) {list(expected)}"
        )
    if plan.catalog_hash != catalog.hash:
        raise PackageError(
            f"{PLAN}: made for catalog hash {plan.catalog_hash}, the package's is {catalog.hash}"
        )
    tensors = package_state_dict(model, state_dict)
    architecture = {
        "schema_version": SCHEMA_VERSION,
        "build": model.build_kwargs(),
        "description": model.describe(),
        "laterality": laterality,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "dtype": "float32"})
        (tmp / ARCHITECTURE).write_bytes(_json_bytes(architecture))
        plan.save(tmp / PLAN)
        (tmp / LABELS).write_bytes(_json_bytes(labels_dict(catalog)))
        (tmp / CARD).write_text(
            card.render(catalog=catalog, architecture=architecture, plan=plan), encoding="utf-8"
        )
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in REQUIRED
        }
        manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "files": files}
        (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------- reading
def _listed_path(folder: Path, name: str) -> Path:
    """The file ``name`` of the manifest inside ``folder``; refuses names that leave it."""
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
        raise PackageError(f"{folder / MANIFEST}: file name {name!r} points outside the package folder")
    path = folder / pure
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except OSError:
        inside = False
    if not inside:
        raise PackageError(f"{folder / MANIFEST}: {name!r} resolves outside the package folder")
    return path


def verify_package(folder: str | Path) -> dict[str, Any]:
    """Check every file of the package in ``folder`` against ``manifest.json``; return the manifest.

    Refused, with the file named: a missing or unreadable manifest, another schema version, a listed
    name outside the folder, a required file not listed, a listed file missing, a size (truncated) or
    SHA-256 (altered) mismatch, a file present but not listed.

    Raises:
        PackageError
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PackageError(f"{folder}: not a folder")
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        version = manifest["schema_version"]
    except FileNotFoundError:
        raise PackageError(f"{mpath}: missing; not a model package (or an incomplete copy)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    if version != SCHEMA_VERSION or manifest.get("format") != FORMAT:
        raise PackageError(
            f"{mpath}: format {manifest.get('format')!r} schema {version!r}; this reader knows {FORMAT!r} "
            f"schema {SCHEMA_VERSION}"
        )
    if not isinstance(files, dict):
        raise PackageError(f"{mpath}: 'files' must map file names to size and sha256")
    for name in REQUIRED:
        if name not in files:
            raise PackageError(f"{mpath}: required file {name} is not listed")
    for name, entry in sorted(files.items()):
        path = _listed_path(folder, name)
        if not path.is_file():
            raise PackageError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise PackageError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or extended)"
            )
        if _sha256(path) != entry["sha256"]:
            raise PackageError(f"{path}: SHA-256 differs from the manifest (altered)")
    listed = {PurePosixPath(n).as_posix() for n in files} | {MANIFEST}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if (path.is_file() or path.is_symlink()) and rel not in listed:
            raise PackageError(f"{path}: not listed in the manifest (extra file)")
    return dict(manifest)


def manifest_digest(folder: str | Path) -> str:
    """SHA-256 of ``manifest.json``: one digest naming the whole package content."""
    return _sha256(Path(folder) / MANIFEST)


@dataclass(frozen=True)
class ModelPackage:
    """A verified package folder, its JSON parsed. Build with :func:`open_package`."""

    folder: Path
    manifest: dict[str, Any]
    architecture: dict[str, Any]
    labels: dict[str, Any]
    catalog: Catalog
    plan: Plan
    digest: str  # manifest_digest
    source: str = ""  # what was resolved: a folder, or models:/name/version
    version: str | None = None  # registered model version, when pulled from a registry

    def build_network(self) -> MultiTalentNet:
        """The network of ``architecture.json`` with freshly initialised weights."""
        from multitalent.models import build_network

        b = self.architecture["build"]
        return build_network(
            b["arch"],
            b["heads"],
            size=b["size"],
            deep_supervision=b["deep_supervision"],
            in_channels=b["in_channels"],
            patch_size_zyx=b["patch_size_zyx"],
            spacing_zyx_mm=b["spacing_zyx_mm"],
            gradient_checkpointing=b.get("gradient_checkpointing", False),
            output=b.get("output", "sigmoid_heads"),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored fp32 tensors (safetensors; no pickle)."""
        from safetensors.torch import load_file

        try:
            return load_file(str(self.folder / WEIGHTS))
        except Exception as e:
            raise PackageError(f"{self.folder / WEIGHTS}: not a readable safetensors file ({e})") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict (aliased keys included), as ``build_network().state_dict()`` names it."""
        model = self.build_network()
        self.load_into(model)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_into(self, model: torch.nn.Module) -> None:
        load_weights_into(model, self.tensors(), where=str(self.folder / WEIGHTS))

    def load_network(self) -> MultiTalentNet:
        """The network with the package's weights (``strict=True``), in eval mode."""
        model = self.build_network()
        self.load_into(model)
        return model.eval()


def open_package(folder: str | Path, *, source: str = "", version: str | None = None) -> ModelPackage:
    """Verify and read the package in ``folder`` (no weights are read until asked for).

    Raises:
        PackageError: see :func:`verify_package`; also unreadable JSON, a plan or catalog that does not
            load, or head groups that differ from the catalog.
    """
    from multitalent.models.outputs import output_heads
    from multitalent.preprocess.plan import Plan, PlanError

    folder = Path(folder)
    manifest = verify_package(folder)

    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except ValueError as e:
            raise PackageError(f"{folder / name}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise PackageError(f"{folder / name}: must hold a JSON object")
        return data

    architecture, labels = read(ARCHITECTURE), read(LABELS)
    try:
        plan = Plan.load(folder / PLAN)
    except PlanError as e:
        raise PackageError(str(e)) from None
    try:
        catalog = Catalog.from_dict(labels["catalog"])
        heads = list(architecture["build"]["heads"])
        output = str(architecture["build"].get("output", "sigmoid_heads"))
        expected = list(output_heads(output, catalog))
    except (KeyError, TypeError, ValueError) as e:
        raise PackageError(
            f"{folder}: {LABELS} or {ARCHITECTURE} malformed ({type(e).__name__}: {e})"
        ) from None
    if heads != expected:
        raise PackageError(
            f"{folder / ARCHITECTURE}: heads {heads} differ from {LABELS} ({output}) {expected}"
        )
    return ModelPackage(
        folder=folder,
        manifest=manifest,
        architecture=architecture,
        labels=labels,
        catalog=catalog,
        plan=plan,
        digest=manifest_digest(folder),
        source=source or str(folder),
        version=version,
    )
