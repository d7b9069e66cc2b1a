"""The conversion job end to end, on a real local Ray, with real NIfTI files, Zarr stores and tar shards."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from multitalent.catalog import load_preset
from multitalent.convert.job import ConvertJob
from multitalent.convert.pipeline import run_conversion
from multitalent.jobs import load_job
from multitalent.preprocess.plan import PLAN_FILE, Plan
from multitalent.rawio import discover_cases
from multitalent.shards import decode_wds_sample, load_manifest, open_case_zarr, shard_urls, verify_case_zarr
from multitalent.synth import FAULTS, WARNING_FAULTS, write_bad_cases, write_phantom_collection

REPO = Path(__file__).resolve().parents[1]
MULTITALENT = str(Path(sys.executable).with_name("multitalent"))
pytestmark = pytest.mark.slow


def _job(raw: Path, out: Path, *extra: str) -> ConvertJob:
    return load_job(
        REPO / "jobs" / "convert.yaml",
        ConvertJob,
        [f"raw_root={raw}", f"out={out}", "ray.num_cpus=2", *extra],
    )


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    write_phantom_collection(raw, seed=3, scale=0.5)
    return raw


def test_phantom_collection_converts_to_zarr_wds_plan_and_manifest(phantom_raw, tmp_path):
    out = tmp_path / "out"
    summary = run_conversion(_job(phantom_raw, out), log=lambda _: None)
    assert summary.ok and summary.skipped == 0 and summary.converted > 0

    catalog = load_preset("phantom")
    plan = Plan.load(out / PLAN_FILE)
    assert plan.catalog_hash == catalog.hash
    assert plan.normalization.source == "collection"
    manifest = load_manifest(out)
    assert manifest.plan_sha256 == plan.sha256 == hashlib.sha256((out / PLAN_FILE).read_bytes()).hexdigest()
    assert len(manifest.cases) == summary.converted
    assert {c.dataset_id for c in manifest.cases} == set(catalog.dataset_ids)
    assert not list(out.rglob(".tmp-*"))

    # Every case: its Zarr store verifies by checksum, and its shard sample holds the same arrays.
    from_shards = {}
    import webdataset as wds

    for sample in wds.WebDataset(shard_urls(out), shardshuffle=False, empty_check=False):
        arrays = decode_wds_sample(sample)
        from_shards[sample["__key__"]] = arrays
    assert len(from_shards) == len(manifest.cases)
    for entry in manifest.cases:
        record = verify_case_zarr(out / entry.zarr_path)
        assert record is not None and record.sha256 == entry.sha256
        case = open_case_zarr(out / entry.zarr_path)
        arrays = from_shards[f"{entry.dataset_id}__{entry.case_id}"]
        np.testing.assert_array_equal(case.image[...], arrays.image)
        np.testing.assert_array_equal(case.label[...], arrays.label)
        np.testing.assert_array_equal(case.fg_locations, arrays.fg_locations)
        # Resampled to the plan's spacing, values clipped to the plan's range.
        assert case.spacing_zyx_mm == pytest.approx(plan.target_spacing_zyx_mm)
        lo, hi = plan.normalization.clip
        assert lo - 1 <= arrays.image.min() and arrays.image.max() <= hi + 1
        declared = set(catalog.dataset(entry.dataset_id).labels) | {0}
        assert set(np.unique(arrays.label).tolist()) <= declared


def test_bad_input_is_reported_by_file_and_reason_while_others_convert(phantom_raw, tmp_path):
    catalog = load_preset("phantom")
    dataset = catalog.dataset("P02")
    bad_root = tmp_path / "bad"
    import shutil

    shutil.copytree(phantom_raw / dataset.location, bad_root / dataset.location)
    expected = write_bad_cases(bad_root / dataset.location, dataset)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            MULTITALENT,
            "convert",
            str(REPO / "jobs" / "convert.yaml"),
            f"--set=raw_root={bad_root}",
            f"--set=out={out}",
            "--set=datasets=[P02]",
            "--set=ray.num_cpus=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    failed = {f["case_id"]: f for f in report["failures"]}
    for case_id, keyword in expected.items():
        fault = next(k for k, v in FAULTS.items() if v == keyword)
        if fault in WARNING_FAULTS:
            assert case_id not in failed
            assert any(
                w["case_id"] == case_id and w["dataset_id"] == dataset.id and "zero" in w["message"]
                for w in report["warnings"]
            ), report["warnings"]
            continue
        assert case_id in failed, f"{case_id} ({keyword}) not reported"
        assert keyword.lower() in failed[case_id]["reason"].lower()
        assert Path(failed[case_id]["file"]).name, failed[case_id]
        assert failed[case_id]["file"] in proc.stderr
    good = {c.case_id for c in load_manifest(out).cases}
    originals = {
        p.name.split(".")[0].removesuffix("_0000")
        for p in (phantom_raw / dataset.location / "imagesTr").iterdir()
    }
    assert originals <= good  # every good case converted
    assert not good & set(failed)


def _manifest_bytes(out: Path) -> bytes:
    return (out / "manifest.json").read_bytes()


# Ray's dashboard and runtime-env agents run no tasks, and notice the raylet's death only at their own
# health check (over a minute on a loaded machine): not waited for.
_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent/main.py")


def _may_run_tasks(p: psutil.Process) -> bool:
    try:
        command = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return not any(agent in command for agent in _AGENTS)


def _still_running(processes: list[psutil.Process], *, timeout_s: float) -> list[psutil.Process]:
    """Poll until every process has exited (a zombie counts as exited: nobody may reap orphans
    here) or ``timeout_s`` passes; the processes still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _describe(processes: list[psutil.Process]) -> str:
    described = []
    for p in processes:
        try:
            described.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            described.append(f"{p.pid} (gone)")
    return "; ".join(described)


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_manifest(phantom_raw, tmp_path):
    reference = tmp_path / "reference"
    run_conversion(_job(phantom_raw, reference), log=lambda _: None)

    out = tmp_path / "killed"
    cmd = [
        MULTITALENT,
        "convert",
        str(REPO / "jobs" / "convert.yaml"),
        f"--set=raw_root={phantom_raw}",
        f"--set=out={out}",
        "--set=ray.num_cpus=2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("zarr/*/*.zarr"))) < 3:
        time.sleep(0.2)
    assert proc.poll() is None, "converter finished before it could be killed"
    # The local Ray it started (GCS, raylet, workers) descends from it; workers spawned after this
    # cannot get a task, since the driver that owns the tasks is gone.
    ray_processes = [p for p in psutil.Process(proc.pid).children(recursive=True) if _may_run_tasks(p)]
    assert ray_processes, "no Ray process under the converter: nothing to wait for"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    # Orphaned Ray workers may still be writing a store; once they are gone, whatever is visible
    # is complete: every store in place verifies.
    alive = _still_running(ray_processes, timeout_s=60)
    assert not alive, f"Ray processes of the killed converter still running after 60 s: {_describe(alive)}"
    visible = list(out.glob("zarr/*/*.zarr"))
    assert visible
    assert all(verify_case_zarr(p) is not None for p in visible)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "up to date" in rerun.stdout
    skipped = json.loads((out / "report.json").read_text())["skipped"]
    assert skipped >= 3
    assert _manifest_bytes(out) == _manifest_bytes(reference)
    for shard in sorted((reference / "wds").iterdir()):
        assert (out / "wds" / shard.name).read_bytes() == shard.read_bytes()
    assert not list(out.rglob(".tmp-*"))


def test_bad_datasets_are_reported_and_never_stop_the_others(phantom_raw, tmp_path):
    """Issue 14: a dataset without labelsTr and one whose dataset.json declares a label value the
    catalog lacks each become one dataset-level failure in the summary and report.json; a third
    converts. The dry run finds both problems without converting."""
    catalog = load_preset("phantom")
    raw = tmp_path / "raw"
    for dataset_id in ("P01", "P02", "P03"):
        location = catalog.dataset(dataset_id).location
        shutil.copytree(phantom_raw / location, raw / location)
    shutil.rmtree(raw / catalog.dataset("P02").location / "labelsTr")
    declared = raw / catalog.dataset("P01").location / "dataset.json"
    data = json.loads(declared.read_text())
    data["labels"]["7"] = "undeclared organ"
    declared.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = [
        MULTITALENT,
        "convert",
        str(REPO / "jobs" / "convert.yaml"),
        f"--set=raw_root={raw}",
        f"--set=out={out}",
        "--set=datasets=[P01, P02, P03]",
        "--set=ray.num_cpus=2",
    ]

    dry = subprocess.run([*args, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 1 and "Traceback" not in dry.stderr, dry.stderr
    p03 = catalog.dataset("P03")
    n_p03 = len(discover_cases(p03, raw / p03.location))
    assert re.search(rf"^  P03  kits19 +{n_p03} cases", dry.stdout, re.M), dry.stdout
    assert "problem: P01/*: " in dry.stdout and "declares label values [7]" in dry.stdout
    assert "problem: P02/*: " in dry.stdout and "no label files" in dry.stdout
    assert not out.exists(), "the dry run writes nothing"

    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{n_p03} cases found: {n_p03} converted, 0 up to date, 2 failed" in proc.stdout
    assert "FAILED P01/*: " in proc.stderr and "(whole dataset)" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [(f["dataset_id"], f["case_id"]) for f in report["failures"]] == [("P01", "*"), ("P02", "*")]
    assert report["cases_found"] == report["converted"] == n_p03 and report["error"] is None
    assert {c.dataset_id for c in load_manifest(out).cases} == {"P03"}
