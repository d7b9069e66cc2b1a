"""Job files: YAML with ``extends:`` for shared defaults and dotted ``--set key=value`` overrides.

A job file is validated against a strict pydantic model: an unknown key or a wrong type is an
error that names the file and the dotted path of the offending field.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class JobError(ValueError):
    """A job file that cannot be loaded or does not validate."""


class _JobLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4``, ``1E3``, ``-2e+5`` as floats.

    YAML 1.1 (PyYAML) requires a dot in a float, so ``lr: 5e-4`` would arrive as the *string*
    ``"5e-4"`` and a float field would reject it; YAML 1.2 (and Python) read it as a number. Only the
    exponent form without a dot is added; everything else resolves as before.
    """


_JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_JobLoader)  # a SafeLoader subclass: safe


class StrictModel(BaseModel):
    """Base for job sections: unknown keys are errors and values are never coerced across types
    (``"1"`` is not an int). Sequences are lists, paths are strings, as YAML gives them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise JobError(f"{path}: 'extends' cycle: {cycle}")
    if not path.is_file():
        raise JobError(f"{path}: job file does not exist")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise JobError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise JobError(f"{path}: a job file must be a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parents = [parent] if isinstance(parent, str) else parent
    merged: dict[str, Any] = {}
    for p in parents:
        merged = _deep_merge(merged, _read_yaml(path.parent / p, (*chain, path)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars (``1``, ``true``, ``[1,2]``,
    ``5e-4``)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise JobError(f"--set {item!r}: expected KEY=VALUE")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise JobError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _load_yaml(raw) if raw else None
    return out


def load_job(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Read, merge, override and validate a job file."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise JobError(f"{path}: invalid job\n" + "\n".join(lines)) from None


def resolved_yaml(job: BaseModel) -> str:
    """The fully resolved job, as logged with every run."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
