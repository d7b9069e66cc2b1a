"""``multitalent synth``: write the phantom CT collection."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from multitalent.synth.collection import write_phantom_collection

    start = time.perf_counter()
    summary = write_phantom_collection(Path(args.out), seed=int(args.seed), scale=float(args.scale))
    seconds = time.perf_counter() - start
    total = sum(len(d["cases"]) for d in summary.values())
    print(
        f"phantom collection (catalog preset 'phantom'): {len(summary)} datasets, {total} cases "
        f"in {seconds:.1f} s -> {args.out}"
    )
    print(
        f"{'id':4s} {'layout':17s} {'cases':>5s}  {'spacing x,y,z mm':24s} {'axes':4s} {'HU+':>4s}  classes"
    )
    for dataset_id, d in summary.items():
        spacing = ",".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in d["spacing_xyz_mm"])
        print(
            f"{dataset_id:4s} {d['layout']:17s} {len(d['cases']):5d}  {spacing:24s} {d['axcodes']:4s} "
            f"{d['hu_offset']:+4.0f}  {', '.join(d['classes'])}"
        )
    return 0
