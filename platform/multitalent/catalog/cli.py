"""``multitalent catalog``: print label spaces."""

from __future__ import annotations

import argparse
import json

from multitalent.catalog.presets import available_presets, load_catalog


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def run(args: argparse.Namespace) -> int:
    if args.catalog_command == "list":
        for name in available_presets():
            cat = load_catalog(name)
            print(f"{name:20s} {len(cat.datasets):3d} datasets {cat.num_classes:4d} classes  {cat.hash}")
        return 0
    cat = load_catalog(args.preset)
    if args.json:
        print(json.dumps(cat.to_dict(), indent=1))
        return 0
    print(f"catalog {cat.name}  hash {cat.hash}")
    if cat.description:
        print(cat.description)
    print()
    w = max([8, *(len(d.id) for d in cat.datasets)])  # ids are never cut: they are what you type
    print(f"{'id':>{w}s}  {'dataset':32s} {'layout':17s} {'cases':>5s} {'classes':>7s}")
    for d in cat.datasets:
        print(f"{d.id:>{w}s}  {clip(d.name, 32):32s} {d.layout:17s} {d.num_cases:5d} {len(d.classes):7d}")
    print()
    print(f"{'#':>4s}  {'dataset':>{w}s}  {'class':34s} {'raw values':14s} groups")
    for c in cat.classes:
        raw = "{" + ",".join(map(str, c.raw_values)) + "}"
        kind = "region " if len(c.raw_values) > 1 else ""
        name = clip(c.name, 34)
        print(f"{c.index:4d}  {c.dataset_id:>{w}s}  {name:34s} {kind + raw:14s} {','.join(c.groups)}")
    pairs = [(d.id, p) for d in cat.datasets for p in d.lateral_pairs]
    sided = [(d.id, c) for d in cat.datasets for c in d.sided]
    if pairs or sided:
        print()
        if pairs:
            print("lateral pairs (swapped when a sample is mirrored left-right):")
        for dataset_id, (left, right) in pairs:
            print(f"  {dataset_id:>{w}s}  {left} <-> {right}")
        if sided:
            print("sided classes without a counterpart (their datasets are not mirrored left-right):")
            for dataset_id, name in sided:
                print(f"  {dataset_id:>{w}s}  {name}")
    print()
    print(
        f"{len(cat.datasets)} datasets, {cat.num_classes} classes, "
        f"{sum(len(c.raw_values) > 1 for c in cat.classes)} regions, "
        + ", ".join(f"{len(cat.group_members(g))} {g}" for g in ("difficult", "cancer"))
        + f", {len(pairs)} lateral pairs"
    )
    return 0
