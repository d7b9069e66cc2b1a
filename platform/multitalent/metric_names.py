"""MLflow-safe metric and parameter names (pure Python; no mlflow import).

A neutral home: evaluation names its Dice metrics with :func:`metric_key` and tracking sends them,
so neither stage imports the other for it.

MLflow 3.17 accepts ``[/\\w.\\- :]`` in metric and parameter names (no ``:`` on Windows), rejects
names that change under ``posixpath.normpath`` (``a//b``, ``./a``, ``a/..``, a leading ``/``) and
keys longer than 250 characters. We keep a stricter, portable subset: ASCII letters, digits and
``_ - . /``; spaces and colons become ``_`` so names also read well in search filters.
"""

from __future__ import annotations

import re

MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.\-/]")


def metric_key(name: str) -> str:
    """``name`` made acceptable to MLflow as a metric or parameter key.

    >>> metric_key("val/dice/01/liver tumour")
    'val/dice/01/liver_tumour'
    >>> metric_key("07:portal/splenic vein")
    '07_portal/splenic_vein'
    """
    flat = "/".join(_BAD_CHARS.sub("_", p) for p in str(name).split("/"))[:MAX_KEY_LENGTH]
    # Empty, "." and ".." components would make the name resolve to another path.
    parts = ["_" if p in (".", "..") else p for p in flat.split("/") if p]
    return "/".join(parts) or "_"
