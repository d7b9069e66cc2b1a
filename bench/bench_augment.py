"""Augmentation throughput: ours (batched torch) vs nnU-Net v2's training transforms, and GPU latency.

CPU mode (default) augments the same synthetic arrays with both pipelines, interleaved round by round
so that load from other processes hits both alike:

- ours: ``augment_batch`` on a batch of ``--batch`` read patches (``read_shape_zyx``) -> ``--patch``;
- nnU-Net: ``nnUNetTrainer.get_training_transforms(patch, ±30°, deep_supervision_scales=None,
  mirror_axes=(0, 1, 2), do_dummy_2d_data_aug=False)`` called once per sample, as its data loader does,
  on the same read patches (its SpatialTransform crops the centre), labels int16 as its loader gives.
  Deep supervision is off: label downsampling for it happens on the GPU in our loss, not here.

Reported: samples per second of wall time and samples per CPU-second (``time.process_time``), with
``torch.set_num_threads`` 1 and 2. Random parameters differ per round, so use enough rounds.

CUDA mode (``--device cuda``, torch only, nnunetv2 not needed) times ``augment_batch`` on the GPU with
CUDA events: parameters drawn per iteration (included), warm-up, median over iterations, for the
default probabilities and with every transform on.

    python bench/bench_augment.py --patch 64,128,128 --rounds 8
    python bench/bench_augment.py --device cuda --json /tmp/aug_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import multitalent  # noqa: F401
except ImportError:  # a bare checkout (GPU machine): use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from multitalent.data.augment import AugmentConfig, all_on_config, augment_batch, read_shape_zyx

ALL_ON = all_on_config()


def synthetic_batch(
    batch: int, shape_zyx: tuple[int, int, int], n_labels: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CT-like smooth image (normalised) and a label map of ``n_labels`` ellipsoids per sample."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn((batch, 1, *(max(2, s // 8) for s in shape_zyx)), generator=gen)
    image = torch.nn.functional.interpolate(coarse, size=shape_zyx, mode="trilinear", align_corners=False)
    image = (image - image.mean()) / image.std()
    label = torch.zeros((batch, *shape_zyx), dtype=torch.uint8)
    axes = [torch.arange(s, dtype=torch.float32) for s in shape_zyx]
    for b in range(batch):
        for value in range(1, n_labels + 1):
            center = [rng.uniform(0.2, 0.8) * s for s in shape_zyx]
            radius = [rng.uniform(0.05, 0.2) * s for s in shape_zyx]
            dist = (
                ((axes[0] - center[0]) / radius[0])[:, None, None] ** 2
                + ((axes[1] - center[1]) / radius[1])[None, :, None] ** 2
                + ((axes[2] - center[2]) / radius[2])[None, None, :] ** 2
            )
            label[b][dist <= 1] = value
    image += 0.1 * torch.randn(image.shape, generator=gen)
    return image.float().contiguous(), label


def _nnunet_transforms(patch: tuple[int, int, int]):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rotation = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)
    return nnUNetTrainer.get_training_transforms(patch, rotation, None, (0, 1, 2), False)


def bench_cpu(args: argparse.Namespace) -> dict:
    patch = args.patch
    read = read_shape_zyx(patch, AugmentConfig())
    image, label = synthetic_batch(args.batch, read, args.labels)
    seg_int16 = label.to(torch.int16)
    nnunet = None if args.no_nnunet else _nnunet_transforms(patch)
    np.random.seed(0)  # noqa: NPY002 -- nnU-Net draws from the legacy global state
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = AugmentConfig()
    results: dict = {"patch": patch, "read": read, "batch": args.batch, "labels": args.labels, "rows": []}

    def ours() -> None:
        augment_batch(image, label, config=config, generator=gen, out_shape_zyx=patch)

    def theirs() -> None:
        assert nnunet is not None
        inputs = [(image[b].clone(), seg_int16[b][None].clone()) for b in range(args.batch)]
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for img, seg in inputs:
            nnunet(image=img, segmentation=seg)
        timed["nnunet"][0] += time.perf_counter() - start_wall
        timed["nnunet"][1] += time.process_time() - start_cpu

    for threads in args.threads:
        torch.set_num_threads(threads)
        timed = {"ours": [0.0, 0.0], "nnunet": [0.0, 0.0]}
        ours()  # warm-up (allocator, nnU-Net's blur fft/conv benchmark)
        if nnunet is not None:
            theirs()
        timed = {"ours": [0.0, 0.0], "nnunet": [0.0, 0.0]}
        for _ in range(args.rounds):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            ours()
            timed["ours"][0] += time.perf_counter() - start_wall
            timed["ours"][1] += time.process_time() - start_cpu
            if nnunet is not None:
                theirs()
        n = args.rounds * args.batch
        for name in ("ours", "nnunet") if nnunet is not None else ("ours",):
            wall, cpu = timed[name]
            row = {
                "pipeline": name,
                "threads": threads,
                "samples_per_s": n / wall,
                "samples_per_cpu_s": n / cpu,
            }
            results["rows"].append(row)
            print(
                f"threads {threads}  {name:7s} {row['samples_per_s']:7.2f} samples/s wall  "
                f"{row['samples_per_cpu_s']:7.2f} samples/CPU-s",
                flush=True,
            )
    return results


def check_cuda_matches_cpu(device: torch.device) -> dict:
    """Same parameters on CPU and GPU (noise off: its field comes from the device's generator)."""
    from dataclasses import replace

    from multitalent.data.augment import apply_params, sample_params

    image, label = synthetic_batch(4, (40, 72, 72), 6, seed=1)
    params = sample_params(replace(ALL_ON, p_noise=0.0), 4, torch.Generator().manual_seed(1), n_channels=1)
    params.rotate_b[1] = False  # one scaled-only (separable) sample beside the rotated ones
    params.rotation_rad_b3[1] = 0.0
    cpu_img, cpu_lab = apply_params(image, label, params, out_shape_zyx=(32, 64, 64))
    gpu_img, gpu_lab = apply_params(image.to(device), label.to(device), params, out_shape_zyx=(32, 64, 64))
    result = {
        "max_abs_image_diff": float((gpu_img.cpu() - cpu_img).abs().max()),
        "label_mismatch_fraction": float((gpu_lab.cpu() != cpu_lab).double().mean()),
    }
    print(f"CUDA vs CPU, same parameters: {result}", flush=True)
    return result


def bench_cuda(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    device = torch.device("cuda")
    check = check_cuda_matches_cpu(device)
    patch = args.patch
    read = read_shape_zyx(patch, AugmentConfig())
    image, label = synthetic_batch(args.batch, read, args.labels)
    image, label = image.to(device), label.to(device)
    results: dict = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "patch": patch,
        "read": read,
        "batch": args.batch,
        "iters": args.iters,
        "check": check,
    }
    for name, config in (("default", AugmentConfig()), ("all_on", ALL_ON)):
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.warmup):
            augment_batch(image, label, config=config, generator=gen, out_shape_zyx=patch)
        torch.cuda.synchronize()
        times_ms = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            augment_batch(image, label, config=config, generator=gen, out_shape_zyx=patch)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        times_ms.sort()
        results[name] = {
            "median_ms": statistics.median(times_ms),
            "p90_ms": times_ms[int(0.9 * (len(times_ms) - 1))],
            "max_ms": times_ms[-1],
        }
        print(
            f"{results['device']}: batch {args.batch} read {read} -> {patch}, {name}: median "
            f"{results[name]['median_ms']:.2f} ms, p90 {results[name]['p90_ms']:.2f} ms, "
            f"max {results[name]['max_ms']:.2f} ms (target <= 20 ms)",
            flush=True,
        )
    results["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        gen = torch.Generator().manual_seed(0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                augment_batch(image, label, config=ALL_ON, generator=gen, out_shape_zyx=patch)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    return results


def _shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.split(","))
    return (z, y, x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--patch", type=_shape, default=(96, 192, 192), help="output patch z,y,x")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--labels", type=int, default=8, help="label values (ellipsoids) per sample")
    parser.add_argument("--rounds", type=int, default=8, help="CPU: batches per pipeline and thread setting")
    parser.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    parser.add_argument("--no-nnunet", action="store_true", help="CPU: time ours only")
    parser.add_argument("--iters", type=int, default=100, help="CUDA: timed iterations")
    parser.add_argument("--warmup", type=int, default=10, help="CUDA: untimed iterations")
    parser.add_argument("--profile", action="store_true", help="CUDA: print a kernel profile (all on)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    results["python"] = platform.python_version()
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
