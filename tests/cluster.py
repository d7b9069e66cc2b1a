"""Real local Ray clusters for tests: a head and optional extra nodes on this machine, via ``ray start``.

Each node is started by the venv's ``ray`` binary in a session of its own, with token authentication
on and a token that exists only for this cluster (a ``0600`` file in the cluster's temporary
directory), so nothing here touches ``~/.ray/auth_token`` or any other Ray on the machine. Every
process of the cluster inherits a marker variable (``MULTITALENT_TEST_CLUSTER=<temp dir>``); stopping
the cluster ends exactly the processes that carry it (``ray start`` daemons, workers, and job drivers,
which Ray starts in sessions of their own), never ``ray stop`` (which ends every Ray of the user).

    with local_ray_cluster(head_cpus=2, extra_nodes=[1]) as cluster:
        cluster.ray_cli("job", "submit", "--address", cluster.dashboard_url, "--", "echo", "hi")

Ports: all fixed ports a second node on the same machine would collide on (GCS, dashboard, client
server, dashboard agent) are drawn free; the others are left to Ray (0).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MARKER = "MULTITALENT_TEST_CLUSTER"

# What a submitted job must not upload (Ray 2.60 already honours the root .gitignore; these are the
# big ignored folders spelled out, so the upload stays small even where .gitignore is not read).
WORKING_DIR_EXCLUDES = [".git", ".venv", "data_shards", "runs", "mlruns", ".mypy_cache", ".ruff_cache"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the usual small race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClusterError(RuntimeError):
    """A local cluster that did not come up, or a job that did not finish."""


@dataclass
class JobResult:
    submission_id: str
    status: str  # SUCCEEDED, FAILED, STOPPED
    logs: str
    cli_output: str  # what `ray job submit` printed (it tails the job's logs)
    seconds: float


@dataclass
class LocalRayCluster:
    """A running cluster; built by :func:`local_ray_cluster`.

    ``gcs_address`` (``127.0.0.1:PORT``) is what ``ray start --address`` and ``ray.init`` take;
    ``dashboard_url`` (``http://127.0.0.1:PORT``) is what ``ray job submit --address`` takes.
    ``env`` is the environment every client of this cluster needs (auth mode and token, PATH).
    """

    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    session_pgids: list[int] = field(default_factory=list)
    node_cpus: list[int] = field(default_factory=list)

    # -- clients -----------------------------------------------------------------------------

    @property
    def token(self) -> str:
        return Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def http(self, path: str, *, method: str = "GET", body: Any = None, timeout_s: float = 10.0) -> Any:
        """JSON request to the dashboard's HTTP API, with this cluster's token."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.dashboard_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode() or "null")

    def ray_cli(
        self, *args: str, timeout_s: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ray ARGS`` with this cluster's environment; stdout and stderr together."""
        proc = subprocess.run(
            [RAY, *args],
            env=self.env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
        return proc

    def alive_nodes(self) -> list[dict[str, Any]]:
        reply = self.http("/api/v0/nodes?limit=100")
        return [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, n: int, *, timeout_s: float = 90.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= n:
                    return nodes
                last = f"{len(nodes)} alive"
            except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
                last = e
            time.sleep(0.5)
        raise ClusterError(f"{n} Ray nodes did not register within {timeout_s:.0f} s (last: {last})")

    def submit_job(
        self,
        entrypoint: Sequence[str],
        *,
        working_dir: Path = REPO,
        runtime_env: dict[str, Any] | None = None,
        timeout_s: float = 300.0,
    ) -> JobResult:
        """``ray job submit --address DASHBOARD --working-dir DIR -- ENTRYPOINT``; wait; status and logs.

        ``runtime_env`` (e.g. ``{"excludes": [...], "env_vars": {...}}``) goes through
        ``--runtime-env-json``. The CLI tails the job's output until the job ends.
        """
        submission_id = f"test-{secrets.token_hex(4)}"
        args = [
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--submission-id",
            submission_id,
            "--working-dir",
            str(working_dir),
        ]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        start = time.monotonic()
        cli = self.ray_cli(*args, "--", *entrypoint, timeout_s=timeout_s, check=False)
        status = self.job_status(submission_id)
        while status not in {"SUCCEEDED", "FAILED", "STOPPED"} and time.monotonic() - start < timeout_s:
            time.sleep(0.5)
            status = self.job_status(submission_id)
        logs = self.http(f"/api/jobs/{submission_id}/logs")["logs"]
        return JobResult(submission_id, status, logs, cli.stdout, time.monotonic() - start)

    def job_status(self, submission_id: str) -> str:
        return str(self.http(f"/api/jobs/{submission_id}")["status"])

    # -- processes ---------------------------------------------------------------------------

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (daemons, workers, job drivers), by the marker."""
        mine = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get(MARKER) == str(self.temp_dir):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return mine

    def processes_titled(self, prefix: str) -> list[psutil.Process]:
        """Processes of this cluster whose title starts with ``prefix`` (Ray titles actor workers
        ``ray::ClassName.method``; e.g. ``ray::RayTrainWorker`` for Ray Train's workers)."""
        found = []
        for proc in self.processes():
            try:
                title = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if title.startswith(prefix):
                found.append(proc)
        return found

    def stop(self, *, grace_s: float = 3.0) -> None:
        """End every process of this cluster: SIGTERM, then SIGKILL after ``grace_s``, repeated until
        none is left (a raylet may fork a worker while it is being stopped)."""
        signals = [(signal.SIGTERM, grace_s)] + [(signal.SIGKILL, 2.0)] * 5
        for sig, wait_s in signals:
            procs = self.processes()
            for pgid in self.session_pgids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)
            psutil.wait_procs(procs, timeout=wait_s)
            if not self.processes():
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def cluster_env(temp_dir: Path, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the cluster's processes and clients.

    Token authentication (Ray 2.60's default) with a per-cluster token file; the venv's ``bin`` first
    on ``PATH`` so a job's ``multitalent`` entry point resolves; DeepSpeed told it runs on CPU.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    token_path = temp_dir / "auth_token"
    if not token_path.exists():
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1",
            MARKER: str(temp_dir),
        }
    )
    env.update(extra or {})
    return env


def _ray_start(env: dict[str, str], args: list[str], *, timeout_s: float) -> int:
    """Run ``ray start ARGS`` in a new session; the daemons it leaves keep that process group."""
    proc = subprocess.Popen(
        [RAY, "start", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise ClusterError(f"ray start {' '.join(args)} did not return within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise ClusterError(f"ray start {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
    return proc.pid


def _node_args(num_cpus: int, resources: dict[str, float] | None) -> list[str]:
    args = [
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(200 * 1024 * 1024),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--disable-usage-stats",
    ]
    if resources:
        args += ["--resources", json.dumps(resources)]
    return args


@contextlib.contextmanager
def local_ray_cluster(
    *,
    head_cpus: int = 2,
    extra_nodes: Sequence[int] = (),
    node_resources: Sequence[dict[str, float] | None] | None = None,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 120.0,
) -> Iterator[LocalRayCluster]:
    """Start a head (``head_cpus`` CPUs) and one extra node per entry of ``extra_nodes`` (its CPUs).

    ``node_resources[i]``: custom resources of node ``i`` (0 = head), e.g. to pin work to a node.
    ``env``: extra variables for every process of the cluster. Everything is stopped on exit,
    also when start-up fails half-way.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live here
    full_env = cluster_env(temp_dir, extra=env)
    port, dashboard_port = free_port(), free_port()
    resources = list(node_resources or [])
    resources += [None] * (1 + len(extra_nodes) - len(resources))
    cluster = LocalRayCluster(
        temp_dir=temp_dir,
        gcs_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env=full_env,
    )
    try:
        head_args = [
            "--head",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(free_port()),
            "--temp-dir",
            str(temp_dir),
            *_node_args(head_cpus, resources[0]),
        ]
        cluster.session_pgids.append(_ray_start(full_env, head_args, timeout_s=start_timeout_s))
        cluster.node_cpus.append(head_cpus)
        for i, cpus in enumerate(extra_nodes, start=1):
            args = ["--address", cluster.gcs_address, *_node_args(cpus, resources[i])]
            cluster.session_pgids.append(_ray_start(full_env, args, timeout_s=start_timeout_s))
            cluster.node_cpus.append(cpus)
        cluster.wait_for_nodes(1 + len(extra_nodes), timeout_s=start_timeout_s)
        yield cluster
    finally:
        cluster.stop()
