#!/usr/bin/env python3
"""The versions the training image installs, read from pyproject.toml: the one place they are pinned.

    python3 infra/pins.py torch              # the requirement line:  torch==2.13.0
    python3 infra/pins.py --version ray      # the pinned version:    2.60.0
    python3 infra/pins.py --version project  # the package's own version (the image tag)

infra/Dockerfile runs it at build time (standard library only: Python >= 3.11 for tomllib), so the
image cannot disagree with pyproject.toml; tests/test_infra.py checks the manifests against it.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(name: str, *, pyproject: Path = PYPROJECT) -> str:
    """The dependency line of ``name`` in ``[project].dependencies`` (e.g. ``ray[default,train]==2.60.0``).

    Raises:
        KeyError: ``name`` is not a direct dependency.
    """
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for line in deps:
        m = _NAME.match(line)
        if m and _normalise(m.group(1)) == _normalise(name):
            return line.strip()
    raise KeyError(f"{pyproject}: {name} is not in [project].dependencies")


def pinned_version(name: str, *, pyproject: Path = PYPROJECT) -> str:
    """The exact version ``name`` is pinned to (``==``); ``project`` gives the package's own version.

    Raises:
        KeyError: not a dependency; ValueError: not pinned with a single ``==``.
    """
    if name == "project":
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    line = requirement(name, pyproject=pyproject)
    m = _NAME.match(line)
    spec = m.group(3).split(";")[0].strip() if m else ""
    pin = re.fullmatch(r"==\s*([0-9][0-9A-Za-z.+!-]*)", spec)
    if not pin:
        raise ValueError(f"{pyproject}: {line!r} is not pinned to one version with ==")
    return pin.group(1)


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--version":
        print(pinned_version(argv[1]))
        return 0
    if len(argv) == 1 and not argv[0].startswith("-"):
        # the bare name with its pin, without extras: `pip install "$(pins.py torch)"`
        line = requirement(argv[0])
        m = _NAME.match(line)
        print(f"{m.group(1)}{m.group(3)}" if m else line)
        return 0
    print(__doc__.strip().splitlines()[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
