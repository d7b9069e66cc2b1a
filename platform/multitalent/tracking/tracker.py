"""The MLflow run of a training job, as seen from rank 0.

:class:`Tracker` wraps :class:`mlflow.tracking.MlflowClient` (imported lazily) so that the training
loop can log without caring whether the tracking store is up:

* every public method catches its exceptions; a failure emits a :class:`TrackingWarning`, at most
  once per ``FlushPolicy.warn_every_s`` for each kind of failure, and never propagates;
* metrics are buffered in memory and sent in batches at most every ``FlushPolicy.interval_s``, so a
  call on the training hot path costs a dict walk and a deque append;
* while the store is unreachable, metrics (bounded deque, oldest dropped first) and other
  operations (bounded queue) wait, and are re-sent in order once a later attempt succeeds;
  attempts back off from ``retry_after_s`` to ``max_retry_after_s`` so an outage costs at most
  one HTTP timeout per back-off period;
* an HTTP server URI gets short client time-outs unless the environment already sets them:
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default here 0) and ``MLFLOW_HTTP_REQUEST_TIMEOUT``
  (default here 10 s); MLflow's own defaults (7 retries, 120 s) would stall training for minutes.

With no tracking URI, the run lives in an embedded sqlite store ``<run_dir>/mlflow.db`` whose
experiment stores artifacts under ``<run_dir>/mlartifacts`` (set explicitly: a Ray worker's
current directory is a temporary copy). ``run_id`` resumes an existing run; the caller stores
:attr:`Tracker.run_id` in its checkpoints so a restarted job logs into the same run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.metric_names import metric_key

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from multitalent.catalog import Catalog

_log = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_PARAM_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
# Error codes that mean "this request is wrong", not "the store is down": retrying cannot help.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "BAD_REQUEST",
        "INVALID_STATE",
        "MALFORMED_REQUEST",
    }
)
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingWarning(UserWarning):
    """Something could not be logged; training goes on."""


class _Dropped(Exception):
    """An operation that can never succeed (e.g. its file vanished): drop it, do not retry."""


@dataclass(frozen=True)
class FlushPolicy:
    """How the tracker trades freshness for hot-path cost and outage tolerance."""

    interval_s: float = 10.0  # buffered metrics are sent at most this often (end/flush send at once)
    retry_after_s: float = 30.0  # first retry after a failure; doubles up to max_retry_after_s
    max_retry_after_s: float = 300.0
    max_buffered_metrics: int = 200_000  # oldest dropped first when an outage outlasts this
    max_pending_ops: int = 512  # params/artifacts waiting for the store
    warn_every_s: float = 300.0  # one warning per failure kind per this period
    http_timeout_s: int = 10  # MLFLOW_HTTP_REQUEST_TIMEOUT unless already set
    http_max_retries: int = 0  # MLFLOW_HTTP_REQUEST_MAX_RETRIES unless already set


@dataclass
class _Op:
    kind: str
    fn: Callable[[MlflowClient, str], None]


def _is_permanent(error: BaseException) -> bool:
    """Whether retrying ``error`` is pointless (bad request or bad data) rather than an outage."""
    if isinstance(error, (_Dropped, TypeError, ValueError)):
        return True
    return getattr(error, "error_code", None) in _PERMANENT_CODES


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists stay values (JSON-encoded when logged)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_VALUE_LENGTH]


class Tracker:
    """One MLflow run. Build with :meth:`start` (or :meth:`disabled`); call on rank 0 only."""

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
        self._resume_run_id = resume_run_id
        self._artifact_location = artifact_location
        self._tags = dict(tags)
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._params: dict[str, str] = {}
        self._metrics: deque[tuple[str, float, int, int]] = deque(maxlen=policy.max_buffered_metrics)
        self._ops: deque[_Op] = deque()
        self._keys: dict[str, str] = {}
        self._last_flush = time.monotonic()
        self._down_since: float | None = None
        self._retry_delay = policy.retry_after_s
        self._next_try = 0.0
        self._warned: dict[str, tuple[float, int]] = {}
        self._dropped_metrics = 0
        self._ended = False

    # ------------------------------------------------------------------ construction
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
    ) -> Tracker:
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
            # directory the process runs in.
            artifact_location = (run_dir / "mlartifacts").as_uri()
        else:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(policy.http_max_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(policy.http_timeout_s))
        tracker = cls(
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
            tracker._warn("run_dir", f"cannot create run directory {run_dir}: {e}")
        tracker.flush()
        return tracker

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker whose every call is a no-op (dry runs, tracking switched off)."""
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

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end(
            "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        )

    # ------------------------------------------------------------------ state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id (persist it in checkpoints); ``None`` while the run is not created."""
        return self._run_id

    @property
    def healthy(self) -> bool:
        """False while the last attempt to reach the store failed."""
        return self._down_since is None

    @property
    def buffered_metrics(self) -> int:
        return len(self._metrics)

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer scalar metrics at ``step``; sent in batches every ``policy.interval_s``.

        Pass Python or numpy numbers: converting a CUDA tensor here would synchronise the device.
        """
        if not self.enabled or self._ended:
            return
        try:
            now_ms = int(time.time() * 1000)
            for name, value in metrics.items():
                key = self._keys.get(name)
                if key is None:
                    key = self._keys[name] = metric_key(name)
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    self._warn(
                        f"value:{name}", f"metric {name!r} is not a number ({type(value).__name__}); skipped"
                    )
                    continue
                if len(self._metrics) == self._metrics.maxlen:
                    self._dropped_metrics += 1
                    self._warn("buffer_full", f"metric buffer full ({self._metrics.maxlen}); dropping oldest")
                self._metrics.append((key, number, now_ms, int(step)))
            if time.monotonic() - self._last_flush >= self.policy.interval_s:
                self._drain()
        except Exception as e:  # never let tracking stop training
            self._warn(f"log_metrics:{type(e).__name__}", f"log_metrics failed: {e}")

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
            self._warn("log_params:bad", f"log_params: cannot encode parameters: {e}")
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

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON (or, for ``.yaml``/``.yml``, YAML) artifact; serialised now, so later changes to
        ``data`` do not leak in."""
        if not self.enabled:
            return
        try:
            if artifact_file.endswith((".yaml", ".yml")):
                import yaml

                text = yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)
            else:
                text = json.dumps(data, indent=2, default=str)
        except Exception as e:
            self._warn("log_dict:bad", f"log_dict({artifact_file}): cannot serialise: {e}")
            return
        self.log_text(text, artifact_file)

    def log_job(self, resolved_yaml: str) -> None:
        """The resolved job file as artifact ``job.yaml``, and its leaves as ``job.*`` parameters."""
        if not self.enabled:
            return
        self.log_text(resolved_yaml, "job.yaml")
        try:
            import yaml

            job = yaml.safe_load(resolved_yaml)
        except Exception as e:
            self._warn("log_job:parse", f"log_job: job YAML does not parse, logged as text only: {e}")
            return
        if isinstance(job, Mapping):
            self.log_params(_flatten(job, "job."))

    def log_label_space(self, catalog: Catalog) -> None:
        """``label_space.json`` (``catalog.to_dict()``) and the catalog's name, hash and size."""
        if not self.enabled:
            return
        try:
            data = catalog.to_dict()
            params = {
                "catalog.name": catalog.name,
                "catalog.hash": catalog.hash,
                "catalog.num_classes": catalog.num_classes,
                "catalog.num_datasets": len(catalog.datasets),
            }
        except Exception as e:
            self._warn("log_label_space", f"log_label_space: {e}")
            return
        self.log_dict(data, "label_space.json")
        self.log_params(params)

    def log_plan(self, path: Path | str) -> None:
        """The preprocessing plan file as an artifact, and its settings as ``plan.*`` parameters
        (the catalog part is left to :meth:`log_label_space`)."""
        if not self.enabled:
            return
        path = Path(path)
        self.log_artifact(path)
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            self._warn("log_plan:read", f"log_plan: {path}: {e}")
            return
        if isinstance(plan, Mapping):
            self.log_params(_flatten({k: v for k, v in plan.items() if k != "catalog"}, "plan."))

    def log_artifact(self, local_path: Path | str, artifact_path: str | None = None) -> None:
        """A file or directory (e.g. a checkpoint) under ``artifact_path``.

        The upload runs now, synchronously; while the store is down the path is remembered (not
        copied) and uploaded later if it still exists.
        """
        if not self.enabled:
            return
        path = Path(local_path)
        if not path.exists():
            self._warn("log_artifact:missing", f"log_artifact: {path} does not exist")
            return

        def send(client: MlflowClient, run_id: str) -> None:
            if not path.exists():
                raise _Dropped(f"{path} no longer exists")
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path)

        self._submit("log_artifact", send)

    def log_image(self, image: Image.Image | Path | str, artifact_file: str) -> None:
        """A PIL image (encoded as PNG now) or an image file, stored at ``artifact_file``."""
        if not self.enabled:
            return
        try:
            if isinstance(image, str | Path):
                data = Path(image).read_bytes()
            else:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
        except Exception as e:
            self._warn("log_image:bad", f"log_image({artifact_file}): {e}")
            return
        self._submit("log_image", lambda client, run_id: _log_bytes(client, run_id, data, artifact_file))

    def log_figure_curves(self, history: Mapping[str, Any], artifact_file: str = "curves/curves.png") -> None:
        """Loss and Dice curves (``history``: name -> [(step, value), ...]) as a PNG."""
        if not self.enabled:
            return
        try:
            from multitalent.tracking.pictures import curves_png

            picture = curves_png(history)
        except Exception as e:
            self._warn("curves", f"log_figure_curves: {e}")
            return
        self.log_image(picture, artifact_file)

    def flush(self, *, force: bool = False) -> bool:
        """Send what is buffered now; ``force`` also ignores the outage back-off. True when
        nothing is left waiting."""
        if not self.enabled:
            return True
        try:
            return self._drain(force=force)
        except Exception as e:
            self._warn(f"flush:{type(e).__name__}", f"flush failed: {e}")
            return False

    def end(self, status: str = "FINISHED") -> None:
        """Send everything (one last attempt) and close the run with ``status``.

        Metrics that still cannot be sent are written to ``<run_dir>/mlflow-unsent-metrics.jsonl``.
        """
        if not self.enabled or self._ended:
            return
        if status not in RUN_STATUSES:
            self._warn("end:status", f"end: status {status!r} is not one of {RUN_STATUSES}; using FAILED")
            status = "FAILED"
        self._ended = True
        try:
            sent = self._drain(force=True)
            if sent and self._client is not None and self._run_id is not None:
                self._client.set_terminated(self._run_id, status)
        except Exception as e:
            sent = False
            self._warn("end", f"could not close run {self._run_id}: {e}")
        if not sent:
            self._spill()

    # ------------------------------------------------------------------ machinery
    def _submit(self, kind: str, fn: Callable[[MlflowClient, str], None]) -> None:
        try:
            if len(self._ops) >= self.policy.max_pending_ops:
                dropped = self._ops.popleft()
                self._warn("ops_full", f"pending-operation queue full; dropped a {dropped.kind}")
            self._ops.append(_Op(kind, fn))
            self._drain()
        except Exception as e:
            self._warn(f"{kind}:{type(e).__name__}", f"{kind} failed: {e}")

    def _drain(self, *, force: bool = False) -> bool:
        """Pending operations in order, then buffered metrics. True when all were sent."""
        now = time.monotonic()
        if self._down_since is not None and now < self._next_try and not force:
            return False
        self._last_flush = now
        try:
            client, run_id = self._ensure_run()
            while self._ops:
                op = self._ops[0]
                try:
                    op.fn(client, run_id)
                except Exception as e:
                    if not _is_permanent(e):
                        raise
                    self._warn(f"{op.kind}:rejected", f"{op.kind} rejected by the store, dropped: {e}")
                self._ops.popleft()
            while self._metrics:
                self._send_metrics(client, run_id)
        except Exception as e:
            self._mark_down(e)
            return False
        self._mark_up()
        return True

    def _send_metrics(self, client: MlflowClient, run_id: str) -> None:
        from mlflow.entities import Metric

        n = min(_BATCH, len(self._metrics))
        batch = [
            Metric(key, value, ts, step) for key, value, ts, step in (self._metrics[i] for i in range(n))
        ]
        try:
            client.log_batch(run_id, metrics=batch)
        except Exception as e:
            if not _is_permanent(e):
                raise
            self._warn("log_metrics:rejected", f"{n} metrics rejected by the store, dropped: {e}")
        for _ in range(n):
            self._metrics.popleft()

    def _send_params(self, client: MlflowClient, run_id: str, items: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for key, value in items.items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                self._warn(
                    f"param:{key}",
                    f"parameter {key!r} already logged as {old!r}; new value {value!r} ignored",
                )
        keys = list(new)
        for start in range(0, len(keys), _PARAM_BATCH):
            chunk = keys[start : start + _PARAM_BATCH]
            client.log_batch(run_id, params=[Param(k, new[k]) for k in chunk])
            self._params.update({k: new[k] for k in chunk})

    def _ensure_run(self) -> tuple[MlflowClient, str]:
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
            self._warn(
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

    def _mark_down(self, error: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._retry_delay = self.policy.retry_after_s
        else:
            self._retry_delay = min(2 * self._retry_delay, self.policy.max_retry_after_s)
        self._next_try = now + self._retry_delay
        self._warn(
            f"outage:{type(error).__name__}",
            f"tracking store {self.tracking_uri} unreachable ({type(error).__name__}: {str(error)[:300]}); "
            f"buffering {len(self._metrics)} metrics and {len(self._ops)} operations, "
            f"next try in {self._retry_delay:.0f} s",
        )

    def _mark_up(self) -> None:
        if self._down_since is not None:
            _log.warning(
                "tracking store %s reachable again after %.0f s; buffered data sent",
                self.tracking_uri,
                time.monotonic() - self._down_since,
            )
            # A later outage is news again: warn about it at once.
            self._warned = {k: v for k, v in self._warned.items() if not k.startswith("outage:")}
        self._down_since = None
        self._retry_delay = self.policy.retry_after_s

    def _warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        last, suppressed = self._warned.get(kind, (float("-inf"), 0))
        if now - last < self.policy.warn_every_s:
            self._warned[kind] = (last, suppressed + 1)
            return
        note = f" ({suppressed} similar suppressed)" if suppressed else ""
        warnings.warn(f"tracking: {message}{note}", TrackingWarning, stacklevel=3)
        self._warned[kind] = (now, 0)

    def _spill(self) -> None:
        if not self._metrics and not self._ops:
            return
        path = self.run_dir / "mlflow-unsent-metrics.jsonl"
        try:
            with path.open("a") as f:
                for key, value, ts, step in self._metrics:
                    f.write(json.dumps({"key": key, "value": value, "timestamp": ts, "step": step}) + "\n")
            self._warn(
                "spill",
                f"run {self._run_id}: {len(self._metrics)} metrics written to {path} and "
                f"{len(self._ops)} operations (params/artifacts) lost: the store stayed unreachable",
            )
        except OSError as e:
            self._warn("spill", f"lost {len(self._metrics)} metrics and {len(self._ops)} operations: {e}")
        self._metrics.clear()
        self._ops.clear()


def _log_bytes(client: MlflowClient, run_id: str, data: bytes, artifact_file: str) -> None:
    directory, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="multitalent-artifact-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        client.log_artifact(run_id, str(local), directory or None)
