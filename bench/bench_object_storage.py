"""Object storage vs the local disk, side by side in one run (issue 9): the converter writing, the
WebDataset stream reading, Zarr random patch reads.

The store is moto's S3-API server (``tests/s3_server.py``) on 127.0.0.1, reached through s3fs exactly as
a real S3 endpoint would be (``AWS_ENDPOINT_URL``). The phantom collection (``--scale``) is written once;
then, interleaved local / S3 in each round:

- convert: the whole job (scan, plan, Zarr stores, shards, manifest) into a fresh folder / prefix;
- stream: every shard read and decoded in order (``iter_shard_samples`` + ``decode_wds_sample``, what the
  training loader does per case), and the same bytes read without decoding;
- zarr: every case store opened (``ZarrPatchSource.open_case``: metadata and foreground locations),
  then ``--patches`` random training patches from the open stores (chunk reads only).

CPU seconds are reported next to wall seconds (the machine is shared): ``client CPU`` sums this process
and its Ray processes (not the server); ``server CPU`` is moto's. MB/s of the stream counts shard bytes;
MB/s of Zarr patches counts the decoded patch voxels (image int16 + label uint8) handed to training;
``requests`` are the S3 requests moto answered during the measure.

    PYTHONPATH=platform .venv/bin/python bench/bench_object_storage.py --scale 1.0 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the S3-API server the tests use

from s3_server import S3Server  # noqa: E402


@dataclass
class Measure:
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    requests: int
    items: int
    nbytes: int


def requests_served(server: S3Server) -> int:
    """Requests moto has answered so far (one access-log line each)."""
    assert server.log_path is not None
    with open(server.log_path, "rb") as f:
        return sum(1 for line in f if b'] "' in line and b"/moto-api/" not in line)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def client_cpu(exclude: int) -> float:
    """CPU seconds of this process and its descendants (Ray), except the server's process."""
    me = psutil.Process()
    total = _cpu(me)
    for child in me.children(recursive=True):
        if child.pid == exclude:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            total += _cpu(child)
    return total


def measure(server: S3Server, fn: Callable[[], tuple[int, int]]) -> Measure:
    assert server.proc is not None
    moto = psutil.Process(server.proc.pid)
    r0 = requests_served(server)
    c0, s0, t0 = client_cpu(server.proc.pid), _cpu(moto), time.perf_counter()
    items, nbytes = fn()
    wall = time.perf_counter() - t0
    c1, s1 = client_cpu(server.proc.pid), _cpu(moto)
    time.sleep(0.2)  # the access log line of the last request
    return Measure(wall, c1 - c0, s1 - s0, requests_served(server) - r0, items, nbytes)


def tree_bytes(root: str) -> tuple[int, int]:
    """(objects/files, bytes) under a local folder or URL, temporary entries excluded."""
    from multitalent import storage

    if storage.is_url(root):
        fs, path = storage.filesystem(root)
        sizes = [v["size"] for k, v in fs.find(path, detail=True).items() if "/.tmp-" not in k]
    else:
        sizes = [p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and ".tmp-" not in str(p)]
    return len(sizes), sum(sizes)


def convert(raw: Path, out: str) -> tuple[int, int]:
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion
    from multitalent.jobs import load_job

    job = load_job(
        REPO / "jobs" / "convert.yaml", ConvertJob, [f"raw_root={raw}", f"out={out}", "synth=null"]
    )
    summary = run_conversion(job, log=lambda _: None)
    assert summary.ok and summary.converted == summary.cases_found, summary.report()
    _, nbytes = tree_bytes(out)
    return summary.converted, nbytes


def stream(root: str, *, decode: bool, passes: int = 1) -> tuple[int, int]:
    """Every shard, in order, ``passes`` times: (cases, shard bytes)."""
    from multitalent.shards import decode_wds_sample, iter_shard_samples, load_manifest, shard_urls

    n = 0
    urls = shard_urls(root)
    for _ in range(passes):
        for url in urls:
            for raw in iter_shard_samples(url):
                if decode:
                    decode_wds_sample(raw)
                n += 1
    return n, passes * sum(s.nbytes for s in load_manifest(root).shards)


def zarr_source(root: str, *, patch_zyx: tuple[int, int, int], seed: int) -> Any:
    from multitalent import storage
    from multitalent.catalog import load_catalog
    from multitalent.data.sources import ZarrPatchSource
    from multitalent.preprocess.plan import Plan

    plan = Plan.from_json(storage.read_text(storage.join(root, "plan.json")))
    return ZarrPatchSource(
        root,
        catalog=load_catalog("phantom"),
        normalization=plan.normalization,
        patch_zyx=patch_zyx,
        batch_size=2,
        seed=seed,
        cache_cases=10_000,  # every case stays open: the patch reads below touch chunks only
    )


def zarr_opens(source: Any) -> tuple[int, int]:
    """Open every case store (group and array metadata, the foreground locations)."""
    for i in range(len(source.paths)):
        source.open_case(i)
    return len(source.paths), sum(c.fg_locations.nbytes for c in source._cache.values())


def zarr_patches(source: Any, *, patches: int) -> tuple[int, int]:
    """Random training patches from the opened stores: (patches, patch bytes handed out)."""
    samples = source.samples()
    for _ in range(patches):
        next(samples)
    z, y, x = source.patch_zyx
    return patches, patches * z * y * x * 3  # int16 image + uint8 label


def row(name: str, ms: list[Measure], unit: str) -> str:
    wall = statistics.median(m.wall_s for m in ms)
    cpu = statistics.median(m.client_cpu_s for m in ms)
    server = statistics.median(m.server_cpu_s for m in ms)
    items, nbytes = ms[0].items, ms[0].nbytes
    requests = ms[0].requests if "S3" in name else "-"
    return (
        f"| {name} | {items / wall:.1f} {unit}/s | {nbytes / wall / 1e6:.1f} MB/s | {wall:.2f} s | "
        f"{cpu:.2f} s | {server:.2f} s | {items / max(cpu, 1e-9):.1f} {unit}/CPU-s | {requests} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="phantom collection scale (1.0: 24 cases)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patches", type=int, default=128)
    parser.add_argument("--stream-passes", type=int, default=5, help="reads of every shard per measure")
    parser.add_argument("--patch", default="48,96,96")
    parser.add_argument("--skip-convert", action="store_true")
    args = parser.parse_args()
    patch = tuple(int(p) for p in args.patch.split(","))
    assert len(patch) == 3

    import ray

    from multitalent.synth import write_phantom_collection

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    raw = work / "raw"
    write_phantom_collection(raw, seed=0, scale=args.scale)
    server = S3Server(log_path=work / "moto.log").start()
    os.environ.update({**server.env(), "AWS_EC2_METADATA_DISABLED": "true"})
    server.make_bucket("bench")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for every conversion
    results: dict[str, list[Measure]] = {}
    try:
        local_root, s3_root = str(work / "ref"), "s3://bench/ref"
        sides = (("local disk", local_root), ("S3 (moto, loopback)", s3_root))
        for _, root in sides:  # the collection both sides read; also warms imports and clients up
            convert(raw, root)
            stream(root, decode=True)
            zarr_patches(zarr_source(root, patch_zyx=patch, seed=99), patches=2)
        for r in range(args.rounds):
            for side, root in sides:
                runs: dict[str, Callable[[], tuple[int, int]]] = {}
                if not args.skip_convert:
                    out = f"{work}/conv{r}" if root == local_root else f"s3://bench/conv{r}"
                    runs[f"convert -> {side}"] = partial(convert, raw, out)
                passes = args.stream_passes
                runs[f"WebDataset stream, read only, {side}"] = partial(
                    stream, root, decode=False, passes=passes
                )
                runs[f"WebDataset stream + decode, {side}"] = partial(
                    stream, root, decode=True, passes=passes
                )
                source = zarr_source(root, patch_zyx=patch, seed=r)
                runs[f"Zarr case opens, {side}"] = partial(zarr_opens, source)
                runs[f"Zarr random patches {patch} (stores open), {side}"] = partial(
                    zarr_patches, source, patches=args.patches
                )
                for name, fn in runs.items():
                    results.setdefault(name, []).append(measure(server, fn))
        n_files, n_bytes = tree_bytes(local_root)
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {psutil.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; phantom scale {args.scale}: {n_files} files, {n_bytes / 1e6:.1f} MB "
        f"converted; {args.rounds} round(s), medians"
    )
    print("| what | items/s | MB/s | wall | client CPU | server CPU | items per client CPU-s | requests |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ms in results.items():
        unit = "patch" if "patches" in name else "case"
        print(row(name, ms, unit))


if __name__ == "__main__":
    main()
