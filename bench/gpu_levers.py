"""Training-step levers at the paper configuration, one row each, with a correctness check per row.

The step is bench/gpu.py's "platform step": ``MultiTalentObjective`` of the multitalent13 catalog (47 heads;
targets from raw labels through the region table, deep supervision, partial-label loss with batch Dice)
under bf16 autocast, backward, ``clip_grad_norm_(12)``, SGD Nesterov (momentum 0.99, wd 3e-5); patch
96x192x192, batch 2. A row is a set of levers joined by ``+`` (``baseline`` = none):

- ``cudnn_off``: ``torch.backends.cudnn.benchmark = False`` (the baseline has it on, as gpu.py);
- ``channels_last``: network and input in ``torch.channels_last_3d``;
- ``fused_sgd`` / ``forloop_sgd``: ``SGD(fused=True)`` / ``SGD(foreach=False)`` (the baseline lets torch
  choose: foreach on CUDA);
- ``compile_net``: ``torch.compile`` of the network only; ``compile_step``: of the whole objective (network
  and loss in one graph: "compile the loss too");
- ``cuda_graphs``: the compiled part with ``mode="reduce-overhead"`` (CUDA graphs; ``compile_step`` when no
  compile lever is named); CUDA only;
- ``trivial_loss``: the network with a trivial loss (mean of the full-resolution logits) instead of the
  objective: baseline minus this row is the loss's cost (no correctness check: another function);
- ``all_loss_rows``: the loss's voxel pass computes every (sample, class) row and masks the non-annotated
  ones, as before it learned to skip them (``losses.voxel_sums.VISIT_ALL_ROWS``; compiled rows always do);
- ``dense_targets``: the objective builds each deep-supervision level's full (B, K, ...) targets before the
  loss, as before the loss made the annotated rows from the labels itself (``MultiTalentObjective(
  dense_targets=True)``);
- ``upcast_logits``: the objective copies every level's bf16 logits to float32 before the loss, as before the
  loss upcast only the rows it visits (``MultiTalentObjective(upcast_logits=True)``);
  ``all_loss_rows+dense_targets+upcast_logits`` is the loss as it was before the three levers.

Per row: ms/step (CUDA events, warm-up, median), peak memory over the timed steps, TFLOP/s and MFU
(FLOPs = 3 x forward, 2 per multiply-add, ``count_forward_macs``; peak 989 TFLOP/s dense bf16), and the
correctness check against the baseline: from the same initial weights and batch, the loss's relative
difference and the gradient's relative error ||g - g0|| / ||g0|| over all parameters (bf16 tolerances by
default; ``--tol-loss``/``--tol-grad``). The ``cudnn_off`` row's error shows the noise of choosing other
convolution algorithms. A row that fails (a compile error, out of memory) prints its error and the table
goes on; a row that would overrun ``--budget-s`` is skipped with a printed note (compiled rows are
estimated at the first compile's time, or ``--compile-estimate-s`` before one ran).

    python3 bench/gpu_levers.py --device cuda --budget-s 300 --out /tmp/levers.json
    python3 bench/gpu_levers.py --device cpu --small --compile-backend aot_eager     # check it here
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import BF16_PEAK_TFLOPS, timed
from multitalent.catalog import load_preset
from multitalent.losses import voxel_sums
from multitalent.models import build_network, count_forward_macs
from multitalent.train.step import MultiTalentObjective, StepInputs

LEVERS = (
    "cudnn_off",
    "channels_last",
    "fused_sgd",
    "forloop_sgd",
    "compile_net",
    "compile_step",
    "cuda_graphs",
    "trivial_loss",
    "all_loss_rows",
    "dense_targets",
    "upcast_logits",
)
COMPILED = {"compile_net", "compile_step", "cuda_graphs"}
DEFAULT_ROWS = (
    "baseline",
    "cudnn_off",
    "channels_last",
    "fused_sgd",
    "forloop_sgd",
    "trivial_loss",
    "all_loss_rows",
    "dense_targets",
    "upcast_logits",
    "all_loss_rows+dense_targets+upcast_logits",
    "compile_net",
    "compile_step",
    "compile_step+channels_last+fused_sgd",
    "cuda_graphs",
)
PEAK_TFLOPS_DEFAULT = 989.0


def parse_row(name: str) -> frozenset[str]:
    """``"compile_step+fused_sgd"`` -> its levers; ``"baseline"`` -> none."""
    if name == "baseline":
        return frozenset()
    levers = frozenset(part.strip() for part in name.split("+") if part.strip())
    unknown = sorted(levers - set(LEVERS))
    if unknown:
        raise ValueError(f"unknown lever(s) {unknown} in row {name!r}; known: baseline, {', '.join(LEVERS)}")
    if {"fused_sgd", "forloop_sgd"} <= levers:
        raise ValueError(f"row {name!r}: fused_sgd and forloop_sgd exclude each other")
    return levers


@dataclass
class Row:
    arch: str
    row: str
    status: str = "ok"  # ok | error: ... | skipped: ...
    ms: float = math.nan
    peak_gib: float = math.nan
    tflops: float = math.nan
    mfu_pct: float = math.nan
    loss: float = math.nan
    loss_rel: float = math.nan
    grad_rel: float = math.nan
    check: str = ""  # pass | FAIL | n/a | reference
    first_pass_s: float = math.nan  # first forward-backward, compile included
    seconds: float = math.nan  # the whole row
    note: str = ""


@dataclass
class Reference:
    loss: float
    grads: list[torch.Tensor]


@dataclass
class Settings:
    device: torch.device
    patch: tuple[int, int, int]
    batch: int
    size: str
    warmup: int
    reps: int
    compile_backend: str
    tol_loss: float
    tol_grad: float
    peak_tflops: float | None
    deadline: float
    compile_estimate_s: float
    rows: list[Row] = field(default_factory=list)


class Arch:
    """What every row of one architecture shares: catalog, initial weights, batch, FLOP count."""

    def __init__(self, arch: str, catalog: Any, s: Settings) -> None:
        self.name, self.catalog, self.s = arch, catalog, s
        heads = catalog.classes_per_dataset()
        torch.manual_seed(0)
        net = build_network(arch, heads, size=s.size, patch_size_zyx=s.patch)
        self.init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.params = sum(p.numel() for p in net.parameters())
        self.fwd_flops = count_forward_macs(net, batch_size=s.batch).flops
        self.n_levels = int(net.ds_levels)
        del net
        g = torch.Generator().manual_seed(1)
        dev = s.device
        self.image = torch.randn(s.batch, 1, *s.patch, generator=g).to(dev)
        self.ds = (torch.arange(s.batch) % len(catalog.datasets)).to(dev)
        # Raw label values 0..2 of each sample's dataset (every catalog dataset has at least 2 classes).
        self.label = torch.randint(0, 3, (s.batch, *s.patch), generator=g, dtype=torch.uint8).to(dev)
        self.annotated = torch.as_tensor(catalog.annotated_mask(), device=dev)[self.ds]
        self.reference: Reference | None = None

    def build(self, levers: frozenset[str]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = build_network(
            self.name, self.catalog.classes_per_dataset(), size=self.s.size, patch_size_zyx=self.s.patch
        )
        net.load_state_dict(self.init_state)
        net = net.to(self.s.device)
        if "channels_last" in levers:
            net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        kwargs: dict[str, Any] = {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
        if "fused_sgd" in levers:
            kwargs["fused"] = True
        if "forloop_sgd" in levers:
            kwargs["foreach"] = False
        return net, torch.optim.SGD(net.parameters(), **kwargs)


def _compile(fn: Any, levers: frozenset[str], backend: str) -> Any:
    mode = "reduce-overhead" if "cuda_graphs" in levers else None
    if backend != "inductor":
        return torch.compile(fn, backend=backend)
    return torch.compile(fn, mode=mode)


def make_step(
    a: Arch, levers: frozenset[str], net: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """``(forward_backward, full_step)``; ``forward_backward`` returns the loss (detached)."""
    s = a.s
    objective = MultiTalentObjective(
        a.catalog,
        n_levels=a.n_levels,
        dense_targets="dense_targets" in levers,
        upcast_logits="upcast_logits" in levers,
    ).to(s.device)
    image = a.image
    if "channels_last" in levers:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    inputs = StepInputs(image, a.label, a.ds, a.annotated)
    amp = {"device_type": s.device.type, "dtype": torch.bfloat16, "enabled": s.device.type == "cuda"}
    compile_step = "compile_step" in levers or ("cuda_graphs" in levers and "compile_net" not in levers)
    model: Any = net
    if "compile_net" in levers:
        model = _compile(net, levers, s.compile_backend)

    if "trivial_loss" in levers:

        def loss_of() -> torch.Tensor:
            out = model(inputs.image_bczyx)
            return (out[0] if isinstance(out, list | tuple) else out).float().mean()

    else:

        def loss_of() -> torch.Tensor:
            loss, _ = objective(model, inputs)
            return loss

    call = _compile(loss_of, levers, s.compile_backend) if compile_step else loss_of
    graphs = "cuda_graphs" in levers

    def forward_backward() -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):  # type: ignore[arg-type]
            loss = call()
        loss.backward()
        return loss.detach()

    def full_step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()

    return forward_backward, full_step


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().contiguous().clone()
        for p in net.parameters()
    ]


def _grad_rel(grads: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    num = sum(float((g - r).double().pow(2).sum()) for g, r in zip(grads, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return math.sqrt(num / max(den, 1e-300))


def _dynamo_note() -> str:
    try:
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"].get("unique_graphs", 0))
        breaks = sum(counters["graph_break"].values())
        return f"{graphs} graph(s), {breaks} graph break(s)"
    except Exception:  # counters are internal; a missing one must not fail the row
        return ""


def _clear_dynamo_counters() -> None:
    try:
        from torch._dynamo.utils import counters

        counters.clear()
    except Exception:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def estimate_s(levers: frozenset[str], a: Arch, s: Settings, compile_s: dict[str, float]) -> float:
    """Seconds a row will take: the baseline row's time for eager rows, plus the compile time."""
    base = next(
        (r.seconds for r in s.rows if r.arch == a.name and r.row == "baseline" and r.status == "ok"), 0.0
    )
    est = base if base > 0 else 5.0
    if levers & COMPILED:
        known = [v for v in compile_s.values() if v > 0]
        est += 1.3 * max(known) if known else s.compile_estimate_s
    return est


def run_row(a: Arch, name: str, s: Settings, compile_s: dict[str, float]) -> Row:
    row = Row(a.name, name)
    levers = parse_row(name)
    t_row = time.perf_counter()
    need = estimate_s(levers, a, s, compile_s)
    left = s.deadline - time.time()
    if need > left:
        row.status = f"skipped: time guard ({left:.0f} s left, row needs ~{need:.0f} s)"
        return row
    if "cuda_graphs" in levers and s.device.type != "cuda":
        row.status = "skipped: CUDA graphs need a CUDA device"
        return row
    if "fused_sgd" in levers and s.device.type == "cpu" and not _fused_cpu_ok():
        row.status = "skipped: fused SGD is not available on this CPU build"
        return row
    if name != "baseline" and a.reference is None and "trivial_loss" not in levers:
        row.note = "no baseline to check against"
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = "cudnn_off" not in levers
    voxel_sums.VISIT_ALL_ROWS = "all_loss_rows" in levers
    try:
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _clear_dynamo_counters()
        net, opt = a.build(levers)
        fwd_bwd, step = make_step(a, levers, net, opt)
        # Correctness: forward-backward from the initial weights, no optimizer step. Compiled rows run it
        # three times (compile, then CUDA-graph recording and replay) and check the last.
        t0 = time.perf_counter()
        loss = fwd_bwd()
        _sync(s.device)
        row.first_pass_s = time.perf_counter() - t0
        if levers & COMPILED:
            compile_s[name] = row.first_pass_s
            for _ in range(2):
                loss = fwd_bwd()
        row.loss = float(loss)
        if "trivial_loss" in levers:
            row.check = "n/a"
        elif name == "baseline":
            a.reference = Reference(row.loss, _grads(net))
            row.check, row.loss_rel, row.grad_rel = "reference", 0.0, 0.0
        elif a.reference is not None:
            row.loss_rel = abs(row.loss - a.reference.loss) / max(abs(a.reference.loss), 1e-30)
            row.grad_rel = _grad_rel(_grads(net), a.reference.grads)
            finite = math.isfinite(row.loss_rel) and math.isfinite(row.grad_rel)
            ok = finite and row.loss_rel <= s.tol_loss and row.grad_rel <= s.tol_grad
            row.check = "pass" if ok else "FAIL"
        if levers & COMPILED:
            row.note = "; ".join(x for x in (row.note, _dynamo_note()) if x)
        opt.zero_grad(set_to_none=True)
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row.ms = timed(step, device=s.device, warmup=s.warmup, reps=s.reps)
        if s.device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.tflops = 3 * a.fwd_flops / (row.ms / 1e3) / 1e12
        if s.peak_tflops:
            row.mfu_pct = 100 * row.tflops / s.peak_tflops
        del net, opt, fwd_bwd, step
    except Exception as e:  # one failing lever must not stop the table
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        row.status = "error: " + (msg[0] if msg else type(e).__name__)[:300]
        row.check = row.check or "-"
        print(f"  [{a.name} {name}] failed:", file=sys.stderr)
        traceback.print_exc(limit=6)
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
        voxel_sums.VISIT_ALL_ROWS = False
        _cleanup(s.device)
        row.seconds = time.perf_counter() - t_row
    return row


def _fused_cpu_ok() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        return True
    except Exception:
        return False


def fmt(row: Row) -> str:
    def f(v: float, spec: str) -> str:
        return "-" if not math.isfinite(v) else format(v, spec)

    status = row.status if row.status != "ok" else ""
    note = "; ".join(x for x in (status, row.note) if x)
    return (
        f"| {row.arch} | {row.row} | {f(row.ms, '.1f')} | {f(row.peak_gib, '.1f')} | "
        f"{f(row.tflops, '.0f')} | {f(row.mfu_pct, '.1f')} | {f(row.loss_rel, '.1e')} | "
        f"{f(row.grad_rel, '.1e')} | {row.check or '-'} | {f(row.first_pass_s, '.1f')} | {note} |"
    )


HEADER = (
    "| network | levers | ms/step | peak GiB | TFLOP/s | MFU % | loss rel. diff | grad rel. err | check | "
    "first pass s | note |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def run(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny network and patch: check the script on a CPU")
    p.add_argument("--archs", default="resenc_unet,unet", help="first is measured first")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="rows, each levers joined by +")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", default="", help="z,y,x (default 96,192,192; 32,64,64 with --small)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=300.0, help="skip rows that would end later")
    p.add_argument("--deadline", type=float, default=None, help="Unix time; overrides --budget-s")
    p.add_argument("--compile-backend", default="inductor", help="inductor; aot_eager or eager to check")
    p.add_argument("--compile-estimate-s", type=float, default=120.0, help="guess before one compile ran")
    p.add_argument("--tol-loss", type=float, default=None, help="default 1e-2 bf16, 1e-4 fp32")
    p.add_argument("--tol-grad", type=float, default=None, help="default 5e-2 bf16, 1e-3 fp32")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        parse_row(r)  # fail on a typo before any work
    if "baseline" in rows:  # the reference of every check: measured first
        rows = ["baseline", *[r for r in rows if r != "baseline"]]
    bf16 = device.type == "cuda"
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), None) if gpu else None
    if gpu and peak is None:
        peak = PEAK_TFLOPS_DEFAULT
    s = Settings(
        device=device,
        patch=_patch(args.patch) or ((32, 64, 64) if args.small else (96, 192, 192)),
        batch=args.batch,
        size="tiny" if args.small else "paper",
        warmup=args.warmup if args.warmup is not None else (1 if args.small else 3),
        reps=args.reps if args.reps is not None else (2 if args.small else 10),
        compile_backend=args.compile_backend,
        tol_loss=args.tol_loss if args.tol_loss is not None else (1e-2 if bf16 else 1e-4),
        tol_grad=args.tol_grad if args.tol_grad is not None else (5e-2 if bf16 else 1e-3),
        peak_tflops=peak,
        deadline=args.deadline if args.deadline is not None else t_start + args.budget_s,
        compile_estimate_s=args.compile_estimate_s,
    )
    print(
        f"== training-step levers: torch {torch.__version__}, device {gpu or device.type}, patch {s.patch}, "
        f"batch {s.batch}, {'bf16 autocast' if bf16 else 'fp32'}, {s.warmup} warm-up + median of {s.reps}; "
        f"tolerances loss {s.tol_loss:g}, grad {s.tol_grad:g}; {s.deadline - time.time():.0f} s budget",
        flush=True,
    )
    catalog = load_preset("multitalent13")
    archs = [x.strip() for x in args.archs.split(",") if x.strip()]
    built: dict[str, Arch] = {}
    compile_s: dict[str, float] = {}
    # Eager rows of every architecture first (cheap), then the compiled ones, first architecture first.
    order = [(a, r) for a in archs for r in rows if not (parse_row(r) & COMPILED)]
    order += [(a, r) for a in archs for r in rows if parse_row(r) & COMPILED]
    interrupted = False
    for arch, name in order:
        if interrupted:
            s.rows.append(Row(arch, name, status="skipped: stopped by the time guard (interrupted)"))
            continue
        if arch not in built:
            try:
                built[arch] = Arch(arch, catalog, s)
                print(
                    f"-- {arch} ({s.size}): {built[arch].params / 1e6:.1f} M parameters, "
                    f"{built[arch].fwd_flops / s.batch / 1e12:.3f} TFLOP forward per patch",
                    flush=True,
                )
            except Exception as e:
                s.rows.append(Row(arch, name, status=f"error: building the network: {e}"[:300]))
                continue
        try:
            row = run_row(built[arch], name, s, compile_s)
        except KeyboardInterrupt:  # bench/gpu.sh's backstop: print the table of what ran
            interrupted = True
            row = Row(arch, name, status="stopped by the time guard (interrupted)")
        s.rows.append(row)
        print(fmt(row), flush=True)
    ordered = sorted(s.rows, key=lambda r: (archs.index(r.arch), rows.index(r.row)))
    print(f"\nlevers table ({time.time() - t_start:.0f} s):\n{HEADER}")
    for row in ordered:
        print(fmt(row))
    for a in built.values():
        base = next(
            (r for r in ordered if r.arch == a.name and r.row == "baseline" and r.status == "ok"), None
        )
        triv = next(
            (r for r in ordered if r.arch == a.name and r.row == "trivial_loss" and r.status == "ok"), None
        )
        if base and triv:
            share = 100 * (base.ms - triv.ms) / base.ms
            print(
                f"{a.name}: the loss's share of the baseline step: {share:.0f} % ({base.ms - triv.ms:.1f} ms)"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"settings": _settings_dict(s), "rows": [asdict(r) for r in ordered]}, indent=1)
        )
    return ordered


def _patch(text: str) -> tuple[int, int, int] | None:
    if not text:
        return None
    z, y, x = (int(v) for v in text.split(","))
    return z, y, x


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = {k: v for k, v in asdict(s).items() if k != "rows"}
    d["device"] = str(s.device)
    d["torch"] = torch.__version__
    d["gpu"] = torch.cuda.get_device_name() if s.device.type == "cuda" else ""
    return d


def main() -> None:
    rows = run()
    bad = [r for r in rows if r.check == "FAIL"]
    if bad:
        print(f"correctness check failed in {len(bad)} row(s): {[f'{r.arch} {r.row}' for r in bad]}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
