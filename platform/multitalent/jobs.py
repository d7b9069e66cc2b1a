"""Job files: YAML with ``extends:`` for shared defaults and dotted ``--set key=value`` overrides.

A job file is validated against a strict pydantic model: an unknown key or a wrong type is an
error that names the file and the dotted path of the offending field (with a did-you-mean for a
misspelt key); a job of another kind (a train job given to ``convert``) is one error saying so.

:class:`UserError` is the one type of "the user can fix this" error: the CLI prints it as a single
``error:`` line and exits 2 (``multitalent.cli.main``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class UserError(Exception):
    """A mistake the user can fix (a file, a path, a preset, a job value): the message names what is
    wrong and how to fix it; the CLI prints it as one ``error:`` line, no traceback, exit status 2."""


class JobError(UserError, ValueError):
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


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the (nested) model section at ``loc``; [] when it is not a model."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = fields[part].annotation
        # ``Section | None`` and the like: the model member of the union.
        for arg in getattr(current, "__args__", ()):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields is not None else []


def _did_you_mean(model: type[BaseModel], loc: Sequence[Any]) -> str:
    from difflib import get_close_matches

    known = _fields_at(model, loc[:-1])
    close = get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known keys here: {', '.join(known)}" if known else ""


def _kind_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    return None if field is None else str(field.default)


def load_job(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Read, merge, override and validate a job file.

    Raises:
        JobError: a missing or unreadable file, a job of another ``kind``, an unknown key (with a
            did-you-mean) or a wrong value, each naming the file and the dotted path.
    """
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides)
    expected, given = _kind_of(model), data.get("kind")
    if expected is not None and isinstance(given, str) and given != expected:
        raise JobError(
            f"{path}: this is a {given} job (kind: {given}), not a {expected} job; "
            f"run it with `multitalent {given} {path}`"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _did_you_mean(model, err["loc"])
            lines.append(f"  {where}: {msg}")
        raise JobError(f"{path}: invalid job\n" + "\n".join(lines)) from None


def submitted_job_working_dir() -> str | None:
    """The working directory of the Ray job this process is the driver of (``ray job submit``), or
    ``None`` outside a submitted job. Ray gives a job's driver its job config in the environment."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    return str(runtime_env.get("working_dir") or Path.cwd())


def require_absolute_in_submitted_job(paths: Mapping[str, str], *, where: str) -> None:
    """Inside a submitted Ray job, relative ``paths`` (field name -> value) would land in the job's
    temporary working directory, deleted with the job: an error naming each field and the fix.

    Raises:
        JobError: a relative path while running under ``ray job submit``.
    """
    if submitted_job_working_dir() is None:
        return
    relative = {k: v for k, v in paths.items() if "://" not in v and not Path(v).expanduser().is_absolute()}
    if relative:
        names = ", ".join(f"{k}={v}" for k, v in relative.items())
        sets = " ".join(f"--set {k}=/shared/..." for k in relative)
        raise JobError(
            f"{where}: relative path(s) {names} inside a submitted Ray job would resolve in the job's "
            f"temporary working directory ({Path.cwd()}), deleted with the job; give absolute paths on "
            f"storage every node shares, e.g. {sets}"
        )


def resolved_yaml(job: BaseModel) -> str:
    """The fully resolved job, as logged with every run."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
