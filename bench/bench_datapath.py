"""The full CPU data path per core: read + sample + augment, batches of 4 patches of 96x192x192.

Ours: ``ZarrPatchSource`` (chunk-aware reads from per-case Zarr stores, sampling ∝ 1/√n with 1/3
foreground) + augmentation on the CPU (torch, one thread), two ways: the trainer's loader
(``StepBatches``: the batch's augmentation parameters are drawn first and only the rotated or scaled
samples, ~36 %, read the enlarged patch) and the former path (every sample read enlarged, then
``augment_batch``). With augmentation on the GPU (the jobs' default), the loader's share alone: the
trainer's loader draws the parameters and reads accordingly (``DrawnBatch``), against reading every
sample enlarged.
Peer: nnU-Net v2's own path on the same preprocessed cases: ``nnUNetDataLoader`` over
``nnUNetDatasetBlosc2`` (its on-disk format, chunked for the patch by its own rule) with the
transforms ``nnUNetTrainer.get_training_transforms`` builds (deep supervision off), one process.

Both read the same arrays (ours int16 HU normalised on read; nnU-Net's float32 already normalised)
and are run interleaved, batch by batch, so load from other processes hits both alike. Reported:
samples per CPU-second (``time.process_time``, all threads of the process) and per wall second.

    .venv/bin/python bench/bench_datapath.py --cases 4 --rounds 6
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchlib import machine_line
from multitalent.catalog import Catalog
from multitalent.data.augment import AugmentConfig, augment_batch, read_shape_zyx
from multitalent.data.sources import ZarrPatchSource
from multitalent.preprocess.plan import Normalization
from multitalent.shards import write_case_zarr
from multitalent.train.batches import AugmentPlan, StepBatches

PATCH = (96, 192, 192)
NORM = Normalization(clip=(-1000.0, 1000.0), mean=40.0, std=300.0)


@dataclass
class Case:
    image_zyx: np.ndarray
    label_zyx: np.ndarray
    fg_locations: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    geometry: dict
    classes_present: list[int]


def make_case(shape: tuple[int, int, int], n_labels: int, seed: int) -> Case:
    """CT-like: air, an elliptic body with texture, ellipsoid organs of distinct HU, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(s, dtype=np.float32)[:, None, None] for s in shape)
    y, x = y.reshape(1, -1, 1), x.reshape(1, 1, -1)
    body = ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.4 * shape[2])) ** 2 <= 1
    image = np.where(body, 30.0, -1000.0).astype(np.float32) * np.ones(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    for value in range(1, n_labels + 1):
        c = [rng.uniform(0.25, 0.75) * s for s in shape]
        r = [rng.uniform(0.06, 0.15) * s for s in shape]
        inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        label[inside] = value
        image[inside] = rng.uniform(-100, 250)
    image += rng.normal(0, 15, shape).astype(np.float32)
    locations = []
    for value in range(1, n_labels + 1):
        idx = np.argwhere(label == value)
        pick = idx[rng.choice(len(idx), size=min(len(idx), 10_000), replace=False)]
        locations.append(np.concatenate([np.full((len(pick), 1), value - 1), pick], axis=1))
    return Case(
        image_zyx=np.clip(np.rint(image), -1000, 1000).astype(np.int16),
        label_zyx=label,
        fg_locations=np.concatenate(locations).astype(np.int32),
        spacing_zyx_mm=(1.5, 1.0, 1.0),
        geometry={},
        classes_present=list(range(n_labels)),
    )


def write_nnunet(cases: list[Case], folder: Path) -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    folder.mkdir(parents=True)
    for i, case in enumerate(cases):
        data = ((np.clip(case.image_zyx, *NORM.clip) - NORM.mean) / NORM.std).astype(np.float32)[None]
        seg = case.label_zyx.astype(np.int16)[None]  # as nnU-Net stores it
        locations = {
            v + 1: case.fg_locations[case.fg_locations[:, 0] == v][:, 1:]
            for v in range(int(case.fg_locations[:, 0].max()) + 1)
        }
        # nnU-Net stores locations as (n, 4) [channel, z, y, x].
        props = {
            "class_locations": {
                k: np.concatenate([np.zeros((len(v), 1), int), v], 1) for k, v in locations.items()
            }
        }
        blocks, chunks = comp_blosc2_params(data.shape, PATCH, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, PATCH, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(
            data,
            seg,
            props,
            str(folder / f"case_{i:03d}"),
            chunks=chunks,
            blocks=blocks,
            chunks_seg=chunks_seg,
            blocks_seg=blocks_seg,
        )


def nnunet_loader(folder: Path, n_labels: int, read: tuple[int, int, int]):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    rotation = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)
    transforms = nnUNetTrainer.get_training_transforms(PATCH, rotation, None, (0, 1, 2), False)
    labels = {"background": 0, **{f"organ{v}": v for v in range(1, n_labels + 1)}}
    return nnUNetDataLoader(
        nnUNetDatasetBlosc2(str(folder)),
        4,
        read,
        PATCH,
        LabelManager(labels, None),
        0.33,
        transforms=transforms,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", default="200,320,320")
    parser.add_argument("--labels", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    config = AugmentConfig()
    read = read_shape_zyx(PATCH, config)
    catalog = Catalog.from_dict(
        {
            "name": "bench",
            "datasets": [
                {
                    "id": "A",
                    "layout": "msd",
                    "labels": {str(v): f"organ{v}" for v in range(1, args.labels + 1)},
                }
            ],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [make_case(shape, args.labels, seed) for seed in range(args.cases)]
        records = [
            write_case_zarr(root / "ours", c, dataset_id="A", case_id=f"c{i}") for i, c in enumerate(cases)
        ]
        write_nnunet(cases, root / "nnunet")
        del cases
        source = ZarrPatchSource(
            root / "ours",
            catalog=catalog,
            normalization=NORM,
            cases=records,
            patch_zyx=read,
            batch_size=4,
            seed=0,
        )
        ours_iter = iter(source)
        gen = torch.Generator().manual_seed(0)
        theirs = nnunet_loader(root / "nnunet", args.labels, read)

        def ours() -> None:
            batch = next(ours_iter)
            augment_batch(
                batch.image_bczyx, batch.label_bzyx, config=config, generator=gen, out_shape_zyx=PATCH
            )

        plan = AugmentPlan(config, PATCH, read, in_loader=True)
        step_batches = StepBatches(source, start=0, stop=10**9, augment=plan)
        iteration = iter(range(10**9))

        def ours_first() -> (
            None
        ):  # the trainer's loader path: parameters first, enlarged reads only if needed
            step_batches.batch_at(next(iteration))

        device_plan = AugmentPlan(config, PATCH, read, in_loader=False)
        drawn_batches = StepBatches(source, start=0, stop=10**9, augment=device_plan)

        def ours_read_first() -> None:  # the CPU's share when augmentation runs on the GPU in the step
            drawn_batches.batch_at(next(iteration))

        def ours_read() -> None:  # the same before the parameters were drawn in the loader: all enlarged
            next(ours_iter)

        def nnunet() -> None:
            theirs.generate_train_batch()

        timed = {
            name: [0.0, 0.0] for name in ("ours_first", "ours", "ours_read_first", "ours_read", "nnunet")
        }
        ours(), ours_first(), nnunet()  # warm-up
        for _ in range(args.rounds):
            pipelines = (
                ("ours_first", ours_first),
                ("ours", ours),
                ("ours_read_first", ours_read_first),
                ("ours_read", ours_read),
                ("nnunet", nnunet),
            )
            for name, fn in pipelines:
                w, c = time.perf_counter(), time.process_time()
                fn()
                timed[name][0] += time.perf_counter() - w
                timed[name][1] += time.process_time() - c
    n = 4 * args.rounds
    print(f"\n{machine_line()}")
    setup = f"batch 4 of {PATCH} read as {read}; {args.rounds} rounds"
    print(f"{args.cases} cases {shape}, {args.labels} labels; {setup}\n")
    print("| pipeline | samples / CPU-s | samples / s (wall) |\n|---|---|---|")
    names = {
        "ours_first": "ours: draw augmentation, read + sample + augment (CPU; the trainer's loader)",
        "ours": "ours: read enlarged + sample + augment (CPU)",
        "ours_read_first": "ours: draw augmentation, read + sample (augment on GPU; the trainer's loader)",
        "ours_read": "ours: read enlarged + sample (augment on GPU)",
        "nnunet": "nnU-Net v2: loader + transforms",
    }
    for name, (wall, cpu_s) in timed.items():
        print(f"| {names[name]} | {n / cpu_s:.2f} | {n / wall:.2f} |")
    for name in ("ours_first", "ours"):
        ratio = timed["nnunet"][1] / timed[name][1]
        print(f"\nper-core ratio {names[name].split(' (')[0]} / nnU-Net: {ratio:.2f}x (target >= 3x)", end="")
    print()


if __name__ == "__main__":
    main()
