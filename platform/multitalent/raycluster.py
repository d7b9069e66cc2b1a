"""Connecting to Ray: a given cluster, the cluster of a submitted job, or a local one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def ray_session(*, address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the ``ray`` module connected to a cluster; shut down only what we started.

    ``address`` wins; otherwise a job started by ``ray job submit`` (which sets ``RAY_ADDRESS``)
    joins its cluster; otherwise a local Ray is started for the duration of the block.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address or os.environ.get("RAY_ADDRESS"):
        # Inside a submitted job the working dir is already the job's; giving our own
        # runtime_env.working_dir here would conflict with it.
        ray.init(address=address or "auto", log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
