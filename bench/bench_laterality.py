"""Left and right (issue 15): validation Dice of the three ``data.augmentation.laterality`` modes.

Each run is the real platform, ``multitalent train JOB --set data.augmentation.laterality=MODE
--set run.seed=SEED --set schedule.epochs=...``, on the converted phantom collection (convert first:
``multitalent convert jobs/convert.yaml``). Runs go one after the other (they share the machine's
cores); the script then reads each run's final validation Dice from its MLflow store
(``runs/<name>/mlflow.db``, read-only sqlite) and reports, per run and per mode (mean over seeds):

- every lateral pair class of the catalog (phantom: P04 left/right kidney, P05 left/right lung),
- the mean over paired classes and over unpaired classes, each over the classes every run validated
  (validation patches are drawn from the seed: a class in no patch of a seed has no Dice there).

The issue's protocol is ``jobs/demo_cpu.yaml`` for 2,000 iterations (50 epochs of 40), about 20 min
a run on 2 cores; ``--iterations`` sets the budget (``schedule.epochs = iterations / 40``), and
``--validate-every`` the validation cadence in epochs (the last epoch always validates).

    .venv/bin/python bench/bench_laterality.py --iterations 2000            # the issue's protocol
    .venv/bin/python bench/bench_laterality.py --iterations 400 --seeds 0 1 # what fits a busy machine
    .venv/bin/python bench/bench_laterality.py --report-only --iterations 400  # re-read finished runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform as pyplatform
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "laterality"
MODES = ("swap", "off", "naive")
ITERATIONS_PER_EPOCH = 40  # jobs/demo_cpu.yaml


def run_name(mode: str, seed: int, iterations: int) -> str:
    return f"laterality-{mode}-s{seed}-it{iterations}"


def train(args: argparse.Namespace, mode: str, seed: int) -> dict[str, Any]:
    epochs = args.iterations // ITERATIONS_PER_EPOCH
    name = run_name(mode, seed, args.iterations)
    cmd = [
        str(Path(sys.executable).with_name("multitalent")),
        "train",
        args.job,
        "--set", f"run.name={name}",
        "--set", f"run.storage_path={args.storage}",
        "--set", f"run.seed={seed}",
        "--set", f"data.augmentation.laterality={mode}",
        "--set", f"schedule.epochs={epochs}",
        "--set", f"schedule.iterations_per_epoch={ITERATIONS_PER_EPOCH}",
        "--set", f"validation.every_epochs={args.validate_every}",
    ]  # fmt: skip
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-m", "multitalent.cli"]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    log = OUT / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}; see {log}")
    return {"name": name, "wall_s": round(wall, 1), "command": " ".join(cmd)}


def read_dice(storage: Path, name: str) -> dict[str, dict[int, float]]:
    """``metric -> {iteration: value}`` of every ``val/dice/...`` metric of run ``name``."""
    db = storage / name / "mlflow.db"
    if not db.is_file():
        raise SystemExit(f"{db}: no MLflow store (has run {name} finished?)")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("select key, step, value from metrics where key like 'val/dice/%'").fetchall()
    finally:
        con.close()
    out: dict[str, dict[int, float]] = {}
    for key, step, value in rows:
        out.setdefault(key, {})[int(step)] = float(value)
    return out


def class_keys(catalog_name: str) -> tuple[list[str], list[str]]:
    """MLflow keys of the paired and the unpaired classes of the catalog."""
    from multitalent.catalog import lateral_swap, load_catalog
    from multitalent.metric_names import metric_key

    cat = load_catalog(catalog_name)
    swap = lateral_swap(cat)
    keys = [metric_key(f"val/dice/{c.dataset_id}/{c.name.replace('/', '_')}") for c in cat.classes]
    paired = [k for i, k in enumerate(keys) if swap[i] != i]
    unpaired = [k for i, k in enumerate(keys) if swap[i] == i]
    return paired, unpaired


def final(history: dict[int, float]) -> float:
    return history[max(history)]


def _mean(values: list[float]) -> float:
    """Mean of the runs that scored the class (a class in no validation patch of a seed has no Dice)."""
    scored = [v for v in values if not math.isnan(v)]
    return statistics.fmean(scored) if scored else float("nan")


def summarise(results: list[dict[str, Any]], paired: list[str], unpaired: list[str]) -> dict[str, Any]:
    # Unpaired classes count only where every run validated them (a class absent from every
    # validation patch has no Dice).
    common = [k for k in unpaired if all(k in r["dice"] for r in results)]
    common_paired = [k for k in paired if all(k in r["dice"] for r in results)]
    rows = []
    for r in results:
        dice = {k: final(r["dice"][k]) for k in paired + common if k in r["dice"]}
        rows.append(
            {
                "mode": r["mode"],
                "seed": r["seed"],
                "wall_s": r.get("wall_s"),
                "paired": {k: dice.get(k, float("nan")) for k in paired},
                "paired_mean": statistics.fmean(dice[k] for k in common_paired),
                "unpaired_mean": statistics.fmean(dice[k] for k in common),
                "history": {k: r["dice"][k] for k in paired if k in r["dice"]},
            }
        )
    modes = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        modes.append(
            {
                "mode": mode,
                "seeds": [r["seed"] for r in mine],
                "paired": {k: _mean([r["paired"][k] for r in mine]) for k in paired},
                "paired_mean": statistics.fmean(r["paired_mean"] for r in mine),
                "unpaired_mean": statistics.fmean(r["unpaired_mean"] for r in mine),
            }
        )
    return {"runs": rows, "modes": modes, "paired_classes": common_paired, "unpaired_classes": common}


def table(summary: dict[str, Any], paired: list[str]) -> str:
    short = [k.removeprefix("val/dice/") for k in paired]
    head = ["mode", "seed", *short, "paired mean", "unpaired mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["runs"]:
        cells = [r["mode"], str(r["seed"]), *(f"{r['paired'][k]:.2f}" for k in paired)]
        lines.append(
            "| " + " | ".join([*cells, f"{r['paired_mean']:.3f}", f"{r['unpaired_mean']:.3f}"]) + " |"
        )
    for m in summary["modes"]:
        cells = [f"**{m['mode']}**", "mean", *(f"{m['paired'][k]:.2f}" for k in paired)]
        lines.append(
            "| " + " | ".join([*cells, f"{m['paired_mean']:.3f}", f"{m['unpaired_mean']:.3f}"]) + " |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="jobs/demo_cpu.yaml")
    p.add_argument("--iterations", type=int, default=2000, help="per run; a multiple of 40")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--validate-every", type=int, default=4, help="epochs between validations")
    p.add_argument("--storage", type=Path, default=REPO / "runs")
    p.add_argument("--report-only", action="store_true", help="read finished runs, train nothing")
    args = p.parse_args()
    if args.iterations % ITERATIONS_PER_EPOCH:
        p.error(f"--iterations must be a multiple of {ITERATIONS_PER_EPOCH}")
    OUT.mkdir(parents=True, exist_ok=True)
    from multitalent.train.job import load_train_job

    catalog = load_train_job(REPO / args.job).catalog
    paired, unpaired = class_keys(catalog)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results = []
    for seed in args.seeds:
        for mode in args.modes:
            info = {"mode": mode, "seed": seed, "name": run_name(mode, seed, args.iterations)}
            if not args.report_only:
                info |= train(args, mode, seed)
                print(f"  {info['name']}: {info['wall_s']:.0f} s", flush=True)
            info["dice"] = read_dice(args.storage, info["name"])
            results.append(info)
    summary = summarise(results, paired, unpaired)
    text = table(summary, paired)
    record = {
        "started_utc": started,
        "machine": f"{pyplatform.node()} {pyplatform.machine()}, {os.cpu_count()} CPUs",
        "job": args.job,
        "iterations": args.iterations,
        "argv": sys.argv,
        **summary,
    }
    stem = f"laterality_it{args.iterations}"
    (OUT / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (OUT / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {OUT / stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
