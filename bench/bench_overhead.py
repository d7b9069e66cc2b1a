"""Platform overhead: steady-state steps/s of the whole stack against a bare torch loop (issue 4).

Same network, same objective (targets via the region table, deep supervision, partial-label loss),
same SGD settings and gradient clipping, same batches, same number of threads, one process each:

- **bare torch**: one process, ``torch.set_num_threads(T)``; the batches of iterations ``0..K-1`` are
  read once before timing (the platform's own sampler, so they are the batches the platform trains on)
  and cycled from memory; each step sets the poly rate, runs the objective, ``backward``,
  ``clip_grad_norm_(12)``, ``optimizer.step`` and reads the loss as a Python float (as logging does).
- **bare torch + Zarr reads**: the same loop, reading each batch from the Zarr stores inside the step
  (what the platform's loader does when ``data.loader_workers`` is 0).
- **DeepSpeed engine**: the same loop through ``deepspeed.initialize`` (ZeRO-1, fp32, gloo group of
  one), in-memory batches; isolates the engine's cost.
- **platform**: ``run_training`` with **1 Ray Train worker** reserving ``T`` CPUs (Ray sets its
  ``OMP_NUM_THREADS``), DeepSpeed, the Zarr loader (``--loader-workers`` processes), MLflow tracking
  every iteration, no augmentation (the bare loop has none), no validation, one checkpoint at the end.
  Its step times come from the wall-clock timestamps MLflow stores with each iteration's loss.

The fair pairing is 1 worker against 1 process (2 workers would be gloo-bound against 2-process DDP on
2 shared cores and measure the machine, not the stack). Start-up (Ray, DeepSpeed init, first steps) is
excluded: the rate is taken over iterations ``warmup..N-1``. The variants run round-robin
``--rounds`` times so that load from other processes on the machine hits them alike.

    .venv/bin/python bench/bench_overhead.py                        # tiny U-Net, patch 32x48x48, batch 2
    .venv/bin/python bench/bench_overhead.py --size paper --patch 32,64,64 --iterations 30
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import os
import platform as pyplatform
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "overhead"


@dataclass
class Config:
    size: str
    patch_zyx: tuple[int, int, int]
    batch: int
    threads: int
    iterations: int
    warmup: int
    loader_workers: int
    shards: Path


def _job(cfg: Config, *, name: str, storage: Path) -> Any:
    from multitalent.train.job import load_train_job

    z, y, x = cfg.patch_zyx
    sets = [
        f"shards.path={cfg.shards}",
        f"architecture.size={cfg.size}",
        f"architecture.patch_zyx=[{z},{y},{x}]",
        "workers.num_workers=1",
        f"workers.resources_per_worker={{CPU: {cfg.threads}}}",
        f"batch.global_size={cfg.batch}",
        "schedule.epochs=1",
        f"schedule.iterations_per_epoch={cfg.iterations}",
        f"checkpoint.every_iterations={cfg.iterations}",
        "validation.fold=null",
        "data.augmentation.enabled=false",
        f"data.loader_workers={cfg.loader_workers}",
        "tracking.log_every=1",
        f"run.storage_path={storage}",
        f"run.name={name}",
    ]
    return load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", sets)


def _ensure_shards(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    from multitalent.convert.cli import generate_missing_raw
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion
    from multitalent.jobs import load_job

    job = load_job(
        REPO / "jobs" / "convert.yaml",
        ConvertJob,
        [f"raw_root={path.parent / 'raw'}", f"out={path}", "synth.scale=0.5", "ray.num_cpus=2"],
    )
    generate_missing_raw(job, log=lambda _: None)
    summary = run_conversion(job, log=lambda _: None)
    if not summary.ok:
        raise SystemExit(f"conversion of the phantom collection failed: {summary.failures}")
    return path


# ------------------------------------------------------------------------------------------ bare loops
class _Parts:
    """Network, objective, optimizer and batches from :func:`multitalent.train.components.assemble`,
    the function a platform worker builds them with."""

    def __init__(self, cfg: Config) -> None:
        from multitalent.train.components import assemble

        job = _job(cfg, name="bare", storage=OUT / "unused")
        self.job = job
        run = assemble(job, rank=0, world_size=1)
        self.model, self.objective, self.optimizer = run.model, run.objective, run.optimizer
        self.schedule, self.deepspeed_config = run.schedule, run.deepspeed_config
        self._run = run
        self.grad_clip = job.optimiser.grad_clip

    def batch_at(self, iteration: int) -> Any:
        _, batch = next(iter(self._run.batches(iteration, iteration + 1, loader_workers=0)))
        return batch


def _inputs(batch: Any) -> Any:
    from multitalent.train.step import StepInputs

    return StepInputs(batch.image_bczyx, batch.label_bzyx, batch.dataset_idx_b, batch.annotated_bk)


@dataclass
class Steps:
    """Per-step wall seconds, and CPU-seconds of the whole stack per steady-state step."""

    wall_s: list[float]
    cpu_s_per_step: float


def bare_torch(cfg: Config, *, read_in_step: bool) -> Steps:
    """The plain torch loop: wall time of each step, CPU time (this process) per steady step."""
    import torch

    parts = _Parts(cfg)
    cached = [] if read_in_step else [_inputs(parts.batch_at(i)) for i in range(min(cfg.iterations, 16))]
    model, opt = parts.model, parts.optimizer
    model.train()
    times, cpu = [], []
    for i in range(cfg.iterations):
        t0, c0 = time.perf_counter(), time.process_time()
        inputs = _inputs(parts.batch_at(i)) if read_in_step else cached[i % len(cached)]
        parts.schedule.apply(opt, i)
        loss, _ = parts.objective(model, inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip)
        opt.step()
        float(loss.detach())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Steps(times, statistics.fmean(cpu[cfg.warmup :]))


def deepspeed_engine(cfg: Config) -> Steps:
    """The same loop through a DeepSpeed engine (ZeRO-1, fp32) in a gloo group of one process."""
    import torch.distributed as dist

    from multitalent.distributed.engine import build_engine

    if not dist.is_initialized():  # once per process: DeepSpeed keeps a handle on the group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        dist.init_process_group("gloo", rank=0, world_size=1)
    parts = _Parts(cfg)
    engine = build_engine(parts.model, parts.optimizer, config=parts.deepspeed_config, use_gpu=False)
    cached = [_inputs(parts.batch_at(i)) for i in range(min(cfg.iterations, 16))]
    times, cpu = [], []
    for i in range(cfg.iterations):
        t0, c0 = time.perf_counter(), time.process_time()
        parts.schedule.apply(engine.optimizer, i)
        loss, _ = parts.objective(engine, cached[i % len(cached)])
        engine.backward(loss)
        engine.step()
        float(loss.detach())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Steps(times, statistics.fmean(cpu[cfg.warmup :]))


# ------------------------------------------------------------------------------------------ platform
class CpuSampler(threading.Thread):
    """Cumulative CPU seconds of this process and all its descendants (the local Ray the platform run
    starts: GCS, raylet, the Train controller and worker, loader processes), sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    @staticmethod
    def total() -> float:
        import psutil

        me = psutil.Process()
        cpu = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
        return cpu

    def run(self) -> None:
        while not self._halt.wait(0.2):
            self.samples.append((time.time(), self.total()))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def at(self, when: float) -> float:
        """CPU seconds at wall time ``when`` (linear between samples)."""
        ts = [t for t, _ in self.samples]
        j = bisect.bisect_left(ts, when)
        if j <= 0 or j >= len(ts):
            raise RuntimeError("the CPU samples do not cover the steady-state window")
        (t0, c0), (t1, c1) = self.samples[j - 1], self.samples[j]
        return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)


def platform_run(cfg: Config, *, name: str) -> tuple[Steps, float]:
    """Step intervals (s) of a 1-worker ``run_training``, from MLflow's per-iteration timestamps, CPU
    of the whole local stack per steady step, and the launch's wall time (start-up included)."""
    import shutil

    from mlflow.tracking import MlflowClient

    from multitalent.train.launch import run_training

    storage = OUT / "runs"
    shutil.rmtree(storage / name, ignore_errors=True)
    job = _job(cfg, name=name, storage=storage)
    sampler = CpuSampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = run_training(job)
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = client.get_metric_history(result.mlflow_run_id, "train/loss")
    stamps = {m.step: m.timestamp / 1000.0 for m in history}
    steps = sorted(stamps)
    if steps != list(range(cfg.iterations)):
        raise RuntimeError(f"expected a loss point for every iteration, got steps {steps}")
    intervals = [stamps[i] - stamps[i - 1] for i in range(1, cfg.iterations)]
    # Steady window: from the end of step warmup-1 to the end of the last step.
    first, last = stamps[cfg.warmup - 1], stamps[cfg.iterations - 1]
    cpu_per_step = (sampler.at(last) - sampler.at(first)) / (cfg.iterations - cfg.warmup)
    return Steps([intervals[0], *intervals], cpu_per_step), wall  # step 0: padded (warm-up drops it)


def steady_rate(times: list[float], warmup: int) -> float:
    """Steps/s over steps ``warmup..``: count / total time (robust to one slow step being split)."""
    tail = times[warmup:]
    return len(tail) / sum(tail)


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = pyplatform.processor()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "paper"])
    ap.add_argument("--patch", default="32,48,48", help="z,y,x")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shards", type=Path, default=REPO / "data_shards" / "phantom")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray for the platform runs
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    z, y, x = (int(v) for v in args.patch.split(","))
    cfg = Config(
        args.size,
        (z, y, x),
        args.batch,
        args.threads,
        args.iterations,
        args.warmup,
        args.loader_workers,
        _ensure_shards(args.shards.resolve()),
    )
    OUT.mkdir(parents=True, exist_ok=True)
    variants = ["bare", "bare_zarr", "deepspeed", "platform"]
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    walls: list[float] = []
    for r in range(args.rounds):
        runs = {
            "bare": lambda: bare_torch(cfg, read_in_step=False),
            "bare_zarr": lambda: bare_torch(cfg, read_in_step=True),
            "deepspeed": lambda: deepspeed_engine(cfg),
        }
        for key, fn in runs.items():
            steps = fn()
            rates[key].append(steady_rate(steps.wall_s, cfg.warmup))
            cpus[key].append(steps.cpu_s_per_step)
        steps, wall = platform_run(cfg, name=f"overhead-{r}")
        rates["platform"].append(steady_rate(steps.wall_s, cfg.warmup))
        cpus["platform"].append(steps.cpu_s_per_step)
        walls.append(wall)
        print(
            f"round {r}: "
            + ", ".join(f"{k} {rates[k][-1]:.2f} steps/s ({cpus[k][-1] * 1000:.0f} ms CPU)" for k in variants)
            + f"; platform launch {wall:.0f} s",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    record = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "command": "bench/bench_overhead.py " + " ".join(sys.argv[1:]),
        "config": {**cfg.__dict__, "shards": str(cfg.shards)},
        "rates_steps_per_s": rates,
        "cpu_s_per_step": cpus,
        "median": med,
        "median_cpu_s_per_step": med_cpu,
        "platform_over_bare": med["platform"] / med["bare"],
        "platform_over_bare_cpu": med_cpu["bare"] / med_cpu["platform"],
        "load_average": os.getloadavg(),
        "platform_launch_s": walls,
        "torch": torch.__version__,
    }
    print(json.dumps(record, indent=1, default=str))
    print(
        "\n| variant | steps/s, wall (rounds) | vs bare | CPU ms per step (rounds) | vs bare, CPU |"
        "\n|---|---|---|---|---|"
    )
    for k, label in [
        ("bare", "bare torch, in-memory batches"),
        ("bare_zarr", "bare torch + Zarr reads in the step"),
        ("deepspeed", "DeepSpeed engine, in-memory batches"),
        ("platform", "platform (Ray Train + DeepSpeed + loader + MLflow)"),
    ]:
        each = ", ".join(f"{v:.2f}" for v in rates[k])
        each_cpu = ", ".join(f"{v * 1000:.0f}" for v in cpus[k])
        print(
            f"| {label} | {med[k]:.2f} ({each}) | {med[k] / med['bare']:.2f} | "
            f"{med_cpu[k] * 1000:.0f} ({each_cpu}) | {med_cpu['bare'] / med_cpu[k]:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
