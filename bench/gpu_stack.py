"""Helper of bench/gpu_stack.sh: the bare loop to compare with, and the report of the whole-stack runs.

    python3 bench/gpu_stack.py bare --catalog phantom --arch resenc_unet --size paper --patch 96,192,192 \
        --out /tmp/stack/bare.json
    python3 bench/gpu_stack.py report --storage /tmp/stack/runs --runs stack-z1,stack-z3 \
        --bare /tmp/stack/bare.json --out /tmp/stack/report.json

``bare``: bench/gpu.py's training-step timings (bare torch loop, platform step, platform step + GPU
augmentation; bf16 autocast, CUDA events, median) for the same network, patch, batch and label space as
the stack's job, in the same call.

``report``: per launch of each run (a launch starts where progress.jsonl has a ``start`` record), the
steady steps/s from the wall-clock timestamps MLflow stores with each iteration's loss (iterations
``warmup..`` of the launch; start-up excluded), its ratio to the bare loop's steps/s (target >= 0.9) and to
the in-process platform step, the launch's wall time from start to last step, the resume point and whether
the loss history is continuous across the resume. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bare(args: argparse.Namespace) -> None:
    import torch

    import gpu
    from multitalent.catalog import load_catalog

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    catalog = load_catalog(args.catalog)
    z, y, x = (int(v) for v in args.patch.split(","))
    res = gpu.bench_train(device, catalog, args.arch, (z, y, x), args.batch, args.reps, args.size)
    res["catalog"], res["heads"] = args.catalog, catalog.num_classes
    res["arch"], res["size"], res["patch"], res["batch"] = args.arch, args.size, [z, y, x], args.batch
    res["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps(res, indent=1))


def _launches(run_dir: Path) -> list[dict[str, Any]]:
    """The ``start`` records of progress.jsonl, each with the iteration it started from."""
    path = run_dir / "progress.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [r for r in records if r.get("event") == "start"]
    ends = [r for r in records if r.get("event") == "end"]
    for i, s in enumerate(starts):
        s["end"] = ends[i] if i < len(ends) else None
    return starts


def _history(tracking_uri: str, run_id: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return {m.step: m.timestamp / 1000.0 for m in client.get_metric_history(run_id, "train/loss")}


def report(args: argparse.Namespace) -> int:
    storage = Path(args.storage)
    tracking_uri = args.tracking_uri or f"sqlite:///{storage / 'mlflow.db'}"
    bare_res = json.loads(Path(args.bare).read_text()) if args.bare and Path(args.bare).is_file() else {}
    bare_ms = bare_res.get("bare torch loop", {}).get("ms")
    step_ms = bare_res.get("platform step", {}).get("ms")
    aug_ms = bare_res.get("platform step + GPU augmentation", {}).get("ms")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for name in [r for r in args.runs.split(",") if r]:
        run_dir = storage / name
        id_file = run_dir / "mlflow_run_id"
        if not id_file.is_file():
            problems.append(f"{name}: no MLflow run id in {run_dir} (the run did not start)")
            continue
        stamps = _history(tracking_uri, id_file.read_text().strip())
        launches = _launches(run_dir)
        steps = sorted(stamps)
        if not steps:
            problems.append(f"{name}: no train/loss points in MLflow")
            continue
        if steps != list(range(steps[-1] + 1)):
            missing = sorted(set(range(steps[-1] + 1)) - set(steps))
            problems.append(f"{name}: loss history has gaps at iterations {missing[:10]}")
        for k, launch in enumerate(launches):
            first = int(launch["iteration"])
            last = int(launches[k + 1]["iteration"]) - 1 if k + 1 < len(launches) else steps[-1]
            window = [i for i in range(first + args.warmup, last + 1) if i in stamps and i - 1 in stamps]
            row: dict[str, Any] = {
                "run": name,
                "launch": k + 1,
                "iterations": f"{first}-{last}",
                "resumed_from": Path(launch["resumed_from"]).name if launch.get("resumed_from") else "",
            }
            if len(window) >= 2:
                seconds = stamps[window[-1]] - stamps[window[0] - 1]
                rate = len(window) / seconds
                row["steps_per_s"] = rate
                row["ms_per_step"] = 1e3 / rate
                row["vs_bare"] = rate * bare_ms / 1e3 if bare_ms else math.nan
                row["vs_platform_step"] = rate * step_ms / 1e3 if step_ms else math.nan
                row["vs_platform_step_aug"] = rate * aug_ms / 1e3 if aug_ms else math.nan
            else:
                problems.append(f"{name} launch {k + 1}: fewer than {args.warmup + 2} iterations timed")
            if first in stamps:
                row["startup_s"] = stamps[first] - float(launch["time"])  # workers up -> first step done
            end = launch.get("end")
            if end:
                row["launch_s"] = float(end.get("seconds", math.nan))
            rows.append(row)
        if len(launches) > 1 and launches[1].get("resumed_from") is None:
            problems.append(f"{name}: the second launch did not resume from a checkpoint")
    if args.out:
        result = {"bare": bare_res, "rows": rows, "problems": problems}
        Path(args.out).write_text(json.dumps(result, indent=1))

    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, int | float) and math.isfinite(v) else "-"

    print(f"\nwhole stack vs in-process loops ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    if bare_res:
        b = bare_res.get
        print(
            f"in-process, same call ({b('device')}, {b('arch')} {b('size')}, {b('heads')} heads of "
            f"{b('catalog')}, batch {b('batch')}, patch {b('patch')}): bare loop {f(bare_ms, '.1f')} ms, "
            f"platform step {f(step_ms, '.1f')} ms, + GPU augmentation {f(aug_ms, '.1f')} ms"
        )
    print(
        "| run | launch | iterations | resumed from | steps/s | ms/step | ÷ bare loop | ÷ platform step "
        "| ÷ step + aug. | first step after start s | launch s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['launch']} | {r['iterations']} | {r['resumed_from'] or '-'} | "
            f"{f(r.get('steps_per_s'), '.2f')} | {f(r.get('ms_per_step'), '.1f')} | "
            f"{f(r.get('vs_bare'), '.2f')} | {f(r.get('vs_platform_step'), '.2f')} | "
            f"{f(r.get('vs_platform_step_aug'), '.2f')} | "
            f"{f(r.get('startup_s'), '.1f')} | {f(r.get('launch_s'), '.0f')} |"
        )
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bare", help="bench/gpu.py's training-step timings for the stack's configuration")
    b.add_argument("--device", default="cuda")
    b.add_argument("--catalog", default="phantom")
    b.add_argument("--arch", default="resenc_unet")
    b.add_argument("--size", default="paper")
    b.add_argument("--patch", default="96,192,192")
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    b.add_argument("--out", required=True)
    r = sub.add_parser("report", help="steps/s of the stack's runs against the bare loop")
    r.add_argument("--storage", required=True, help="run.storage_path of the runs")
    r.add_argument("--runs", required=True, help="run names, comma-separated")
    r.add_argument("--bare", default="", help="the bare subcommand's JSON")
    r.add_argument("--tracking-uri", default="", help="default: sqlite:///<storage>/mlflow.db")
    r.add_argument("--warmup", type=int, default=10, help="iterations of each launch left out")
    r.add_argument("--out", default="")
    args = p.parse_args()
    if args.cmd == "bare":
        bare(args)
    else:
        raise SystemExit(report(args))


if __name__ == "__main__":
    main()
