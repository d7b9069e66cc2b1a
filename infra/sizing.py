#!/usr/bin/env python3
"""The arithmetic behind infra/README.md's sizing section, from measured and published figures only.

    python3 infra/sizing.py            # prints the Markdown block between the README's sizing markers

Every input below names where it comes from; tests/test_infra.py checks that the README holds exactly
this script's output and that the benchmark figures are still the ones in docs/benchmarks.md. Standard
library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ------------------------------------------------------------------ inputs, each with its source
TARGET_SPACING_ZYX_MM = (1.5, 1.0, 1.0)  # the paper's spacing (paper 3, "Network architectures")
PATCH_ZYX = (96, 192, 192)  # the paper's patch (jobs/pretrain.yaml architecture.patch_zyx)
READ_ZYX = (210, 308, 308)  # the enlarged patch the loader reads for 96x192x192 (benchmarks: Shards)
CHUNK_ZYX = (64, 128, 128)  # Zarr chunks of image and label (data_shards/README.md)
BATCH_PER_GPU = 2  # the paper's 2 per GPU (jobs/pretrain.yaml: global 4 on 2 workers)

# Stored bytes per voxel, measured on the CT-like phantom (docs/benchmarks.md, "Shards (issue 2)"):
WDS_TAR_MB, WDS_CASE_ZYX = 32.7, (200, 400, 400)  # .npy.zst members, zstd level 3: tar bytes per case
WDS_RAW_TAR_MB = 96.6  # uncompressed .npy members of the same case: the upper bound
ZARR_STORE_MB, ZARR_CASE_ZYX = 20.4, (200, 320, 320)  # 64x128x128 lz4-5 bitshuffle image + zstd-3 label
WDS_DECODE_CPU_S = 0.203  # read + decode of that 200x400x400 case from its shard, CPU seconds

# Per-sample CPU of the loader, samples per CPU-second, run 5 (quiet machine), docs/benchmarks.md
# "Full CPU data path": read + sample with augmentation on the GPU (the default), and with it on the CPU.
LOADER_SAMPLES_PER_CPU_S_GPU_AUG = 5.38
LOADER_SAMPLES_PER_CPU_S_CPU_AUG = 3.08

# Training step at batch 2 per GPU, patch 96x192x192, bf16: "platform step + GPU augmentation", run 2,
# NVIDIA H200 (docs/benchmarks.md, "GPU: training step ..."); GPU memory peak of the same rows.
STEP_S = {"U-Net": 0.2218, "ResEnc U-Net": 0.2416, "SwinUNETR": 0.4484}
GPU_PEAK_GIB = {"U-Net": 9.7, "ResEnc U-Net": 10.7, "SwinUNETR": 17.6}
RESENC_PARAMS = 69.24e6  # resenc_unet / paper, the reference topology (docs/benchmarks.md, fidelity.md)

LOADER_WORKERS = 6  # jobs/pretrain.yaml data.loader_workers
PREFETCH = 2  # torch DataLoader prefetch_factor (multitalent.train.batches)
SHUFFLE_BUFFER = 8  # data.webdataset.shuffle_buffer default: decoded cases per loader worker
PATCHES_PER_CASE = 2.0  # data.webdataset.patches_per_case default


@dataclass(frozen=True)
class Dataset:
    name: str
    cases: int  # training cases
    median_zyx: tuple[int, int, int]  # median shape before resampling
    spacing_zyx: tuple[float, float, float]  # mm


# The paper's Table 3 (median shape and spacing, z first); cases from multitalent-facts (training cases).
MULTITALENT13 = (
    Dataset("01 MSD liver", 131, (432, 512, 512), (1.0, 0.77, 0.77)),
    Dataset("02 MSD lung", 63, (252, 512, 512), (1.24, 0.79, 0.79)),
    Dataset("03 MSD pancreas", 281, (93, 512, 512), (2.5, 0.80, 0.80)),
    Dataset("04 MSD hepatic vessel", 303, (49, 512, 512), (5.0, 0.80, 0.80)),
    Dataset("05 MSD spleen", 41, (90, 512, 512), (5.0, 0.79, 0.79)),
    Dataset("06 MSD colon", 126, (95, 512, 512), (5.0, 0.78, 0.78)),
    Dataset("07 BTCV abdomen", 30, (128, 512, 512), (3.0, 0.76, 0.76)),
    Dataset("08 BTCV pelvis", 30, (180, 512, 512), (2.5, 0.98, 0.98)),
    Dataset("09 BTCV2 (Gibson)", 73, (185, 512, 512), (3.0, 0.79, 0.79)),
    Dataset("10 StructSeg", 50, (95, 512, 512), (5.0, 1.17, 1.17)),
    Dataset("11 SegTHOR", 40, (178, 512, 512), (2.5, 0.98, 0.98)),
    Dataset("12 NIH pancreas", 82, (217, 512, 512), (1.0, 0.86, 0.86)),
    Dataset("13 KiTS19", 210, (107, 512, 512), (3.0, 0.78, 0.78)),
)
# Table 3: 231x231x240 at 1.5 mm isotropic (240 taken as z; either order gives 28.8 M voxels at
# 1.5x1x1 mm); 1,228 cases in TotalSegmentator v2 (the paper's v1 had 1,204).
TOTALSEGMENTATOR = Dataset("TotalSegmentator v2", 1228, (240, 231, 231), (1.5, 1.5, 1.5))

NODE_GPUS = 8  # the worked example: one node with 8 GPUs
MB = 1e6


def resampled_zyx(d: Dataset) -> tuple[int, int, int]:
    """Median shape at the target spacing, before the converter's crop to the body (an upper bound)."""
    z, y, x = (round(s * sp / t) for s, sp, t in zip(d.median_zyx, d.spacing_zyx, TARGET_SPACING_ZYX_MM))
    return z, y, x


def voxels(d: Dataset) -> int:
    return math.prod(resampled_zyx(d))


def fetched_zyx(d: Dataset) -> tuple[float, ...]:
    """Voxels per axis of the Zarr chunks a random enlarged read touches: on average C + L - 1
    (1 + (L - 1) / C chunks of C voxels), never more than the case."""
    return tuple(min(c + r - 1, s) for c, r, s in zip(CHUNK_ZYX, READ_ZYX, resampled_zyx(d)))


def bytes_per_voxel_wds() -> float:
    return WDS_TAR_MB * MB / math.prod(WDS_CASE_ZYX)


def bytes_per_voxel_wds_raw() -> float:
    return WDS_RAW_TAR_MB * MB / math.prod(WDS_CASE_ZYX)


def bytes_per_voxel_zarr() -> float:
    return ZARR_STORE_MB * MB / math.prod(ZARR_CASE_ZYX)


@dataclass(frozen=True)
class Collection:
    name: str
    datasets: tuple[Dataset, ...]

    @property
    def cases(self) -> int:
        return sum(d.cases for d in self.datasets)

    def p_dataset(self, d: Dataset) -> float:
        """Share of samples from ``d``: each case drawn with probability proportional to n^-0.5."""
        return math.sqrt(d.cases) / sum(math.sqrt(x.cases) for x in self.datasets)

    @property
    def total_voxels(self) -> float:
        return sum(d.cases * voxels(d) for d in self.datasets)

    @property
    def mean_case_voxels(self) -> float:
        return self.total_voxels / self.cases

    @property
    def max_case_voxels(self) -> int:
        return max(voxels(d) for d in self.datasets)

    @property
    def zarr_voxels_per_sample(self) -> float:
        return sum(self.p_dataset(d) * math.prod(fetched_zyx(d)) for d in self.datasets)

    @property
    def zarr_gets_per_sample(self) -> float:
        """Chunk objects per sample (image and label: two arrays)."""
        per = (math.prod(f / c for f, c in zip(fetched_zyx(d), CHUNK_ZYX)) for d in self.datasets)
        return 2 * sum(self.p_dataset(d) * n for d, n in zip(self.datasets, per))

    def wds_bytes_per_sample(self, bpv: float) -> float:
        """Every case streamed once per pass, ``PATCHES_PER_CASE`` patches taken from it on average."""
        return self.mean_case_voxels * bpv / PATCHES_PER_CASE


COLLECTIONS = (
    Collection("multitalent13", MULTITALENT13),
    Collection("multitalent13 + TotalSegmentator", (*MULTITALENT13, TOTALSEGMENTATOR)),
)


def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def datasets_table() -> list[str]:
    both = COLLECTIONS[1]
    out = [
        "| dataset | cases | median shape, spacing (mm) | at 1.5×1×1 mm | M voxels | share of samples "
        "(13 / 14 datasets) | Zarr read per sample, M voxels |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for d in both.datasets:
        z, y, x = resampled_zyx(d)
        share13 = f"{COLLECTIONS[0].p_dataset(d):.3f}" if d in MULTITALENT13 else "–"
        out.append(
            f"| {d.name} | {d.cases:,} | {'×'.join(map(str, d.median_zyx))}, "
            f"({', '.join(f'{s:g}' for s in d.spacing_zyx)}) | {z}×{y}×{x} | {_f(voxels(d) / 1e6)} | "
            f"{share13} / {both.p_dataset(d):.3f} | {_f(math.prod(fetched_zyx(d)) / 1e6)} |"
        )
    return out


def collections_table() -> list[str]:
    bz, bw, braw = bytes_per_voxel_zarr(), bytes_per_voxel_wds(), bytes_per_voxel_wds_raw()
    out = [
        "| collection | cases | G voxels | at rest: Zarr + WebDataset (phantom ratios) | mean case | "
        "Zarr per sample | Zarr GETs per sample | WebDataset per sample (raw bound) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in COLLECTIONS:
        at_rest = c.total_voxels * (bz + bw) / 1e12
        out.append(
            f"| {c.name} | {c.cases:,} | {_f(c.total_voxels / 1e9)} | {at_rest:.2f} TB | "
            f"{_f(c.mean_case_voxels / 1e6)} M voxels | {_f(c.zarr_voxels_per_sample * bz / MB)} MB | "
            f"{_f(c.zarr_gets_per_sample, 0)} | {_f(c.wds_bytes_per_sample(bw) / MB)} MB "
            f"({_f(c.wds_bytes_per_sample(braw) / MB)} MB) |"
        )
    return out


def per_gpu_table(c: Collection) -> list[str]:
    bz, bw, braw = bytes_per_voxel_zarr(), bytes_per_voxel_wds(), bytes_per_voxel_wds_raw()
    decode_cpu_per_sample = WDS_DECODE_CPU_S * c.mean_case_voxels / math.prod(WDS_CASE_ZYX) / PATCHES_PER_CASE
    out = [
        f"Per GPU and per {NODE_GPUS}-GPU node, {c.name}, at the H200 step times:",
        "",
        "| network | step | samples/s per GPU | Zarr MB/s per GPU | WebDataset MB/s per GPU (raw bound) | "
        "loader cores per GPU: GPU aug / CPU aug / + WebDataset decode | node: Zarr / WebDataset Gbit/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for net, step in STEP_S.items():
        sps = BATCH_PER_GPU / step
        zarr = sps * c.zarr_voxels_per_sample * bz / MB
        wds, wds_raw = sps * c.wds_bytes_per_sample(bw) / MB, sps * c.wds_bytes_per_sample(braw) / MB
        cores_gpu = sps / LOADER_SAMPLES_PER_CPU_S_GPU_AUG
        cores_cpu = sps / LOADER_SAMPLES_PER_CPU_S_CPU_AUG
        decode = sps * decode_cpu_per_sample
        out.append(
            f"| {net} | {step * 1000:.1f} ms | {sps:.2f} | {zarr:,.0f} | {wds:,.0f} ({wds_raw:,.0f}) | "
            f"{cores_gpu:.2f} / {cores_cpu:.2f} / +{decode:.2f} | "
            f"{zarr * NODE_GPUS * 8 / 1000:.1f} / {wds * NODE_GPUS * 8 / 1000:.1f} |"
        )
    return out


def memory_lines(c: Collection) -> list[str]:
    batch_mb = BATCH_PER_GPU * math.prod(READ_ZYX) * (4 + 1) / MB  # float32 image + uint8 label
    in_flight = LOADER_WORKERS * PREFETCH * batch_mb
    mean_case_mb = c.mean_case_voxels * 3 / MB  # int16 image + uint8 label, decoded
    max_case_mb = c.max_case_voxels * 3 / MB
    buf_mean = SHUFFLE_BUFFER * LOADER_WORKERS * mean_case_mb / 1000
    buf_max = SHUFFLE_BUFFER * LOADER_WORKERS * max_case_mb / 1000
    ckpt_gb = RESENC_PARAMS * 10 / 1e9  # bf16 weights 2 B + fp32 master 4 B + SGD momentum 4 B
    return [
        f"- one batch at the read size: {BATCH_PER_GPU} × {'×'.join(map(str, READ_ZYX))} × (4 B image + 1 B "
        f"label) = {batch_mb:.1f} MB; in flight from the loader: {LOADER_WORKERS} workers × prefetch "
        f"{PREFETCH} = {LOADER_WORKERS * PREFETCH} batches = {in_flight / 1000:.2f} GB per GPU, passed "
        "through /dev/shm;",
        f"- WebDataset shuffle buffers ({c.name}): {SHUFFLE_BUFFER} decoded cases × {LOADER_WORKERS} "
        f"workers × {mean_case_mb:.0f} MB (mean case, 3 B/voxel) = {buf_mean:.1f} GB per GPU, "
        f"{buf_max:.1f} GB if every buffered case were the largest ({max_case_mb:.0f} MB);",
        f"- a ResEnc U-Net checkpoint: {RESENC_PARAMS / 1e6:.2f} M parameters × 10 B (bf16 weights + "
        f"fp32 master copy + SGD momentum) = {ckpt_gb:.2f} GB; every 250 iterations at "
        f"{STEP_S['ResEnc U-Net'] * 1000:.1f} ms = every {250 * STEP_S['ResEnc U-Net']:.0f} s, i.e. "
        f"{ckpt_gb * 1000 / (250 * STEP_S['ResEnc U-Net']):.1f} MB/s averaged per run; keep 3 = "
        f"{3 * ckpt_gb:.1f} GB.",
    ]


def render() -> str:
    both = COLLECTIONS[1]
    lines = [
        f"Inputs: stored bytes per voxel {bytes_per_voxel_zarr():.3f} (Zarr), {bytes_per_voxel_wds():.3f} "
        f"(WebDataset, zstd-3), {bytes_per_voxel_wds_raw():.3f} (uncompressed members: the raw bound); "
        f"read patch {'×'.join(map(str, READ_ZYX))}, chunks {'×'.join(map(str, CHUNK_ZYX))}, "
        f"{PATCHES_PER_CASE:g} patches per streamed case, batch {BATCH_PER_GPU} per GPU.",
        "",
        *datasets_table(),
        "",
        *collections_table(),
        "",
        *per_gpu_table(both),
        "",
        *memory_lines(both),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
