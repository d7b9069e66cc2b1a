"""Where a result came from: the commit of the code that made it."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def git_commit(*, short: bool = False) -> str | None:
    """The commit checked out where this package lies (``--short`` hash when ``short``), or None outside
    a git checkout (an installed wheel) or without git."""
    cmd = [
        "git",
        "-C",
        str(Path(__file__).resolve().parent),
        "rev-parse",
        *(["--short"] if short else []),
        "HEAD",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
