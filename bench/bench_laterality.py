"""Left and right (issue 15): validation Dice of the three ``data.augmentation.laterality`` modes.

Each run is the real platform, ``multitalent train JOB --set data.augmentation.laterality=MODE
--set run.seed=SEED --set schedule.epochs=...``, on the converted phantom collection. Runs go one
after the other (they share the machine's cores); the script then reads each run's validation Dice
from its MLflow store (``<storage>/mlflow.db``, read-only sqlite, the run id from the run directory)
and reports, per run and per mode (mean over seeds):

- every lateral pair class of the catalog (phantom: P04 left/right kidney, P05 left/right lung),
- the mean over paired classes and over unpaired classes, each over the classes every run validated
  (validation patches are drawn from the seed: a class in no patch of a seed has no Dice there),
- the confound check: each mode's gain over ``--reference`` (default ``naive``) on paired and on
  unpaired classes, and their difference. ``swap`` and ``naive`` mirror exactly as often, so their
  difference is the effect of the labels alone; ``off`` also mirrors less, which may speed up
  convergence for every class: the part of its paired gain that its unpaired classes share is that,
  the rest is laterality. The mean unpaired Dice at every validation shows whether the runs converged.

``--datasets`` trains on a subset of the job's catalog (e.g. the datasets with lateral pairs and
two without), so that the paired datasets get a larger share of the iterations: the script writes
the subset catalog (``bench/out/laterality/catalog-<ids>.json``) and converts it with
``multitalent convert jobs/convert.yaml`` into ``data_shards/phantom-<ids>`` (skipped when up to date).
Without it the job's collection must be converted first (``multitalent convert jobs/convert.yaml``).

    .venv/bin/python bench/bench_laterality.py --iterations 2000            # the issue's protocol
    .venv/bin/python bench/bench_laterality.py --datasets P01 P04 P05 P07 --iterations 1200 \\
        --iterations-per-epoch 100 --validate-every 2 --val-patches 4      # docs/results.md
    .venv/bin/python bench/bench_laterality.py ... --report-only            # re-read finished runs

A run whose final validation is already in the store is not trained again (delete its directory to
redo it); an interrupted run resumes from its last checkpoint.
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


def run_name(args: argparse.Namespace, mode: str, seed: int) -> str:
    tag = f"-{''.join(args.datasets)}" if args.datasets else ""
    return f"laterality{tag}-{mode}-s{seed}-it{args.iterations}"


def subset_catalog(catalog_name: str, datasets: list[str]) -> Path:
    """A catalog file holding ``datasets`` of ``catalog_name`` (the preset's entries, unchanged)."""
    from multitalent.catalog import load_catalog

    cat = load_catalog(catalog_name)
    known = [d.id for d in cat.datasets]
    missing = [d for d in datasets if d not in known]
    if missing:
        raise SystemExit(f"--datasets: {missing} not in catalog {catalog_name!r} ({', '.join(known)})")
    data = cat.to_dict()
    data.pop("hash", None)  # of the whole catalog; the subset's is computed when it is loaded
    data["name"] = f"{cat.name}-{''.join(datasets)}"
    data["datasets"] = [d for d in data["datasets"] if d["id"] in datasets]
    path = OUT / f"catalog-{''.join(datasets)}.json"
    text = json.dumps(data, indent=1) + "\n"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def convert(catalog: Path, out: Path) -> None:
    cmd = [
        *cli(),
        "convert",
        "jobs/convert.yaml",
        "--set", f"catalog={catalog}",
        "--set", f"out={out}",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"conversion into {out}: exit {proc.returncode}")


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("multitalent")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "multitalent.cli"]


def overrides(args: argparse.Namespace, mode: str, seed: int) -> list[str]:
    epochs = args.iterations // args.iterations_per_epoch
    sets = [
        f"run.name={run_name(args, mode, seed)}",
        f"run.storage_path={args.storage}",
        f"run.seed={seed}",
        f"data.augmentation.laterality={mode}",
        f"schedule.epochs={epochs}",
        f"schedule.iterations_per_epoch={args.iterations_per_epoch}",
        f"checkpoint.every_iterations={args.iterations_per_epoch}",
        f"validation.every_epochs={args.validate_every}",
        f"validation.patches_per_case={args.val_patches}",
    ]
    if args.catalog_file is not None:
        sets += [f"catalog={args.catalog_file}", f"shards.path={args.shards}"]
    return sets


def train(args: argparse.Namespace, mode: str, seed: int) -> dict[str, Any]:
    name = run_name(args, mode, seed)
    cmd = [*cli(), "train", args.job]
    for s in overrides(args, mode, seed):
        cmd += ["--set", s]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    log = OUT / f"{name}.log"
    for attempt in range(1 + args.retries):
        # A failed launch (on a shared machine: a worker killed for memory) is relaunched under the
        # same run name, which resumes from its last verified checkpoint.
        with log.open("a") as f:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
        if proc.returncode == 0:
            break
        print(f"  {name}: exit {proc.returncode} (attempt {attempt + 1}); see {log}", flush=True)
    else:
        raise SystemExit(f"{name}: failed {1 + args.retries} times; see {log}")
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 1), "attempts": attempt + 1, "command": " ".join(cmd)}


def read_dice(storage: Path, name: str) -> dict[str, dict[int, float]]:
    """``metric -> {iteration: value}`` of every ``val/dice/...`` metric of run ``name`` (iterations
    counted from 1, as the run prints them); empty when the run has not logged any (not started).

    The MLflow run id is in ``<storage>/<name>/mlflow_run_id``; the store is ``<storage>/mlflow.db``
    (one per storage path), or ``<storage>/<name>/mlflow.db`` for runs from before 2026-11-30.
    """
    run_dir = storage / name
    id_file = run_dir / "mlflow_run_id"
    if not id_file.is_file():
        return {}
    run_id = id_file.read_text().strip()
    out: dict[str, dict[int, float]] = {}
    for db in (storage / "mlflow.db", run_dir / "mlflow.db"):
        if not db.is_file():
            continue
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "select key, step, value from metrics where run_uuid = ? and key like 'val/dice/%'",
                (run_id,),
            ).fetchall()
        finally:
            con.close()
        for key, step, value in rows:
            # Validation is logged on the MLflow step of the iteration that ended (iteration - 1).
            out.setdefault(key, {})[int(step) + 1] = float(value)
        if out:
            break
    return out


def train_seconds(run_dir: Path) -> float | None:
    """Seconds the run's last launch trained (its ``end`` record in ``progress.jsonl``)."""
    path = run_dir / "progress.jsonl"
    if not path.is_file():
        return None
    ends = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == "end"]
    return round(float(ends[-1]["seconds"]), 1) if ends else None


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


def summarise(
    results: list[dict[str, Any]], paired: list[str], unpaired: list[str], *, reference: str
) -> dict[str, Any]:
    # A class counts only where every run validated it (a class absent from every validation patch
    # of a seed has no Dice there).
    common = [k for k in unpaired if all(k in r["dice"] for r in results)]
    common_paired = [k for k in paired if all(k in r["dice"] for r in results)]
    late = late_classes(results, common)
    rows = []
    for r in results:
        dice = {k: final(r["dice"][k]) for k in paired + common if k in r["dice"]}
        steps = sorted(set.intersection(*(set(r["dice"][k]) for k in common))) if common else []
        rows.append(
            {
                "mode": r["mode"],
                "seed": r["seed"],
                "name": r["name"],
                "wall_s": r.get("wall_s"),
                "train_s": r.get("train_s"),
                "paired": {k: dice.get(k, float("nan")) for k in paired},
                "paired_mean": statistics.fmean(dice[k] for k in common_paired),
                "unpaired_mean": statistics.fmean(dice[k] for k in common),
                "late_mean": statistics.fmean(dice[k] for k in late) if late else float("nan"),
                "final": dice,
                # mean unpaired Dice at each validation: did the run converge?
                "unpaired_curve": {s: statistics.fmean(r["dice"][k][s] for k in common) for s in steps},
                "paired_curve": {
                    s: statistics.fmean(r["dice"][k][s] for k in common_paired)
                    for s in steps
                    if all(s in r["dice"][k] for k in common_paired)
                },
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
                "late_mean": statistics.fmean(r["late_mean"] for r in mine),
                "final": {k: statistics.fmean(r["final"][k] for r in mine) for k in common_paired + common},
            }
        )
    # Gains over the reference mode, seed by seed (the same validation patches within a seed).
    ref = {r["seed"]: r for r in rows if r["mode"] == reference}
    gains = []
    for m in modes:
        per_seed = [
            (
                r["paired_mean"] - ref[r["seed"]]["paired_mean"],
                r["unpaired_mean"] - ref[r["seed"]]["unpaired_mean"],
                r["late_mean"] - ref[r["seed"]]["late_mean"],
            )
            for r in rows
            if r["mode"] == m["mode"] and r["seed"] in ref
        ]
        if per_seed and m["mode"] != reference:
            dp = [p for p, _, _ in per_seed]
            du = [u for _, u, _ in per_seed]
            gains.append(
                {
                    "mode": m["mode"],
                    "paired_gain": dp,
                    "unpaired_gain": du,
                    "late_unpaired_gain": [v for _, _, v in per_seed],
                    "laterality_gain": [p - u for p, u, _ in per_seed],
                }
            )
    return {
        "runs": rows,
        "modes": modes,
        "reference": reference,
        "gains": gains,
        "paired_classes": common_paired,
        "unpaired_classes": common,
        "late_unpaired_classes": late,
    }


def late_classes(results: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """Unpaired classes learned late: mean Dice over the runs below 0.2 at the validation nearest the
    middle of the budget, and at least 0.1 at the end in some run (never-learned classes say nothing).
    A faster-converging mode leads on these as on late paired classes (the kidneys) for that reason
    alone, so they are the yardstick for its lead on those."""
    last = min(max(r["dice"][k]) for r in results for k in keys) if keys else 0
    late = []
    for k in keys:
        steps = sorted(set.intersection(*(set(r["dice"][k]) for r in results)))
        mid = min(steps, key=lambda s: abs(s - last / 2))
        at_mid = statistics.fmean(r["dice"][k][mid] for r in results)
        if at_mid < 0.2 and max(final(r["dice"][k]) for r in results) >= 0.1:
            late.append(k)
    return late


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(summary: dict[str, Any], paired: list[str]) -> str:
    short = [k.removeprefix("val/dice/") for k in paired]
    head = ["mode", "seed", *short, "paired mean", "unpaired mean", "late unpaired mean"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for r in summary["runs"]:
        cells = [r["mode"], str(r["seed"]), *(f"{r['paired'][k]:.2f}" for k in paired)]
        means = [f"{r['paired_mean']:.3f}", f"{r['unpaired_mean']:.3f}", f"{r['late_mean']:.3f}"]
        lines.append(_row([*cells, *means]))
    for m in summary["modes"]:
        cells = [f"**{m['mode']}**", "mean", *(f"{m['paired'][k]:.2f}" for k in paired)]
        means = [f"{m['paired_mean']:.3f}", f"{m['unpaired_mean']:.3f}", f"{m['late_mean']:.3f}"]
        lines.append(_row([*cells, *means]))
    late = ", ".join(k.removeprefix("val/dice/") for k in summary["late_unpaired_classes"]) or "none"
    lines += ["", f"late unpaired classes: {late}"]
    if summary["gains"]:
        ref = summary["reference"]
        head = [f"gain over {ref}, per seed", "paired", "unpaired", "late unpaired", "paired - unpaired"]
        lines += ["", _row(head), "|---|---|---|---|---|"]
        for g in summary["gains"]:
            fmt = lambda v: " / ".join(f"{x:+.3f}" for x in v)  # noqa: E731
            cells = [g["paired_gain"], g["unpaired_gain"], g["late_unpaired_gain"], g["laterality_gain"]]
            lines.append(_row([g["mode"], *(fmt(c) for c in cells)]))
    lines += ["", _row(["class", *(m["mode"] for m in summary["modes"])])]
    lines.append("|" + "---|" * (1 + len(summary["modes"])))
    for k in summary["paired_classes"] + summary["unpaired_classes"]:
        lines.append(_row([k.removeprefix("val/dice/"), *(f"{m['final'][k]:.2f}" for m in summary["modes"])]))
    lines += ["", _row(["run", "paired mean at each validation", "unpaired mean at each validation"])]
    lines.append("|---|---|---|")
    for r in summary["runs"]:
        pc = ", ".join(f"{v:.2f}" for _, v in sorted(r["paired_curve"].items()))
        uc = ", ".join(f"{v:.2f}" for _, v in sorted(r["unpaired_curve"].items()))
        steps = ", ".join(str(s) for s in sorted(r["unpaired_curve"]))
        lines.append(_row([f"{r['mode']} s{r['seed']} (it {steps})", pc, uc]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="jobs/laterality_cpu.yaml")
    p.add_argument("--iterations", type=int, default=2000, help="per run")
    p.add_argument("--iterations-per-epoch", type=int, default=40, help="also the checkpoint interval")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--reference", default="naive", choices=MODES, help="mode the gains are measured from")
    p.add_argument("--validate-every", type=int, default=4, help="epochs between validations")
    p.add_argument("--val-patches", type=int, default=1, help="validation patches per case")
    p.add_argument("--datasets", nargs="+", help="train on these datasets of the catalog only")
    p.add_argument("--storage", type=Path, default=REPO / "runs")
    p.add_argument("--report-only", action="store_true", help="read finished runs, train nothing")
    p.add_argument("--retries", type=int, default=2, help="relaunches (resuming) of a failed run")
    args = p.parse_args()
    if args.iterations % args.iterations_per_epoch:
        p.error(f"--iterations must be a multiple of --iterations-per-epoch ({args.iterations_per_epoch})")
    args.storage = args.storage.resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    from multitalent.train.job import load_train_job

    catalog = load_train_job(REPO / args.job).catalog
    args.catalog_file = args.shards = None
    if args.datasets:
        args.datasets = sorted(dict.fromkeys(args.datasets))
        args.catalog_file = subset_catalog(catalog, args.datasets)
        args.shards = REPO / "data_shards" / f"{catalog}-{''.join(args.datasets)}"
        if not args.report_only:
            convert(args.catalog_file, args.shards)
        catalog = str(args.catalog_file)
    paired, unpaired = class_keys(catalog)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results = []
    for seed in args.seeds:
        for mode in args.modes:
            name = run_name(args, mode, seed)
            info: dict[str, Any] = {"mode": mode, "seed": seed, "name": name}
            done = any(args.iterations in h for h in read_dice(args.storage, name).values())
            if not args.report_only and not done:
                info |= train(args, mode, seed)
                print(f"  {name}: {info['wall_s']:.0f} s", flush=True)
            info["dice"] = read_dice(args.storage, name)
            info["train_s"] = train_seconds(args.storage / name)
            if not info["dice"]:
                raise SystemExit(f"{args.storage / name}: no validation logged (has the run finished?)")
            results.append(info)
    summary = summarise(results, paired, unpaired, reference=args.reference)
    text = table(summary, paired)
    record = {
        "started_utc": started,
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{pyplatform.node()} {pyplatform.machine()}, {os.cpu_count()} CPUs",
        "job": args.job,
        "overrides": overrides(args, "MODE", 0),
        "iterations": args.iterations,
        "argv": sys.argv,
        **summary,
    }
    stem = f"laterality{'-' + ''.join(args.datasets) if args.datasets else ''}_it{args.iterations}"
    (OUT / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (OUT / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {OUT / stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
