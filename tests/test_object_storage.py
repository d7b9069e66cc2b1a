"""Object storage end to end (issue 9, part 1), against a real S3-API server (moto's standalone server,
tests/s3_server.py) on 127.0.0.1, through s3fs and Ray's pyarrow file system.

- preflight: a missing bucket, a wrong endpoint, missing credentials and a bucket without write
  permission (moto enforcing IAM) are one line naming the URI and the cause, before any work;
- a Zarr store cut off before its marker, and a shard stream whose store stops and comes back;
- the converter writing to the store while it hangs briefly (the run goes on), then for good (the run
  stops with one clear line); nothing half-written is visible; the rerun verifies and skips finished
  cases and its output is byte-identical to a local conversion;
- training streaming the shards from the store with Ray Train checkpoints there: killed, resumed from
  the newest verified checkpoint, never from an interrupted upload.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from multitalent import storage
from multitalent.shards import (
    ShardError,
    ZarrLayout,
    iter_shard_samples,
    shard_urls,
    verify_case_zarr,
    write_case_zarr,
    write_shards,
    zarr_store,
)

REPO = Path(__file__).resolve().parents[1]
MULTITALENT = str(Path(sys.executable).with_name("multitalent"))
SMALL = ZarrLayout(chunks_zyx=(8, 32, 32))
# Fail in seconds, not minutes, when the store hangs (fsspec reads FSSPEC_S3 for every s3fs client)
SHORT_TIMEOUTS = json.dumps(
    {"config_kwargs": {"connect_timeout": 2, "read_timeout": 2, "retries": {"max_attempts": 1}}}
)


@pytest.fixture(scope="module")
def s3(s3_server):
    """The module's server, its environment set for this process and the subprocesses it starts."""
    env = {**s3_server.env(), "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield s3_server


def s3fs_client():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


@dataclass
class Case:
    image_zyx: np.ndarray
    label_zyx: np.ndarray
    fg_locations: np.ndarray
    spacing_zyx_mm: tuple[float, float, float] = (2.0, 1.0, 1.0)
    geometry: dict = field(default_factory=lambda: {"shape_zyx": [16, 64, 64]})
    classes_present: list[int] = field(default_factory=lambda: [0])


def make_case(seed: int) -> Case:
    """Noise (barely compressible, so a shard spans many read blocks) with one labelled box."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1500, (16, 64, 64)).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[4:10, 10:30, 20:40] = 1
    return Case(image, label, np.array([[0, 5, 12, 22], [0, 8, 25, 33]], np.int32))


# ---------------------------------------------------------------------------------------- preflight
def read_only_store(tmp_path: Path):
    """A second server that enforces IAM, with bucket ``ro-bucket`` and a user allowed to read only."""
    import boto3

    from s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

    # 4 requests without authentication (the setup below), every later one is checked against IAM
    server = S3Server(log_path=tmp_path / "moto-iam.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}).start()
    kw = {
        "endpoint_url": server.endpoint,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        "region_name": REGION,
    }
    boto3.client("s3", **kw).create_bucket(Bucket="ro-bucket")
    iam = boto3.client("iam", **kw)
    iam.create_user(UserName="reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return server, key


def test_preflight_names_the_uri_and_the_cause_before_any_work(s3, tmp_path, monkeypatch, capsys):
    from multitalent.cli import main
    from s3_server import free_port

    s3.make_bucket("preflight-ok")
    storage.preflight("s3://preflight-ok/out", write=True)
    assert s3fs_client().find("preflight-ok") == []  # the probe object is gone

    def refused(location: str, *, write: bool = True) -> str:
        with pytest.raises(storage.StorageError) as e:
            storage.preflight(location, write=write)
        assert str(e.value).startswith(f"{location}: ") and "\n" not in str(e.value)
        return e.value.cause

    assert refused("s3://no-such-bucket/out") == "bucket 'no-such-bucket' does not exist"
    with monkeypatch.context() as mp:
        wrong = f"http://127.0.0.1:{free_port()}"
        mp.setenv("AWS_ENDPOINT_URL", wrong)
        mp.setenv("AWS_ENDPOINT_URL_S3", wrong)
        assert (
            refused("s3://preflight-ok/out")
            == f"cannot reach the object store at {wrong} (check AWS_ENDPOINT_URL)"
        )
    with monkeypatch.context() as mp:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.delenv(k)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        assert refused("s3://preflight-ok/out").startswith("no credentials found: set AWS_ACCESS_KEY_ID")

    server, key = read_only_store(tmp_path)
    try:
        with monkeypatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                mp.setenv(name, server.endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            mp.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            storage.preflight("s3://ro-bucket/shards", write=False)  # reading is allowed
            assert refused("s3://ro-bucket/out") == "no write permission (writing a probe object was denied)"

            # the commands: one line, exit 2, before anything is done (the phantom raw data is not written)
            raw = tmp_path / "raw"
            status = main(
                [
                    "convert",
                    str(REPO / "jobs/convert.yaml"),
                    "--set",
                    f"raw_root={raw}",
                    "--set",
                    "out=s3://ro-bucket/out",
                ]
            )
            err = capsys.readouterr().err.strip().splitlines()
            assert status == 2 and err == [
                "error: s3://ro-bucket/out: no write permission (writing a probe object was denied)"
            ]
            assert not raw.exists()
            train = [
                "train",
                str(REPO / "jobs/pretrain_cpu_tiny.yaml"),
                "--set",
                "shards.path=s3://no-such-bucket/phantom",
                "--set",
                "run.storage_path=s3://ro-bucket/runs",
                "--set",
                f"run.local_path={tmp_path / 'runs'}",
            ]
            assert main(train) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == ["error: s3://no-such-bucket/phantom: bucket 'no-such-bucket' does not exist"]
            assert main([*train[:3], "shards.path=s3://ro-bucket/shards", *train[4:]]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [
                "error: s3://ro-bucket/runs: no write permission (writing a probe object was denied)"
            ]
            assert not (tmp_path / "runs").exists()
    finally:
        server.stop()


# ------------------------------------------------------------------------------- publishing, reading
class CutOff(Exception):
    """The writer dies at this point."""


def test_a_zarr_store_is_visible_only_once_its_marker_is_written(s3, monkeypatch):
    root = s3.make_bucket("publish") + "/coll"
    first = write_case_zarr(root, make_case(0), dataset_id="dsA", case_id="c1", layout=SMALL)
    url = f"{root}/{first.zarr_path}"
    assert verify_case_zarr(url) == first
    real_remove = storage.remove_tree

    def die(url, attrs):
        raise CutOff(url)

    with monkeypatch.context() as mp:  # replacing it with another case dies before the marker is written
        mp.setattr(zarr_store, "_write_marker", die)
        with pytest.raises(CutOff):
            write_case_zarr(root, make_case(1), dataset_id="dsA", case_id="c1", layout=SMALL)
    assert not s3fs_client().exists(f"publish/coll/{first.zarr_path}/zarr.json")
    assert verify_case_zarr(url) is None  # neither the old store nor a mix of both

    # killed outright (no cleanup): the arrays are there, the marker is not: still invisible
    with monkeypatch.context() as mp:
        mp.setattr(zarr_store, "_write_marker", die)
        mp.setattr(storage, "remove_tree", lambda loc: None if loc.endswith(".zarr") else real_remove(loc))
        with pytest.raises(CutOff):
            write_case_zarr(root, make_case(2), dataset_id="dsA", case_id="c1", layout=SMALL)
    keys = s3fs_client().find("publish/coll")
    assert any(k.endswith("c1.zarr/image/zarr.json") for k in keys)
    assert not any(k.endswith("c1.zarr/zarr.json") for k in keys)
    assert verify_case_zarr(url) is None

    again = write_case_zarr(root, make_case(1), dataset_id="dsA", case_id="c1", layout=SMALL)
    assert verify_case_zarr(url) == again and again.sha256 != first.sha256


def test_streaming_survives_a_store_that_stops_and_comes_back(s3, tmp_path, monkeypatch):
    from s3_server import S3Server

    local = tmp_path / "local"
    records = [
        write_case_zarr(local, make_case(i), dataset_id="dsA", case_id=f"c{i}", layout=SMALL)
        for i in range(6)
    ]
    (local_shard,) = write_shards(local, records, max_cases_per_shard=None, max_shard_bytes=None)

    import fsspec.config

    server = S3Server(log_path=tmp_path / "moto.log").start()  # its own: it will lose its contents
    monkeypatch.setitem(fsspec.config.conf, "s3", json.loads(SHORT_TIMEOUTS))  # no client-side waits
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    try:
        bucket = server.make_bucket("stream")
        for rec in records:  # the remote writers give the bytes of the local ones
            write_case_zarr(
                f"{bucket}/coll",
                make_case(int(rec.case_id[1:])),
                dataset_id="dsA",
                case_id=rec.case_id,
                layout=SMALL,
            )
        (remote_shard,) = write_shards(
            f"{bucket}/coll", records, max_cases_per_shard=None, max_shard_bytes=None
        )
        assert remote_shard == local_shard
        (url,) = shard_urls(f"{bucket}/coll")
        expected = list(iter_shard_samples(str(local / "wds" / local_shard.name)))
        shard_bytes = (local / "wds" / local_shard.name).read_bytes()
        options = {"default_block_size": 2**16}  # many range reads per shard

        def come_back(delay_s: float) -> None:
            time.sleep(delay_s)
            server.start()
            server.make_bucket("stream")
            s3fs_client().pipe_file(url.removeprefix("s3://"), shard_bytes)

        samples = iter_shard_samples(url, storage_options=options, backoff_s=0.5)
        got = [next(samples)]
        server.stop()  # mid-shard; it returns empty, and its data are put back a moment later
        thread = threading.Thread(target=come_back, args=(1.5,))
        thread.start()
        got += list(samples)
        thread.join()
        assert [s["__key__"] for s in got] == [s["__key__"] for s in expected]
        assert all(a[k] == b[k] for a, b in zip(got, expected) for k in b if not k.startswith("__"))

        samples = iter_shard_samples(url, storage_options=options, retries=2, backoff_s=0.2)
        next(samples)
        server.stop()  # for good
        with pytest.raises(ShardError, match=r"object store failed 3 times in a row, last after 1 sample"):
            list(samples)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- the converter
def finished_stores(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(k.rsplit("/", 1)[0] for k in fs.glob(f"{root}/zarr/*/*.zarr/zarr.json"))


def wait_for(predicate, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.mark.slow
def test_converter_on_a_failing_store_keeps_only_finished_cases_and_the_rerun_matches_local(
    s3, phantom_shards, tmp_path
):
    """The phantom collection of ``phantom_shards`` converted to the store with short client timeouts:
    a 2 s hang is ridden out; a hang that lasts stops the run with one line; then the rerun (store
    back) skips what was finished and writes exactly the local conversion's bytes."""
    root = "conv/phantom"
    s3.make_bucket("conv")
    cmd = [
        MULTITALENT,
        "convert",
        str(REPO / "jobs" / "convert.yaml"),
        f"--set=raw_root={phantom_shards.parent / 'raw'}",
        f"--set=out=s3://{root}",
        "--set=ray.num_cpus=2",
        "--set=synth=null",
    ]
    fs = s3fs_client()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FSSPEC_S3": SHORT_TIMEOUTS},
    )
    try:
        wait_for(lambda: len(finished_stores(fs, root)) >= 2, timeout_s=240, what="2 converted cases")
        s3.pause()
        time.sleep(2.0)  # shorter than a request's time-out
        s3.resume()
        wait_for(lambda: len(finished_stores(fs, root)) >= 4, timeout_s=240, what="4 converted cases")
        assert proc.poll() is None, "the converter finished before the store failed"
        s3.pause()  # for good: every request times out
        _, err = proc.communicate(timeout=180)
    finally:
        s3.resume()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err[-3000:]
    assert lines[-1].startswith(f"error: s3://{root}: the object store failed while writing "), lines[-1]
    assert "run the same command again to continue" in lines[-1] and "Traceback" not in err

    fs.invalidate_cache()
    assert not fs.exists(f"{root}/manifest.json")
    visible = finished_stores(fs, root)
    assert len(visible) >= 4 and all(verify_case_zarr(f"s3://{k}") is not None for k in visible)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(fs.cat_file(f"{root}/report.json"))
    assert (
        report["skipped"] >= len(visible) and report["converted"] + report["skipped"] == report["cases_found"]
    )
    for name in [
        "manifest.json",
        "plan.json",
        "splits.json",
        *[f"wds/{p.name}" for p in (phantom_shards / "wds").iterdir()],
    ]:
        assert fs.cat_file(f"{root}/{name}") == (phantom_shards / name).read_bytes(), name
    assert not [k for k in fs.find(root) if "/.tmp-" in k]


# --------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def s3_collection(s3, phantom_shards) -> str:
    """``phantom_shards`` uploaded as it is (plan, manifest, splits, Zarr stores, shards)."""
    bucket = s3.make_bucket("train-shards")
    fs = s3fs_client()
    fs.put(f"{phantom_shards}/", "train-shards/phantom/", recursive=True)
    return f"{bucket}/phantom"


def train_sets(shards: str, storage_path: str, local: Path, name: str) -> list[str]:
    return [
        f"shards.path={shards}",
        "shards.source=webdataset",  # training streams the shards; validation reads Zarr crops
        f"run.storage_path={storage_path}",
        f"run.local_path={local}",
        f"run.name={name}",
        "architecture.patch_zyx=[16, 32, 32]",
        "batch.global_size=4",
        "schedule.epochs=2",
        "schedule.iterations_per_epoch=4",
        "checkpoint.every_iterations=2",
        "validation.max_cases=2",
        "validation.overlays=false",
    ]


def kill_tree(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGKILL a command and every process it started (its local Ray), and wait until they are gone."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    assert not alive, f"still running after SIGKILL: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_training_from_the_store_killed_then_resumed_never_from_an_interrupted_upload(
    s3, s3_collection, tmp_path
):
    from mlflow.tracking import MlflowClient

    from multitalent.train import load_train_job, run_training, verify_checkpoint
    from multitalent.train.checkpoint import checkpoint_locations, fetch_checkpoint, parse_dir_name

    runs = s3.make_bucket("runs") + "/exp"
    run = f"{runs}/killed"
    sets = train_sets(s3_collection, runs, tmp_path / "local", "killed")
    cmd = [
        MULTITALENT,
        "train",
        str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"),
        *[a for s in sets for a in ("--set", s)],
    ]
    log = tmp_path / "first-launch.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*cmd, "--set", "debug.sleep_per_iteration_s=1.5"], stdout=f, stderr=subprocess.STDOUT
        )
    fs = s3fs_client()

    def complete() -> list[str]:  # checkpoints with the state and both ranks' manifests in the store
        fs.invalidate_cache()
        names = ["trainer_state.json", "rank-0.sha256.json", "rank-1.sha256.json"]
        return [c for c in checkpoint_locations(run) if all(fs.exists(f"{c[5:]}/{n}") for n in names)]

    try:
        wait_for(lambda: bool(complete()), timeout_s=300, what="the first checkpoint in the store")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    newest = complete()[0]
    done_before = parse_dir_name(newest.rsplit("/", 1)[1])
    assert done_before is not None and 0 < done_before < 8

    # an upload interrupted mid-way, newer than any real checkpoint: rank 1's optimizer state never arrived
    fake = f"{run}/ckpt-it000000007-zzzzzz"
    fs.copy(newest.removeprefix("s3://") + "/", fake.removeprefix("s3://") + "/", recursive=True)
    fs.rm(f"{fake.removeprefix('s3://')}/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt")

    records: list[dict] = []
    result = run_training(
        load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", sets), on_progress=records.append
    )
    start = next(r for r in records if r["event"] == "start")
    assert start["iteration"] == done_before and start["resumed_from"] == newest.rsplit("/", 1)[1]
    assert result.iterations == 8 and result.loss_iterations == list(range(8))
    assert isinstance(result.checkpoint, str) and result.checkpoint.startswith(f"{run}/ckpt-it000000008-")
    assert verify_checkpoint(fetch_checkpoint(result.checkpoint, tmp_path / "dl")).iteration == 8

    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert result.tracking_uri == f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}"
    (artifact,) = [a.path for a in client.list_artifacts(result.mlflow_run_id, "resume")]
    text = Path(client.download_artifacts(result.mlflow_run_id, artifact, str(tmp_path / "art"))).read_text()
    assert f"{fake}: deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1) is missing" in text

    # the run on the store publishes like a local one (its newest verified checkpoint, downloaded)
    from multitalent.train.publish import publish_run

    done = publish_run(run, name="s3-tiny")
    assert done.uri == "models:/s3-tiny/1" and done.run_id == result.mlflow_run_id

    # relaunched under another schedule: refused on the driver, naming the checkpoint in the store
    from multitalent.jobs import JobError

    other = load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", [*sets, "schedule.epochs=3"])
    with pytest.raises(JobError, match=rf"{run}/ckpt-it000000008-\w+: the checkpoint's schedule .* differs"):
        run_training(other)
