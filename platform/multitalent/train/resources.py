"""Can the cluster ever run the job's workers? Checked before launching, so a GPU job on a CPU-only
cluster fails at once instead of waiting forever in Ray's queue.

Pure functions over plain numbers (the nodes' total resources as Ray reports them), so they are tested
with tables; :func:`cluster_nodes` and :func:`local_machine` read the numbers.

A worker needs ``resources_per_worker`` (Ray Train's defaults when unset: ``{GPU: 1}`` with GPUs,
``{CPU: 1}`` without; ``use_gpu`` adds ``GPU: 1`` when absent), all on one node. The placement
strategy decides how many workers a node can take: ``STRICT_PACK`` all on one node,
``STRICT_SPREAD`` one per node, ``PACK``/``SPREAD`` as many as fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from multitalent.jobs import UserError

Resources = Mapping[str, float]


class ResourceError(UserError):
    """The cluster can never run the job's workers (the message names the demand and the cluster)."""


def worker_demand(*, use_gpu: bool, resources_per_worker: Resources | None) -> dict[str, float]:
    """What Ray Train asks for per worker (``ScalingConfig._resources_per_worker_not_none``)."""
    if resources_per_worker is None:
        demand = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    else:
        demand = {k: float(v) for k, v in resources_per_worker.items() if v != 0}
    if use_gpu:
        demand.setdefault("GPU", 1.0)
    return demand


def workers_that_fit(node: Resources, demand: Resources) -> int:
    """How many workers of ``demand`` one node of total resources ``node`` holds."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return min(counts) if counts else 1_000_000


def capacity(nodes: Sequence[Resources], demand: Resources, strategy: str) -> int:
    """How many workers the cluster of ``nodes`` can run at most, under the placement ``strategy``."""
    per_node = [workers_that_fit(n, demand) for n in nodes]
    if not per_node:
        return 0
    if strategy == "STRICT_PACK":
        return max(per_node)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    return sum(per_node)


def describe(resources: Resources) -> str:
    """``{CPU: 8, GPU: 0}``: the resources a person reads (CPU and GPU first, Ray's internal ones out)."""
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not _internal(k)}
    order = sorted(shown, key=lambda k: (k not in ("CPU", "GPU"), k))
    return "{" + ", ".join(f"{k}: {_num(shown[k])}" for k in order) + "}"


def _internal(key: str) -> bool:
    internal = ("node:", "accelerator_type:", "bundle_group_")
    return key in ("memory", "object_store_memory") or key.startswith(internal) or "_group_" in key


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class ResourceCheck:
    """The verdict: ``possible`` (the cluster can ever run the workers), ``free_now`` (it can now)."""

    num_workers: int
    demand: dict[str, float]
    strategy: str
    capacity: int
    possible: bool
    free_now: bool
    cluster_total: dict[str, float]
    available: dict[str, float] | None

    def problem(self) -> str:
        """Why the workers can never start, and what to do."""
        need = f"{self.num_workers} worker(s) x {describe(self.demand)} ({self.strategy})"
        hint = (
            "set workers.use_gpu=false (and workers.resources_per_worker) to train on CPUs, or launch on a "
            "GPU cluster (--address, or ray job submit)"
            if self.demand.get("GPU", 0) > 0 and self.cluster_total.get("GPU", 0) == 0
            else "lower workers.num_workers or workers.resources_per_worker, or add nodes"
        )
        return (
            f"the job needs {need}, but the cluster ({describe(self.cluster_total)} in total) can run "
            f"at most {self.capacity} such worker(s), so Ray would wait forever: {hint} (on an autoscaling "
            "cluster that will add such nodes, pass --wait-for-resources)"
        )

    def waiting(self) -> str:
        avail = describe(self.available) if self.available is not None else "unknown"
        return (
            f"waiting for resources: {self.num_workers} worker(s) x {describe(self.demand)}; "
            f"available now {avail} of {describe(self.cluster_total)} (other jobs hold the rest)"
        )


def check(
    *,
    num_workers: int,
    demand: Resources,
    strategy: str,
    nodes: Sequence[Resources],
    available: Resources | None = None,
) -> ResourceCheck:
    """Compare the workers' demand with the ``nodes`` (total resources each) and, when given, what is
    ``available`` now (the cluster's sum)."""
    cap = capacity(nodes, demand, strategy)
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + float(v)
    for k in ("CPU", "GPU"):  # shown even when zero: "no GPU" is the point of many messages
        total.setdefault(k, 0.0)
    free_now = True
    if available is not None:
        free_now = all(available.get(k, 0.0) + 1e-9 >= v * num_workers for k, v in demand.items())
    return ResourceCheck(
        num_workers=num_workers,
        demand=dict(demand),
        strategy=strategy,
        capacity=cap,
        possible=cap >= num_workers,
        free_now=free_now,
        cluster_total=total,
        available=None if available is None else dict(available),
    )


def cluster_nodes(ray: object) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The alive nodes' total resources and the cluster's available resources, from a connected Ray."""
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]  # type: ignore[attr-defined]
    return nodes, dict(ray.available_resources())  # type: ignore[attr-defined]


def local_machine() -> list[dict[str, float]]:
    """The one node a local Ray would start here (Ray counts the CPUs and the visible GPUs)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no usable CUDA: no GPUs
        gpus = 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return [{"CPU": float(cpus), "GPU": float(gpus)}]


def placement_state(ray: object, *, num_workers: int, demand: Resources) -> str | None:
    """The state (``PENDING``, ``CREATED``, ...) of a placement group shaped like the workers' (Ray
    Train reserves one bundle per worker), or ``None`` when there is none yet."""
    try:
        table = ray.util.placement_group_table()  # type: ignore[attr-defined]
    except Exception:  # an API that moved: unknown
        return None
    want = {k: float(v) for k, v in demand.items()}
    for pg in table.values():
        bundles = list(pg.get("bundles", {}).values())
        if (
            len(bundles) == num_workers
            and all({k: float(v) for k, v in b.items()} == want for b in bundles)
            and pg.get("state") != "REMOVED"
        ):
            return str(pg.get("state"))
    return None
