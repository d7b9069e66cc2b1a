"""MLflow as a cluster runs it: ``mlflow server`` (started through ``infra/mlflow-server.sh``) with its
runs and model registry in a real PostgreSQL, its artifacts in an S3-API store (moto's server, see
``tests/s3_server.py``), and MLflow's basic authentication on.

A tiny training run tracks to it over HTTP, then is published and pulled through its registry; the
artifacts land in the bucket and the run in PostgreSQL. A client without credentials, or with a wrong
password, is refused with one line that names the server and the settings to fix.

PostgreSQL comes from ``scripts/postgres.sh`` (started here when it is not running, and stopped again
after). Where it cannot be started the tests are skipped with the reason, except when
``MULTITALENT_REQUIRE_POSTGRES=1`` (CI, ``.ci/run``): then that is a failure.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from multitalent.cli import main
from s3_server import S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "postgres.sh"
pytestmark = pytest.mark.slow

REQUIRE = os.environ.get("MULTITALENT_REQUIRE_POSTGRES") == "1"
USER = "trainer"
BUCKET = "mlflow"
PREFIX = "artifacts"


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason}; MULTITALENT_REQUIRE_POSTGRES=1 makes this a failure, not a skip")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    """``PGHOST``/``PGPORT``/``PGUSER``/``PGDATABASE``/``PGPASSFILE`` of the cluster ``scripts/postgres.sh``
    runs (role ``mlflow``, allowed to create databases); no password in them."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "MULTITALENT_PG_INSTALL": "0"}  # tests never install packages
    was_running = subprocess.run([SCRIPT, "status"], env=env, capture_output=True).returncode == 0
    started = subprocess.run([SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        last = (started.stderr.strip().splitlines() or ["no output"])[-1]
        _unavailable(f"PostgreSQL cannot be started here: {last}")
    printed = subprocess.run([SCRIPT, "env"], env=env, capture_output=True, text=True, check=True).stdout
    settings = dict(w.split("=", 1) for w in shlex.split(printed) if "=" in w)
    yield settings
    if not was_running:
        subprocess.run([SCRIPT, "stop"], env=env, capture_output=True, timeout=120)


def _connect(settings: dict[str, str], dbname: str):
    import psycopg

    return psycopg.connect(
        host=settings["PGHOST"],
        port=settings["PGPORT"],
        user=settings["PGUSER"],
        dbname=dbname,
        passfile=settings["PGPASSFILE"],
        autocommit=True,
    )


@pytest.fixture(scope="module")
def databases(postgres) -> Iterator[tuple[str, str]]:
    """Two new databases (tracking store, basic-auth user store), dropped afterwards: each run of the
    module starts from empty stores (the admin user is created on the first start only)."""
    base = f"mt_test_{secrets.token_hex(4)}"
    names = (base, f"{base}_auth")
    with _connect(postgres, postgres["PGDATABASE"]) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name}")
    yield names
    with _connect(postgres, postgres["PGDATABASE"]) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Server:
    uri: str
    proc: subprocess.Popen[bytes]
    log: Path
    admin_password: str
    user_password: str
    s3: S3Server

    def credentials(self, user: str = USER, password: str | None = None) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.user_password if password is None else password,
        }


def _wait_healthy(uri: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server not healthy within {timeout_s:.0f} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(postgres, databases, s3_server, tmp_path_factory) -> Iterator[Server]:
    """``infra/mlflow-server.sh``: PostgreSQL backend and user store, S3 artifacts, basic auth; one
    worker. The admin creates the user ``trainer`` the tests train and publish as."""
    tracking_db, auth_db = databases
    s3_server.make_bucket(BUCKET)
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    admin_password = secrets.token_urlsafe(18)
    env = {
        **os.environ,
        **s3_server.env(),
        **postgres,
        "PGDATABASE": tracking_db,
        "MLFLOW_AUTH_DATABASE": auth_db,
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/{PREFIX}",
        "MLFLOW_BASIC_AUTH": "1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
        "TMPDIR": str(root),  # the generated basic_auth.ini
    }
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(REPO / "infra" / "mlflow-server.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn workers form one process group, stopped together
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, log)
        user_password = secrets.token_urlsafe(18)
        _create_user(uri, admin_password, USER, user_password)
        yield Server(uri, proc, log, admin_password, user_password, s3_server)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _create_user(uri: str, admin_password: str, user: str, password: str) -> None:
    import mlflow.server

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password})
    try:
        mlflow.server.get_app_client("basic-auth", tracking_uri=uri).create_user(user, password)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3_keys(server: Server) -> list[str]:
    import boto3

    env = server.s3.env()
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_train_publish_pull_through_the_server(
    server, postgres, databases, phantom_shards, tmp_path, monkeypatch, capsys
):
    storage = tmp_path / "runs"
    # The client has the server's URI and its own credentials, no storage keys: artifacts go through it.
    client_only = ("MLFLOW_TRACKING_", "MLFLOW_S3_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(client_only)}
    env.update(server.credentials())
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "multitalent.cli",
            "train",
            str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"),
            "--set",
            f"shards.path={phantom_shards}",
            "--set",
            f"run.storage_path={storage}",
            "--set",
            "run.name=pg-tiny",
            "--set",
            f"tracking.uri={server.uri}",
            "--set",
            "tracking.experiment=pg-test",
            "--set",
            "architecture.patch_zyx=[16, 32, 32]",
            "--set",
            "workers.num_workers=1",
            "--set",
            "batch.global_size=2",
            "--set",
            "schedule.epochs=1",
            "--set",
            "schedule.iterations_per_epoch=3",
            "--set",
            "checkpoint.every_iterations=3",
            "--set",
            "validation.max_cases=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert f"mlflow: {server.uri} run " in train.stdout
    run_id = train.stdout.split(f"mlflow: {server.uri} run ")[1].split()[0]

    for k, v in server.credentials().items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(["publish", str(storage / "pg-tiny"), "--name", "phantom-pg", "--alias", "champion"]) == 0
    published = capsys.readouterr().out
    assert "published phantom-pg version 1" in published and "models:/phantom-pg@champion" in published
    out = tmp_path / "pulled"
    assert main(["pull", "models:/phantom-pg@champion", "--out", str(out), "--tracking-uri", server.uri]) == 0
    assert "models:/phantom-pg@champion = models:/phantom-pg/1: verified" in capsys.readouterr().out

    from multitalent.registry import open_package

    pkg = open_package(out)  # verifies the manifest again
    assert f"manifest sha256 {pkg.digest}" in published  # the very package that was published

    # Another signed-in user may read (default permission READ) but not publish into this run.
    reader_password = secrets.token_urlsafe(18)
    _create_user(server.uri, server.admin_password, "reader", reader_password)
    for k, v in server.credentials("reader", reader_password).items():
        monkeypatch.setenv(k, v)
    assert main(["publish", str(storage / "pg-tiny"), "--name", "phantom-pg"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and server.uri in errors[0], errors
    assert "HTTP 403" in errors[0] and "'reader'" in errors[0], errors

    # The run, its metrics and the registered version are rows of the PostgreSQL store ...
    with _connect(postgres, databases[0]) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        assert status == ("FINISHED",)
        (n_loss,) = conn.execute(
            "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", (run_id,)
        ).fetchone()
        assert n_loss == 3
        versions = conn.execute(
            "SELECT version, run_id FROM model_versions WHERE name = 'phantom-pg'"
        ).fetchall()
        assert versions == [(1, run_id)]
    # ... and its files objects in the bucket, uploaded through the server (the client had no S3 keys).
    keys = _s3_keys(server)
    mine = [k for k in keys if f"/{run_id}/artifacts/" in k]
    assert any(k.endswith("/job.yaml") for k in mine), keys
    assert any(k.endswith(".png") for k in mine), keys
    packaged = [k for k in mine if "/packages/" in k]
    assert {Path(k).name for k in packaged} == {p.name for p in out.iterdir()}


def test_clients_without_valid_credentials_are_refused(server, phantom_shards, tmp_path, monkeypatch, capsys):
    # The server itself: no credentials, a wrong password -> 401 before anything is read.
    request = urllib.request.Request(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 401

    # The registry commands: one line naming the server, the cause and what to set.
    for creds, who in [({}, "no credentials"), (server.credentials(password="wrong-password"), repr(USER))]:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(k, raising=False)
        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        out = tmp_path / f"pulled-{len(creds)}"
        pull = ["pull", "models:/anything@champion", "--out", str(out), "--tracking-uri", server.uri]
        assert main(pull) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert server.uri in err and "401" in err and who in err, err
        assert "MLFLOW_TRACKING_USERNAME" in err, err
        assert "wrong-password" not in err
        assert not out.exists()

        # Training: refused before any worker starts (its tracking would be lost), not silently untracked.
        storage = tmp_path / f"runs-{len(creds)}"
        job = str(REPO / "jobs" / "pretrain_cpu_tiny.yaml")
        overrides = [f"shards.path={phantom_shards}", f"run.storage_path={storage}"]
        overrides += ["run.name=refused", f"tracking.uri={server.uri}"]
        assert main(["train", job, *[a for o in overrides for a in ("--set", o)]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and server.uri in err and "401" in err and who in err, err
        assert not (storage / "refused").exists()


def test_no_secret_on_a_command_line_or_in_the_log(server, postgres):
    """The database password, the admin's and the S3 secret reach the server through its environment
    and files only: none is in any of its processes' command lines, nor in its log."""
    import psutil

    pg_secret = Path(postgres["PGPASSFILE"]).read_text().splitlines()[0].rsplit(":", 1)[1]
    s3_secret = server.s3.env()["AWS_SECRET_ACCESS_KEY"]
    secrets_ = [pg_secret, server.admin_password, server.user_password, s3_secret]
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    assert len(procs) >= 1
    for p in procs:
        line = " ".join(p.cmdline())
        assert not [s for s in secrets_ if s in line], line
    log = server.log.read_text()
    assert "Uvicorn running" in log or "Listening" in log or "Started" in log, log[-2000:]
    assert not [s for s in secrets_ if s in log]


def test_a_refusal_is_told_from_an_outage(tmp_path, monkeypatch):
    """The message logic alone (no server, no PostgreSQL): a 401/403 names the user and the settings to
    fix, never the password; any other failure is no refusal; the tracking warning says which it was."""
    import warnings

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED, UNAUTHENTICATED

    from multitalent.tracking.credentials import refused_credentials
    from multitalent.tracking.outbox import FlushPolicy, Outbox, WarningLimiter

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    unauthenticated = MlflowException("failed with error code 401 != 200", error_code=UNAUTHENTICATED)
    assert "no credentials were sent" in (refused_credentials(unauthenticated) or "")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    assert "MLFLOW_TRACKING_PASSWORD is not set" in (refused_credentials(unauthenticated) or "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-value")
    reason = refused_credentials(unauthenticated) or ""
    assert "refused user 'ann'" in reason and "s3cret-value" not in reason
    denied = MlflowException("permission denied", error_code=PERMISSION_DENIED)
    assert "HTTP 403" in (refused_credentials(denied) or "")
    assert refused_credentials(ConnectionError("connection refused")) is None
    assert refused_credentials(MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)) is None

    def connect():
        raise unauthenticated

    outbox = Outbox(policy=FlushPolicy(), connect=connect, warnings=WarningLimiter(0), store="http://h:5000")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert outbox.drain() is False
    text = " ".join(str(w.message) for w in caught)
    assert "http://h:5000 refused the request" in text and "'ann'" in text and "unreachable" not in text
