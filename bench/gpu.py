"""Everything GPU-side in one run: install check, correctness on the GPU, augmentation, training step
and inference timings. Prints a short table last. Run through ``bench/gpu.sh`` on a GPU machine;
``--device cpu --small`` checks the script itself here.

Timings use CUDA events after warm-up and report the median. FLOPs of a training step are taken as
3x the forward FLOPs (forward + backward), counted by ``multitalent.models.count_forward_macs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from multitalent.catalog import load_preset
from multitalent.data.augment import AugmentConfig, augment_batch, read_shape_zyx, sample_params
from multitalent.data.batch import Batch, DrawnBatch
from multitalent.losses import PartialLabelLoss
from multitalent.models import build_network, count_forward_macs
from multitalent.preprocess.plan import Normalization
from multitalent.train.step import MultiTalentObjective, StepInputs

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, vendor datasheet (SXM)
ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"  {what}: {value} {note}", flush=True)


def timed(fn: Callable[[], object], *, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_correctness(device: torch.device, catalog) -> None:
    print("== correctness on", device, flush=True)
    g = torch.Generator().manual_seed(1)
    # Loss: device fp32 vs CPU float64, values and gradients, on random data.
    logits = torch.randn(3, catalog.num_classes, 16, 24, 24, generator=g, dtype=torch.float64)
    target = torch.rand(logits.shape, generator=g) > 0.7
    ds = torch.tensor([0, 2, 4])
    annotated = torch.as_tensor(catalog.annotated_mask())[ds]
    loss_fn = PartialLabelLoss()
    ref_x = logits.clone().requires_grad_(True)
    ref, _ = loss_fn(ref_x, target, annotated)
    ref.backward()
    dev_x = logits.float().to(device).requires_grad_(True)
    out, _ = loss_fn(dev_x, target.to(device), annotated.to(device))
    out.backward()
    row("loss rel. error vs CPU fp64", f"{rel_err(out.detach(), ref.detach()):.1e}", "(fp32 on device)")
    row("loss grad rel. error", f"{rel_err(dev_x.grad, ref_x.grad):.1e}")
    mask = ~annotated[:, :, None, None, None].expand_as(dev_x)
    row(
        "grad on non-annotated classes",
        f"{float(dev_x.grad[mask.to(device)].abs().max()):.1e}",
        "(must be 0)",
    )
    # Augmentation: same drawn parameters on CPU and device.
    image = torch.randn(2, 1, 32, 48, 48, generator=g)
    label = torch.randint(0, 4, (2, 32, 48, 48), generator=g, dtype=torch.uint8)
    cfg = AugmentConfig()
    a_cpu, l_cpu = augment_batch(image, label, config=cfg, generator=torch.Generator().manual_seed(5))
    a_dev, l_dev = augment_batch(
        image.to(device), label.to(device), config=cfg, generator=torch.Generator().manual_seed(5)
    )
    row("augment image rel. error vs CPU", f"{rel_err(a_dev, a_cpu):.1e}")
    row(
        "augment label mismatch fraction",
        f"{float((l_dev.cpu() != l_cpu).float().mean()):.1e}",
        "(nearest at rounding ties)",
    )
    # int16 HU normalised on the device (the trainer's DrawnBatch) against the loader's numpy normalisation.
    norm = Normalization.multitalent()
    hu = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    on_device = norm.apply_torch(hu.to(device)).cpu().numpy()
    row(
        "int16 normalise on device vs loader",
        f"{float(abs(on_device - norm.apply(hu.numpy())).max()):.1e}",
        "(must be 0)",
    )
    # Network: tiny U-Net forward device vs CPU.
    net = build_network("unet", catalog.classes_per_dataset(), size="tiny", patch_size_zyx=(32, 64, 64))
    x = torch.randn(1, 1, 32, 64, 64, generator=g)
    with torch.no_grad():
        y_cpu = net(x)[0]
        y_dev = net.to(device)(x.to(device))[0]
    row("tiny U-Net forward rel. error", f"{rel_err(y_dev, y_cpu):.1e}", "(TF32 may be on)")


def bench_augment(device: torch.device, patch: tuple[int, int, int], reps: int) -> None:
    print("== augmentation, batch 4 at", patch, flush=True)
    cfg = AugmentConfig()
    g = torch.Generator().manual_seed(0)
    for name, shape in [
        ("same-size input", patch),
        ("enlarged input (nnU-Net rule)", read_shape_zyx(patch, cfg)),
    ]:
        image = torch.randn(4, 1, *shape, device=device)
        label = torch.randint(0, 5, (4, *shape), device=device, dtype=torch.uint8)
        ms = timed(
            lambda image=image, label=label: augment_batch(
                image, label, config=cfg, generator=g, out_shape_zyx=patch
            ),
            device=device,
            warmup=3,
            reps=reps,
        )
        row(f"augment batch 4, {name} {tuple(shape)}", f"{ms:.1f} ms", "(target <= 20 ms)")
    # The trainer's path (DrawnBatch): parameters drawn in the loader, int16 HU groups read enlarged (rotated
    # or scaled samples) or at the patch, normalised and augmented here.
    norm = Normalization.multitalent()
    for seed in range(100):  # a draw with one enlarged sample of 4 (the defaults rotate or scale 36 %)
        params = sample_params(cfg, 4, torch.Generator().manual_seed(seed), n_channels=1)
        n_wide = int(params.reads_beyond_patch_b.sum())
        if n_wide == 1:
            break
    groups = []
    for n, shape in ((n_wide, read_shape_zyx(patch, cfg)), (4 - n_wide, patch)):
        hu = torch.randint(-1000, 1000, (n, 1, *shape), device=device, dtype=torch.int16)
        lab = torch.randint(0, 5, (n, *shape), device=device, dtype=torch.uint8)
        groups.append(
            Batch(hu, lab, torch.zeros(n, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool), [""] * n)
        )
    drawn = DrawnBatch(
        groups[0],
        groups[1],
        params,
        torch.zeros(4, dtype=torch.long),
        torch.ones(4, 1, dtype=torch.bool),
        [""] * 4,
        norm,
    )
    ms = timed(lambda: drawn.augment(cfg, patch), device=device, warmup=3, reps=reps)
    row(
        f"augment batch 4, drawn: {n_wide} enlarged + {4 - n_wide} at the patch, int16",
        f"{ms:.1f} ms",
        "(normalise + augment; the trainer's path)",
    )


def bench_train(
    device: torch.device, catalog, arch: str, patch: tuple[int, int, int], batch: int, reps: int, size: str
) -> dict:
    print(f"== training step {arch} ({size}), batch {batch}, patch {patch}", flush=True)
    torch.manual_seed(0)
    # Counted on a separate instance: the counter runs the network with meta tensors.
    counted = build_network(arch, catalog.classes_per_dataset(), size=size, patch_size_zyx=patch)
    flops = count_forward_macs(counted, batch_size=batch).flops
    del counted
    swin = arch == "swin_unetr"  # the paper trains it with AdamW 5e-4 and gradient checkpointing
    net = build_network(
        arch, catalog.classes_per_dataset(), size=size, patch_size_zyx=patch, gradient_checkpointing=swin
    ).to(device)
    params = sum(p.numel() for p in net.parameters())
    if swin:
        opt: torch.optim.Optimizer = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=3e-5)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, *patch, device=device)
    ds = torch.arange(batch, device=device) % len(catalog.datasets)
    label = torch.randint(0, 3, (batch, *patch), device=device, dtype=torch.uint8)
    annotated = torch.as_tensor(catalog.annotated_mask(), device=device)[ds]
    inputs = StepInputs(image, label, ds, annotated)
    with torch.no_grad():
        n_levels = len(net(image[:1]))
    objective = MultiTalentObjective(catalog, n_levels=n_levels).to(device)
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}
    cfg = AugmentConfig()

    def platform_step(augment: bool) -> Callable[[], None]:
        def step() -> None:
            x = inputs
            if augment:
                img, lab = augment_batch(x.image_bczyx, x.label_bzyx, config=cfg, generator=g)
                x = StepInputs(img, lab, x.dataset_idx_b, x.annotated_bk)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss, _ = objective(net, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()

        return step

    # Bare torch loop: same model and batch, plain BCE on pre-made full-resolution targets.
    target = torch.rand(batch, catalog.num_classes, *patch, device=device) > 0.9

    def bare_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            out = net(image)
            loss = F.binary_cross_entropy_with_logits(out[0].float(), target.float())
        loss.backward()
        opt.step()

    results = {}
    for name, fn in [
        ("bare torch loop", bare_step),
        ("platform step", platform_step(False)),
        ("platform step + GPU augmentation", platform_step(True)),
    ]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timed(fn, device=device, warmup=3, reps=reps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        tflops = 3 * flops / (ms / 1e3) / 1e12
        results[name] = {"ms": ms, "peak_gib": peak, "tflops": tflops}
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
        peak_tf = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), None)
        frac = f", {100 * tflops / peak_tf:.1f}% of bf16 peak" if peak_tf else ""
        row(f"{arch} {name}", f"{ms:.1f} ms/step", f"peak {peak:.1f} GiB, {tflops:.0f} TFLOP/s{frac}")
    results["params_m"] = params / 1e6
    results["fwd_tflop_per_patch"] = flops / batch / 1e12
    row(
        f"{arch} parameters / forward per patch", f"{params / 1e6:.1f} M", f"{flops / batch / 1e12:.2f} TFLOP"
    )

    # Inference: forward of one patch, bf16, no deep supervision.
    net.eval()
    net.deep_supervision = False
    one = image[:1]

    def infer() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            net(one)

    ms = timed(infer, device=device, warmup=3, reps=reps)
    results["infer_ms"] = ms
    row(f"{arch} inference, 1 patch bf16", f"{ms:.1f} ms", f"{1e3 / ms:.1f} patches/s")
    return results


def bench_case(device: torch.device, catalog: object, small: bool) -> dict[str, float]:
    """One CT-sized scan through ``Predictor.predict_file``: paper ResEnc (untrained weights), all heads
    of the catalog, 8-way mirroring, bf16 on the GPU; against TotalSegmentator's 77 s (RTX 3090)."""
    import tempfile

    import nibabel as nib
    import numpy as np

    from multitalent.inference.model import LoadedModel, ModelFiles
    from multitalent.inference.predictor import Predictor, PredictSettings
    from multitalent.preprocess import Plan

    patch = [32, 64, 64] if small else [96, 192, 192]
    shape = (96, 96, 60) if small else (512, 512, 300)
    torch.manual_seed(0)
    heads = list(catalog.classes_per_dataset())  # type: ignore[attr-defined]
    net = build_network(
        "resenc_unet", heads, size="tiny" if small else "paper", deep_supervision=False, patch_size_zyx=patch
    ).eval()
    files = ModelFiles(Path("-"), {"patch_size_zyx": patch}, Plan.for_catalog(catalog), catalog)  # type: ignore[arg-type]
    predictor = Predictor(LoadedModel(net, files), PredictSettings(device=device.type, batch_size=2))
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000, np.int16)
    image[24:-24, 40:-40, :] = rng.normal(40, 60, (shape[0] - 48, shape[1] - 80, shape[2])).astype(np.int16)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-case-"))
    scan = tmp / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 1.5, 1.0])), scan)
    t0 = time.perf_counter()
    record = predictor.predict_file(scan, tmp / "out", classes=list(catalog.classes))  # type: ignore[attr-defined]
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    size = "x".join(map(str, shape))
    row(
        f"predict one {size} CT, ResEnc, 8-way mirroring",
        f"{wall:.1f} s",
        f"network+preprocess {record['seconds_network']:.1f} s, peak GPU {peak:.1f} GiB; "
        "TotalSegmentator: 77 s on an RTX 3090",
    )
    return {"seconds": wall, "seconds_network": float(record["seconds_network"]), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes: check the script on a CPU")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="")
    parser.add_argument("--archs", default="unet,resenc_unet,swin_unetr")
    parser.add_argument(
        "--deadline", type=float, default=None, help="Unix time: sections that start later are skipped"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as a training run would: fixed patch shapes
    print(
        "torch",
        torch.__version__,
        "| device",
        torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    )
    catalog = load_preset("multitalent13")
    check_correctness(device, catalog)
    patch = (32, 64, 64) if args.small else (96, 192, 192)
    bench_augment(device, patch, args.reps)
    size = "tiny" if args.small else "paper"
    results: dict[str, object] = {}

    def in_time(what: str) -> bool:
        if args.deadline is None or time.time() < args.deadline:
            return True
        row(what, "skipped", "(time guard: bench/gpu.sh's budget for this section is spent)")
        return False

    for arch in args.archs.split(","):
        if in_time(f"{arch} training step"):
            results[arch] = bench_train(device, catalog, arch, patch, 2, args.reps, size)
    if in_time("predict one CT"):
        results["predict_case"] = bench_case(device, catalog, args.small)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": ROWS, "results": results}, indent=1))
    print("\n| what | value | note |\n|---|---|---|")
    for what, value, note in ROWS:
        print(f"| {what} | {value} | {note} |")


if __name__ == "__main__":
    main()
