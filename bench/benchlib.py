"""What the CPU benchmarks share: the machine line of a result, and interleaved rounds.

Imported by the scripts in this folder (``python bench/<script>.py`` puts the folder on ``sys.path``).
"""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def machine_line(device: torch.device | None = None) -> str:
    """``date | CPU model (or GPU name) | python | torch``, the first line of every result."""
    if device is not None and device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = subprocess.run(
            ["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True
        ).stdout.strip()
    versions = f"python {platform.python_version()} | torch {torch.__version__}"
    return f"{time.strftime('%Y-%m-%d')} | {what or platform.processor()} | {versions}"


def interleaved(
    run: Callable[[str], tuple[float, Any]], names: Sequence[str], rounds: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``run(name) -> (seconds, result)`` for every name, round by round (so load from other processes
    hits all alike): the seconds of every round per name, and each name's last result."""
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name in names:
            seconds, results[name] = run(name)
            times[name].append(seconds)
    return times, results
