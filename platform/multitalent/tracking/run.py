"""The MLflow run of a training job, as seen from rank 0: open or resume, log, end.

:class:`MlflowRun` wraps :class:`mlflow.tracking.MlflowClient` (imported lazily). Everything it
sends goes through an :class:`~multitalent.tracking.outbox.Outbox`, so no method raises and none
waits for a store that is down; the run itself is created (or resumed) on the first successful
contact.

With no tracking URI, the run lives in an embedded sqlite store ``<run_dir>/mlflow.db`` whose
experiment stores artifacts under ``<run_dir>/mlartifacts`` (set explicitly: a Ray worker's
current directory is a temporary copy). An HTTP server URI gets short client time-outs unless the
environment already sets them: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default here 0) and
``MLFLOW_HTTP_REQUEST_TIMEOUT`` (default here 10 s); MLflow's own defaults (7 retries, 120 s)
would stall training for minutes. ``run_id`` resumes an existing run; the caller stores
:attr:`MlflowRun.run_id` in its checkpoints so a restarted job logs into the same run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from multitalent.metric_names import metric_key
from multitalent.tracking.outbox import Dropped, FlushPolicy, Outbox, Send, WarningLimiter

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_PARAM_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
UNSENT_METRICS_FILE = "mlflow-unsent-metrics.jsonl"


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _local_store_dir(tracking_uri: str) -> Path | None:
    """``<folder of the sqlite file>/mlartifacts`` for a ``sqlite:///`` URI, else ``None``."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_VALUE_LENGTH]


class MlflowRun:
    """One MLflow run. Build with :meth:`start` (or :meth:`disabled`); call on rank 0 only.

    Every public method catches its exceptions and turns them into a
    :class:`~multitalent.tracking.outbox.TrackingWarning`.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_dir: Path,
        resume_run_id: str | None,
        artifact_location: str | None,
        tags: Mapping[str, str],
        policy: FlushPolicy,
        enabled: bool = True,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_dir = run_dir
        self.policy = policy
        self.enabled = enabled
        self.warnings = WarningLimiter(policy.warn_every_s)
        self.outbox = Outbox(policy=policy, connect=self._connect, warnings=self.warnings, store=tracking_uri)
        self._resume_run_id = resume_run_id
        self._artifact_location = artifact_location
        self._tags = dict(tags)
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._params: dict[str, str] = {}  # as the store holds them: parameters are immutable
        self._keys: dict[str, str] = {}  # metric name -> MLflow key, cached for the hot path
        self._ended = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        *,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        run_dir: Path,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        policy: FlushPolicy | None = None,
    ) -> Self:
        """Open (or, with ``run_id``, resume) a run. Never raises for an unreachable store: the
        run is then created on the first successful attempt and :attr:`run_id` stays ``None``
        until it is."""
        policy = policy or FlushPolicy()
        run_dir = Path(run_dir).resolve()
        artifact_location: str | None = None
        if tracking_uri is None:
            tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        if not _is_remote(tracking_uri):
            # A database URI without a server would put artifacts under ./mlruns of whatever
            # directory the process runs in: keep them beside the database (a store shared by the
            # runs of a storage path shares its artifact root).
            artifact_location = (_local_store_dir(tracking_uri) or run_dir / "mlartifacts").as_uri()
        else:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(policy.http_max_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(policy.http_timeout_s))
        run = cls(
            tracking_uri=tracking_uri,
            experiment=experiment,
            run_name=run_name,
            run_dir=run_dir,
            resume_run_id=run_id,
            artifact_location=artifact_location,
            tags={"multitalent.run_dir": str(run_dir), **(tags or {})},
            policy=policy,
        )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            run.warnings.warn("run_dir", f"cannot create run directory {run_dir}: {e}")
        run.flush()
        return run

    @classmethod
    def disabled(cls) -> Self:
        """A run whose every call is a no-op (dry runs, tracking switched off)."""
        return cls(
            tracking_uri="",
            experiment="",
            run_name="",
            run_dir=Path(),
            resume_run_id=None,
            artifact_location=None,
            tags={},
            policy=FlushPolicy(),
            enabled=False,
        )

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (persist it in checkpoints); ``None`` while the run is not created."""
        return self._run_id

    def end(self, status: str = "FINISHED") -> None:
        """Send everything (one last attempt) and close the run with ``status``.

        Metrics that still cannot be sent are written to ``<run_dir>/mlflow-unsent-metrics.jsonl``.
        """
        if not self.enabled or self._ended:
            return
        if status not in RUN_STATUSES:
            self.warnings.warn(
                "end:status", f"end: status {status!r} is not one of {RUN_STATUSES}; using FAILED"
            )
            status = "FAILED"
        self._ended = True
        try:
            sent = self.outbox.drain(force=True)
            if sent and self._client is not None and self._run_id is not None:
                self._client.set_terminated(self._run_id, status)
        except Exception as e:
            sent = False
            self.warnings.warn("end", f"could not close run {self._run_id}: {e}")
        if not sent:
            self.outbox.spill(self.run_dir / UNSENT_METRICS_FILE, run=f"run {self._run_id}")

    def _connect(self) -> tuple[MlflowClient, str]:
        """The client and the run id, creating or resuming the run on the first call that reaches
        the store."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        if self._run_id is not None:
            return client, self._run_id
        if self._resume_run_id is not None:
            run = self._find_run(client, self._resume_run_id)
            if run is not None:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                self._params = dict(run.data.params)
                self._run_id = run.info.run_id
                client.set_tag(self._run_id, "multitalent.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                return client, self._run_id
        experiment_id = self._experiment_id(client)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self._tags)
        self._run_id = run.info.run_id
        return client, self._run_id

    def _find_run(self, client: MlflowClient, run_id: str) -> Any:
        try:
            run = client.get_run(run_id)
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            self.warnings.warn(
                "resume", f"run {run_id} is not in {self.tracking_uri} (or deleted); starting a new run"
            )
            self._resume_run_id = None
            return None
        return run

    def _experiment_id(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment, artifact_location=self._artifact_location)
            except Exception as e:
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self.experiment)
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    # ------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        """False while the last attempt to reach the store failed."""
        return self.outbox.healthy

    @property
    def buffered_metrics(self) -> int:
        return self.outbox.buffered_metrics

    # ------------------------------------------------------------------ what MLflow stores
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer scalar metrics at ``step``; sent in batches every ``policy.interval_s``.

        Pass Python or numpy numbers: converting a CUDA tensor here would synchronise the device.
        """
        if not self.enabled or self._ended:
            return
        try:
            items: list[tuple[str, float]] = []
            for name, value in metrics.items():
                key = self._keys.get(name)
                if key is None:
                    key = self._keys[name] = metric_key(name)
                try:
                    items.append((key, float(value)))
                except (TypeError, ValueError):
                    self.warnings.warn(
                        f"value:{name}", f"metric {name!r} is not a number ({type(value).__name__}); skipped"
                    )
            self.outbox.add_metrics(items, int(step))
        except Exception as e:  # never let tracking stop training
            self.warnings.warn(f"log_metrics:{type(e).__name__}", f"log_metrics failed: {e}")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters (flat mapping; values JSON-encoded unless strings, cut at 6000 chars).

        A parameter already logged with the same value (a resumed run) is skipped; with a different
        value it is kept as first logged, with a warning (MLflow parameters are immutable).
        """
        if not self.enabled:
            return
        try:
            items = {metric_key(k): _param_value(v) for k, v in params.items()}
        except Exception as e:
            self.warnings.warn("log_params:bad", f"log_params: cannot encode parameters: {e}")
            return
        self._submit("log_params", lambda client, run_id: self._send_params(client, run_id, items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        items = {str(k): str(v) for k, v in tags.items()}

        def send(client: MlflowClient, run_id: str) -> None:
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items.items()])

        self._submit("set_tags", send)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact at ``artifact_file`` (a relative path inside the run's artifacts)."""
        if not self.enabled:
            return
        text = str(text)
        self._submit("log_text", lambda client, run_id: client.log_text(run_id, text, artifact_file))

    def log_bytes(self, data: bytes, artifact_file: str, *, kind: str = "log_bytes") -> None:
        """A binary artifact at ``artifact_file``, held in memory until sent."""
        if not self.enabled:
            return
        self._submit(kind, lambda client, run_id: _log_bytes(client, run_id, data, artifact_file))

    def log_artifact(self, local_path: Path | str, artifact_path: str | None = None) -> None:
        """A file or directory (e.g. a checkpoint) under ``artifact_path``.

        The upload runs now, synchronously; while the store is down the path is remembered (not
        copied) and uploaded later if it still exists.
        """
        if not self.enabled:
            return
        path = Path(local_path)
        if not path.exists():
            self.warnings.warn("log_artifact:missing", f"log_artifact: {path} does not exist")
            return

        def send(client: MlflowClient, run_id: str) -> None:
            if not path.exists():
                raise Dropped(f"{path} no longer exists")
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path)

        self._submit("log_artifact", send)

    def flush(self, *, force: bool = False) -> bool:
        """Send what is buffered now; ``force`` also ignores the outage back-off. True when
        nothing is left waiting."""
        if not self.enabled:
            return True
        try:
            return self.outbox.drain(force=force)
        except Exception as e:
            self.warnings.warn(f"flush:{type(e).__name__}", f"flush failed: {e}")
            return False

    # ------------------------------------------------------------------ machinery
    def _submit(self, kind: str, send: Send) -> None:
        try:
            self.outbox.submit(kind, send)
        except Exception as e:
            self.warnings.warn(f"{kind}:{type(e).__name__}", f"{kind} failed: {e}")

    def _send_params(self, client: MlflowClient, run_id: str, items: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for key, value in items.items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                self.warnings.warn(
                    f"param:{key}",
                    f"parameter {key!r} already logged as {old!r}; new value {value!r} ignored",
                )
        keys = list(new)
        for start in range(0, len(keys), _PARAM_BATCH):
            chunk = keys[start : start + _PARAM_BATCH]
            client.log_batch(run_id, params=[Param(k, new[k]) for k in chunk])
            self._params.update({k: new[k] for k in chunk})


def _log_bytes(client: MlflowClient, run_id: str, data: bytes, artifact_file: str) -> None:
    directory, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="multitalent-artifact-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        client.log_artifact(run_id, str(local), directory or None)
