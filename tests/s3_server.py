"""A real S3-API server for tests: moto's standalone server, one process on 127.0.0.1.

moto's server speaks the S3 REST API over HTTP (s3fs tests itself against it); its buckets live in the
process's memory, so a stopped server loses them. ``pause``/``resume`` (SIGSTOP/SIGCONT) make the store
unresponsive mid-run while keeping its contents, which is what a store that fails and comes back looks
like to a client.

    with S3Server() as s3:
        s3.make_bucket("shards")
        env = s3.env()  # AWS_ENDPOINT_URL, credentials and region for s3fs, boto3, pyarrow, MLflow
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_server_bin() -> Path:
    """The ``moto_server`` executable of this interpreter's environment."""
    path = Path(sys.executable).with_name("moto_server")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the dev extras (pip install -e '.[dev]')")
    return path


class S3Server:
    """One moto S3 server process; ``start``/``stop``/``pause``/``resume``, usable as a context manager."""

    def __init__(
        self, *, port: int | None = None, log_path: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        """``env``: extra environment of the server process, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "4"}``
        (moto then checks IAM permissions from the fifth request on)."""
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs / boto3 / pyarrow / MLflow at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def start(self, timeout_s: float = 30.0) -> S3Server:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(moto_server_bin()), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true", **self.extra_env},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode} (port {self.port})")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"moto_server did not answer on {self.endpoint} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def pause(self) -> None:
        """Freeze the server: connections hang, contents are kept."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
