"""Fine-tuning vs training from scratch, and the cost of 47 vs 164 heads (issue 7).

**Fine-tune vs scratch** on the phantom collection, one phantom dataset held out of pre-training:

1. write the phantom raw collection; convert every dataset but the held-out one (``--holdout``, default
   P03, the kidneys + kidney tumour of the KiTS19 layout);
2. pre-train the tiny U-Net on it for ``--pretrain`` iterations and write a model package of the result;
3. convert the held-out dataset with the package's plan (``plan: <package>``);
4. for each N of ``--iterations``: fine-tune (``init: transfer: backbone``, the three phases scaled to N:
   1/8 heads, 2/8 warmup, 5/8 poly) and train from scratch (poly) for N iterations, same seed, same lr;
   report the held-out dataset's validation Dice (fold 0, fixed foreground patches).

Runs in process (the worker's ``Trainer``, a gloo group of one, no Ray, no MLflow): the same assembly,
engine and phases as ``multitalent train``.

**47 vs 164 heads**: the paper-size residual-encoder U-Net built for multitalent13 (47 classes) and for
multitalent13+totalsegmentator (164), at a CPU-sized patch: parameters, peak resident memory of
forward + loss + backward (each in a fresh process), and the step time (median).

    .venv/bin/python bench/bench_finetune.py                      # both parts
    .venv/bin/python bench/bench_finetune.py --part heads --patch 32,64,64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform as pyplatform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))


def _process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo", rank=0, world_size=1)


def _job(shards: Path, storage: Path, name: str, overrides: list[str]):
    from multitalent.train.job import load_train_job

    return load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [
            f"shards.path={shards}",
            f"run.storage_path={storage}",
            f"run.name={name}",
            "workers.num_workers=1",
            "batch.global_size=2",
            "optimiser.lr=0.05",
            "optimiser.momentum=0.9",
            "data.augmentation.enabled=false",
            "validation.patches_per_case=4",
            "validation.overlays=false",
            "validation.max_cases=null",
            *overrides,
        ],
    )


def _train(job, run_dir: Path):
    """Train in process; returns the trainer (its engine holds the weights)."""
    import torch

    from multitalent.train.loop import Trainer, WorkerInfo

    trainer = Trainer(job, worker=WorkerInfo(0, 1, torch.device("cpu"), False), run_dir=run_dir)
    trainer.fit([])
    return trainer


def _dice(trainer, dataset: str) -> dict[str, float]:
    from multitalent.train.callbacks import Validation

    v = Validation()
    v.on_start(trainer)
    trainer.engine.eval()
    outcome = v.validator.run(
        trainer.engine, device=trainer.device, dtype=trainer.dtype, lut=trainer.lut, title=""
    )
    return {
        k.removeprefix(f"val/dice/{dataset}/"): round(v, 4)
        for k, v in outcome.metrics.items()
        if k.startswith(f"val/dice/{dataset}/")
    }


def _convert(raw: Path, out: Path, datasets: list[str], plan: str | None = None) -> None:
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion
    from multitalent.jobs import load_job

    overrides = [
        f"raw_root={raw}",
        f"out={out}",
        "ray.num_cpus=2",
        "synth=null",
        f"datasets=[{', '.join(datasets)}]",
    ]
    if plan:
        overrides.append(f"plan={plan}")
    summary = run_conversion(
        load_job(REPO / "jobs" / "convert.yaml", ConvertJob, overrides), log=lambda _: None
    )
    if not summary.ok:
        raise RuntimeError(summary.failures)


def finetune_vs_scratch(args: argparse.Namespace) -> dict:
    from multitalent.catalog import load_preset
    from multitalent.registry.package import ModelCard, write_package
    from multitalent.synth import write_phantom_collection

    _process_group()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-finetune-"))
    raw = work / "raw"
    if not raw.exists():
        write_phantom_collection(raw, seed=0, scale=args.scale)
    phantom = load_preset("phantom")
    pre_ids = [d for d in phantom.dataset_ids if d != args.holdout]
    pre_shards, tgt_shards = work / "pretrain_shards", work / "target_shards"
    t0 = time.perf_counter()
    if not (pre_shards / "manifest.json").exists():
        _convert(raw, pre_shards, pre_ids)
    patch = args.patch
    common = [f"architecture.patch_zyx=[{patch}]"]
    pre_cat = phantom.subset(pre_ids)
    pre_cat_file = work / "pretrain_catalog.json"
    pre_cat_file.write_text(json.dumps(pre_cat.to_dict()))
    ipe = max(1, args.pretrain // 8)
    package = work / "package"
    if package.exists():  # a rerun in the same --workdir reuses the pre-trained package
        print(f"[bench] reusing {package}", flush=True)
    else:
        overrides = [*common, f"catalog={pre_cat_file}", "schedule.epochs=8"]
        overrides += [f"schedule.iterations_per_epoch={ipe}", "validation.fold=null"]
        pre = _train(_job(pre_shards, work / "runs", "pretrain", overrides), work / "runs" / "pretrain")
        write_package(
            package,
            model=pre.engine.module,
            state_dict=pre.engine.module.state_dict(),
            plan=pre.setup.plan,
            catalog=pre.catalog,
            card=ModelCard(cases={}, validation={}, training={"iterations": pre.state.iteration}),
        )
    if not (tgt_shards / "manifest.json").exists():
        _convert(raw, tgt_shards, [args.holdout], plan=str(package))
    tgt_cat_file = work / "target_catalog.json"
    tgt_cat_file.write_text(json.dumps(phantom.subset([args.holdout]).to_dict()))
    prep_s = time.perf_counter() - t0
    rows = []
    for n in args.iterations:
        ipe = max(1, n // 8)
        base = [
            *common,
            f"catalog={tgt_cat_file}",
            "schedule.epochs=8",
            f"schedule.iterations_per_epoch={ipe}",
        ]
        row: dict = {"iterations": 8 * ipe}
        for kind, extra in (
            ("scratch", []),
            (
                "finetune",
                [
                    f"init={{model: '{package}', transfer: backbone}}",
                    "finetune={heads_epochs: 1, warmup_epochs: 2, heads_lr: 0.005}",
                ],
            ),
        ):
            t = time.perf_counter()
            trainer = _train(
                _job(tgt_shards, work / "runs", f"{kind}-{n}", [*base, *extra]), work / "runs" / f"{kind}-{n}"
            )
            row[kind] = _dice(trainer, args.holdout)
            row[f"{kind}_s"] = round(time.perf_counter() - t, 1)
            print(f"[bench] N={8 * ipe} {kind}: {row[kind]} ({row[f'{kind}_s']} s)", flush=True)
        rows.append(row)
    return {
        "holdout": args.holdout,
        "pretrain_iterations": 8 * ipe,
        "patch_zyx": patch,
        "prep_s": round(prep_s, 1),
        "rows": rows,
    }


HEADS_CHILD = r"""
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from multitalent.catalog import load_catalog
from multitalent.models import build_network
from multitalent.train.step import MultiTalentObjective, StepInputs
catalog = load_catalog(sys.argv[2]); patch = [int(p) for p in sys.argv[3].split(",")]
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[4]))
net = build_network("resenc_unet", catalog.classes_per_dataset(), size="paper", patch_size_zyx=patch)
obj = MultiTalentObjective(catalog, n_levels=net.ds_levels)
opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
x = torch.randn(2, 1, *patch); lab = torch.randint(0, 3, (2, *patch)).to(torch.uint8)
ds = torch.tensor([0, len(catalog.datasets) - 1]); ann = torch.as_tensor(catalog.annotated_mask())[ds]
inputs = StepInputs(x, lab, ds, ann)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
for i in range(4):
    t = time.perf_counter()
    loss, _ = obj(net, inputs); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"catalog": sys.argv[2], "classes": catalog.num_classes,
    "parameters": sum(p.numel() for p in net.parameters()),
    "head_parameters": sum(p.numel() for p in net.head_parameters()),
    "peak_rss_mb_after_build": round(rss0), "peak_rss_mb_step": round(rss1),
    "step_s_median": round(statistics.median(times[1:]), 3)}))
"""


def heads_cost(args: argparse.Namespace) -> list[dict]:
    out = []
    for catalog in ("multitalent13", "multitalent13+totalsegmentator"):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                HEADS_CHILD,
                str(REPO / "platform"),
                catalog,
                args.patch,
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[bench] {out[-1]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "finetune", "heads"], default="all")
    p.add_argument("--holdout", default="P03")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--pretrain", type=int, default=160)
    p.add_argument("--iterations", type=lambda s: [int(x) for x in s.split(",")], default=[16, 48, 96])
    p.add_argument("--patch", default="32,48,48")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{pyplatform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.part in ("all", "finetune"):
        result["finetune_vs_scratch"] = finetune_vs_scratch(args)
    if args.part in ("all", "heads"):
        result["heads"] = heads_cost(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
