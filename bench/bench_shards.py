"""Chunk shapes and codecs for the per-case Zarr stores, and compression of WebDataset members.

A CT-like 200x400x400 int16 phantom (body, lungs, organs, spine, smooth texture, ~12 HU noise)
with a uint8 label map is written with each layout; we report the store size, write time and the
median time of random 96x192x192 crop reads (image + label, warm page cache). Then the tar members
(npy vs zstd-compressed npy) for size, packing and decoding time.

    .venv/bin/python bench/bench_shards.py            # full size, ~2 min on 2 busy cores
    .venv/bin/python bench/bench_shards.py --quick    # 100x200x200, smoke run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from multitalent.shards import (
    ZarrLayout,
    decode_wds_sample,
    open_case_zarr,
    verify_case_zarr,
    write_case_zarr,
    write_shards,
)


@dataclass
class Phantom:
    image_zyx: np.ndarray
    label_zyx: np.ndarray
    fg_locations: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    geometry: dict
    classes_present: list[int]


def ct_phantom(shape_zyx: tuple[int, int, int], seed: int = 0) -> Phantom:
    """A CT-like volume: air, an elliptic body with texture, lungs, organs (labels 1-4), a spine."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    z, y, x = np.ogrid[:nz, :ny, :nx]
    zf, yf, xf = (z / nz).astype(np.float32), (y / ny).astype(np.float32), (x / nx).astype(np.float32)

    def ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        return ((zf - c[0]) / r[0]) ** 2 + ((yf - c[1]) / r[1]) ** 2 + ((xf - c[2]) / r[2]) ** 2 < 1

    body = (((yf - 0.5) / 0.42) ** 2 + ((xf - 0.5) / 0.47) ** 2 < 1) & (zf >= 0)
    coarse = rng.normal(0, 1, (max(2, nz // 8), max(2, ny // 8), max(2, nx // 8))).astype(np.float32)
    texture = ndimage.zoom(
        coarse, (nz / coarse.shape[0], ny / coarse.shape[1], nx / coarse.shape[2]), order=1
    )
    hu = np.where(body, 30 + 25 * texture, -1000).astype(np.float32)
    label = np.zeros(shape_zyx, np.uint8)
    organs = [  # (centre, radii, HU, label)
        ((0.75, 0.45, 0.3), (0.2, 0.15, 0.12), -850, 0),  # lungs
        ((0.75, 0.45, 0.7), (0.2, 0.15, 0.12), -850, 0),
        ((0.4, 0.45, 0.35), (0.15, 0.17, 0.15), 60, 1),  # liver
        ((0.3, 0.6, 0.3), (0.08, 0.05, 0.04), 150, 2),  # kidneys
        ((0.3, 0.6, 0.7), (0.08, 0.05, 0.04), 150, 2),
        ((0.4, 0.5, 0.7), (0.08, 0.07, 0.06), 50, 3),  # spleen
        ((0.5, 0.55, 0.5), (0.5, 0.03, 0.03), 200, 4),  # aorta
        ((0.5, 0.7, 0.5), (0.6, 0.05, 0.05), 700, 0),  # spine
    ]
    for centre, radii, value, lab in organs:
        m = ellipsoid(centre, radii)
        hu[m] = value + 15 * texture[m]
        if lab:
            label[m] = lab
    hu += rng.normal(0, 12, shape_zyx).astype(np.float32)
    image = np.clip(np.rint(hu), -1024, 1500).astype(np.int16)
    fg = []
    for lab in range(1, 5):
        idx = np.argwhere(label == lab)
        pick = idx[rng.choice(len(idx), size=min(len(idx), 10_000), replace=False)]
        fg.append(np.column_stack([np.full(len(pick), lab - 1), pick]))
    return Phantom(
        image, label, np.concatenate(fg).astype(np.int32), (1.5, 0.8, 0.8), {"phantom": True}, [0, 1, 2, 3]
    )


def dir_size(p: Path) -> tuple[int, int]:
    files = [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def crop_starts(
    shape: tuple[int, int, int], crop: tuple[int, int, int], n: int, seed: int
) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)) for _ in range(n)]


def _timed(fn, *args, **kw):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - w0, time.process_time() - c0


def bench_layouts(root: Path, case: Phantom, layouts: dict[str, ZarrLayout], crop, n_crops: int) -> dict:
    """Write every layout, then read the same random crops from all of them, interleaved round by
    round so that load from other processes on a shared machine hits every layout alike."""
    res: dict[str, dict] = {}
    stores = {}
    for i, (name, layout) in enumerate(layouts.items()):
        rec, wall, cpu = _timed(
            write_case_zarr, root, case, dataset_id="bench", case_id=f"L{i}", layout=layout
        )
        size, nfiles = dir_size(root / rec.zarr_path)
        res[name] = {
            "size_mb": size / 1e6,
            "files": nfiles,
            "write_s": wall,
            "write_cpu_s": cpu,
            "wall": [],
            "cpu": [],
        }
        stores[name] = (open_case_zarr(root / rec.zarr_path), rec)
    names = list(layouts)
    for r, s in enumerate(crop_starts(case.image_zyx.shape, crop, n_crops, seed=1)):
        sl = tuple(slice(a, a + c) for a, c in zip(s, crop))
        for name in names[r % len(names) :] + names[: r % len(names)]:
            zc = stores[name][0]
            (img, lab), wall, cpu = _timed(lambda zc=zc, sl=sl: (zc.image[sl], zc.label[sl]))
            assert img.shape == crop and lab.shape == crop
            res[name]["wall"].append(wall)
            res[name]["cpu"].append(cpu)
    for name in names:
        path = root / stores[name][1].zarr_path
        rec, wall, _ = _timed(verify_case_zarr, path)
        assert rec == stores[name][1]
        res[name].update(
            crop_ms=1e3 * statistics.median(res[name]["wall"]),
            crop_cpu_ms=1e3 * statistics.median(res[name]["cpu"]),
            verify_s=wall,
        )
    return res


def bench_npy(root: Path, case: Phantom, crop: tuple[int, int, int], n_crops: int) -> dict:
    w0 = time.perf_counter()
    np.save(root / "image.npy", case.image_zyx)
    np.save(root / "label.npy", case.label_zyx)
    write_s = time.perf_counter() - w0
    img, lab = np.load(root / "image.npy", mmap_mode="r"), np.load(root / "label.npy", mmap_mode="r")
    walls, cpus = [], []
    for s in crop_starts(case.image_zyx.shape, crop, n_crops, seed=1):
        sl = tuple(slice(a, a + c) for a, c in zip(s, crop))
        _, wall, cpu = _timed(lambda sl=sl: (np.array(img[sl]), np.array(lab[sl])))
        walls.append(wall)
        cpus.append(cpu)
    size = (root / "image.npy").stat().st_size + (root / "label.npy").stat().st_size
    return {
        "size_mb": size / 1e6,
        "write_s": write_s,
        "crop_ms": 1e3 * statistics.median(walls),
        "crop_cpu_ms": 1e3 * statistics.median(cpus),
    }


def bench_wds(root: Path, n_cases: int, zstd_level: int | None) -> dict:
    import webdataset as wds

    from multitalent.shards import CaseRecord, shard_urls

    records = [CaseRecord.from_dict(r) for r in _records(root, n_cases)]
    shards, pack_s, pack_cpu = _timed(
        write_shards, root, records, max_cases_per_shard=None, max_shard_bytes=None, zstd_level=zstd_level
    )

    def read_all() -> int:
        return sum(1 for _ in wds.WebDataset(shard_urls(root), shardshuffle=False).map(decode_wds_sample))

    n, read_s, read_cpu = _timed(read_all)
    assert n == n_cases
    return {
        "size_mb": sum(s.nbytes for s in shards) / 1e6 / n_cases,
        "pack_s": pack_s / n_cases,
        "pack_cpu_s": pack_cpu / n_cases,
        "decode_ms": 1e3 * read_s / n_cases,
        "decode_cpu_ms": 1e3 * read_cpu / n_cases,
    }


def _records(root: Path, n_cases: int) -> list[dict]:
    """The bench case copied ``n_cases`` times under different case ids (copies of one store)."""
    src = root / "zarr" / "bench" / "c0.zarr"
    rec = verify_case_zarr(src)
    assert rec is not None
    out = []
    for i in range(n_cases):
        dst = root / "zarr" / "wdsbench" / f"c{i}.zarr"
        if not dst.exists():
            write_case_zarr(root, _from_store(src), dataset_id="wdsbench", case_id=f"c{i}")
        out.append(verify_case_zarr(dst).to_dict())  # type: ignore[union-attr]
    return out


def _from_store(path: Path) -> Phantom:
    zc = open_case_zarr(path)
    m = zc.meta
    return Phantom(
        zc.image[...],
        zc.label[...],
        zc.fg_locations,
        tuple(m["spacing_zyx_mm"]),
        m["geometry"],
        m["classes_present"],
    )


LAYOUTS = {  # image codec varies; labels always blosc zstd-3 bitshuffle
    "64³ uncompressed": ZarrLayout((64, 64, 64), "none", "none"),
    "64³ blosc-lz4-5 shuffle": ZarrLayout((64, 64, 64), "blosc:lz4:5:shuffle"),
    "64³ blosc-zstd-1 shuffle": ZarrLayout((64, 64, 64), "blosc:zstd:1:shuffle"),
    "64³ blosc-zstd-3 bitshuffle": ZarrLayout((64, 64, 64), "blosc:zstd:3:bitshuffle"),
    "64³ blosc-lz4-5 bitshuffle": ZarrLayout((64, 64, 64), "blosc:lz4:5:bitshuffle"),
    "64³ blosc-zstd-1 bitshuffle": ZarrLayout((64, 64, 64), "blosc:zstd:1:bitshuffle"),
    "64³ zstd-3": ZarrLayout((64, 64, 64), "zstd:3"),
    "32x64x64 blosc-zstd-1 bitshuffle": ZarrLayout((32, 64, 64), "blosc:zstd:1:bitshuffle"),
    "32³ blosc-lz4-5 shuffle": ZarrLayout((32, 32, 32), "blosc:lz4:5:shuffle"),
    "32x64x64 blosc-lz4-5 shuffle": ZarrLayout((32, 64, 64), "blosc:lz4:5:shuffle"),
    "32x128x128 blosc-lz4-5 shuffle": ZarrLayout((32, 128, 128), "blosc:lz4:5:shuffle"),
    "32x128x128 blosc-zstd-3 bitshuffle": ZarrLayout((32, 128, 128), "blosc:zstd:3:bitshuffle"),
    "128³ blosc-lz4-5 shuffle": ZarrLayout((128, 128, 128), "blosc:lz4:5:shuffle"),
    "64³ in 128x256x256 shards, lz4-5": ZarrLayout(
        (64, 64, 64), "blosc:lz4:5:shuffle", shards_zyx=(128, 256, 256)
    ),
}
LABEL_CODECS = ["blosc:zstd:3:bitshuffle", "blosc:lz4:5:shuffle", "zstd:3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100x200x200 volume, fewer crops")
    ap.add_argument("--crops", type=int, default=40)
    ap.add_argument("--wds-cases", type=int, default=4)
    ap.add_argument("--layouts", nargs="*", help="only these layout names (default: all)")
    ap.add_argument("--no-labels", action="store_true", help="skip the label codec table")
    ap.add_argument("--no-wds", action="store_true", help="skip the WebDataset table")
    args = ap.parse_args()
    shape, crop = ((100, 200, 200), (48, 96, 96)) if args.quick else ((200, 400, 400), (96, 192, 192))
    t0 = time.perf_counter()
    case = ct_phantom(shape)
    print(
        f"phantom {shape} built in {time.perf_counter() - t0:.1f} s; "
        f"raw image {case.image_zyx.nbytes / 1e6:.1f} MB"
        f" + label {case.label_zyx.nbytes / 1e6:.1f} MB; crop {crop}; {args.crops} crops; times: wall (CPU)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        root = Path(tmp)
        print(
            "\n| image layout (label: blosc zstd-3 bitshuffle) | size | files | write "
            "| crop read, median | verify |"
        )
        print("|---|---|---|---|---|---|")
        layouts = {k: v for k, v in LAYOUTS.items() if not args.layouts or k in args.layouts}
        for name, r in bench_layouts(root, case, layouts, crop, args.crops).items():
            print(
                f"| {name} | {r['size_mb']:.1f} MB | {r['files']} "
                f"| {r['write_s']:.2f} s ({r['write_cpu_s']:.2f}) "
                f"| {r['crop_ms']:.0f} ms ({r['crop_cpu_ms']:.0f}) | {r['verify_s']:.2f} s |"
            )
        npy_dir = root / "npy"
        npy_dir.mkdir()
        r = bench_npy(npy_dir, case, crop, args.crops)
        print(
            f"| raw .npy, memory-mapped | {r['size_mb']:.1f} MB | 2 | {r['write_s']:.2f} s "
            f"| {r['crop_ms']:.1f} ms ({r['crop_cpu_ms']:.1f}) | – |"
        )

        if not args.no_labels:
            print("\n| label codec (64³ chunks) | label size | image + label crop read, median |")
            print("|---|---|---|")
            label_layouts = {
                spec: ZarrLayout((64, 64, 64), "blosc:lz4:5:shuffle", spec) for spec in LABEL_CODECS
            }
            for i, (spec, r) in enumerate(
                bench_layouts(root / "labels", case, label_layouts, crop, args.crops).items()
            ):
                label_mb, _ = dir_size(root / f"labels/zarr/bench/L{i}.zarr/label")
                print(
                    f"| {spec} | {label_mb / 1e6:.3f} MB | {r['crop_ms']:.0f} ms ({r['crop_cpu_ms']:.0f}) |"
                )
        if not args.no_wds:
            write_case_zarr(
                root, case, dataset_id="bench", case_id="c0"
            )  # default layout, source of the tars
            print(
                f"\n| WebDataset members ({args.wds_cases} cases, one shard) | tar bytes per case "
                "| pack per case | read + decode per case |"
            )
            print("|---|---|---|---|")
            for level in (None, 1, 3):
                r = bench_wds(root, args.wds_cases, level)
                name = "image.npy (uncompressed)" if level is None else f"image.npy.zst, zstd level {level}"
                print(
                    f"| {name} | {r['size_mb']:.1f} MB | {r['pack_s']:.2f} s ({r['pack_cpu_s']:.2f}) "
                    f"| {r['decode_ms']:.0f} ms ({r['decode_cpu_ms']:.0f}) |"
                )
            shutil.rmtree(root / "wds", ignore_errors=True)


if __name__ == "__main__":
    main()
