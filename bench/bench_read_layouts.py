"""Zarr layouts for the training read: the enlarged patch (210x308x308 for 96x192x192) of a 200x320x320 case.

Writes one CT-like case (``bench_datapath.make_case``) with several chunk shapes / image codecs through the
converter's own writer, then times reading the enlarged image + label patch at random offsets (median CPU
time of ``--reads`` reads) and reports the store size.

    .venv/bin/python bench/bench_read_layouts.py --reads 14
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_datapath import make_case
from multitalent.shards import open_case_zarr, write_case_zarr
from multitalent.shards.zarr_store import ZarrLayout

LAYOUTS = [
    ("blosc:zstd:3:bitshuffle", (64, 64, 64)),
    ("blosc:lz4:5:bitshuffle", (64, 64, 64)),
    ("blosc:lz4:5:bitshuffle", (128, 128, 128)),
    ("blosc:zstd:3:bitshuffle", (128, 128, 128)),
    ("blosc:zstd:3:bitshuffle", (64, 128, 128)),
    ("blosc:lz4:5:bitshuffle", (64, 128, 128)),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reads", type=int, default=14)
    args = parser.parse_args()
    case = make_case((200, 320, 320), 6, 0)
    rng = np.random.default_rng(0)
    print("| image codec | chunks | store MB | enlarged read, median CPU ms |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec, chunks in LAYOUTS:
            root = Path(tmp) / f"{spec.replace(':', '_')}_{'x'.join(map(str, chunks))}"
            layout = ZarrLayout(chunks_zyx=chunks, image_codec=spec, label_codec="blosc:zstd:3:bitshuffle")
            record = write_case_zarr(root, case, dataset_id="A", case_id="c", layout=layout)
            stored = open_case_zarr(root / record.zarr_path)
            size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            times = []
            for _ in range(args.reads):
                z, y, x = (int(rng.integers(0, n)) for n in (10, 12, 12))
                t = time.process_time()
                stored.image[z : z + 190, y : y + 308, x : x + 308]
                stored.label[z : z + 190, y : y + 308, x : x + 308]
                times.append(time.process_time() - t)
            print(f"| {spec} | {chunks} | {size / 1e6:.1f} | {np.median(times) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
