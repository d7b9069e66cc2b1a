"""What waits for the tracking store: buffered metrics and pending operations, back-off, spill.

The training loop must not notice whether the MLflow store is up:

* metrics are buffered in memory and sent in batches at most every ``FlushPolicy.interval_s``, so a
  call on the training hot path costs a deque append;
* while the store is unreachable, metrics (bounded deque, oldest dropped first) and other
  operations (bounded queue) wait, and are re-sent in order once a later attempt succeeds;
  attempts back off from ``retry_after_s`` to ``max_retry_after_s`` so an outage costs at most
  one HTTP timeout per back-off period;
* an operation the store rejects (a bad request, not an outage) is dropped with a warning;
* what is still waiting when the run ends is spilled: metrics to a JSON-lines file, with a warning.

Failures become :class:`TrackingWarning` s, at most one per kind of failure and
``FlushPolicy.warn_every_s``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)

_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
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

Send = Callable[["MlflowClient", str], None]
"""An operation on the store: called with the client and the run id once both are available."""


class TrackingWarning(UserWarning):
    """Something could not be logged; training goes on."""


class Dropped(Exception):
    """An operation that can never succeed (e.g. its file vanished): drop it, do not retry."""


@dataclass(frozen=True)
class FlushPolicy:
    """How tracking trades freshness for hot-path cost and outage tolerance."""

    interval_s: float = 10.0  # buffered metrics are sent at most this often (end/flush send at once)
    retry_after_s: float = 30.0  # first retry after a failure; doubles up to max_retry_after_s
    max_retry_after_s: float = 300.0
    max_buffered_metrics: int = 200_000  # oldest dropped first when an outage outlasts this
    max_pending_ops: int = 512  # params/artifacts waiting for the store
    warn_every_s: float = 300.0  # one warning per failure kind per this period
    http_timeout_s: int = 10  # MLFLOW_HTTP_REQUEST_TIMEOUT unless already set
    http_max_retries: int = 0  # MLFLOW_HTTP_REQUEST_MAX_RETRIES unless already set


class WarningLimiter:
    """Emits a :class:`TrackingWarning` per kind at most once per ``every_s``, counting the rest."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (time of last warning, suppressed since)

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(kind, (float("-inf"), 0))
        if now - last < self.every_s:
            self._last[kind] = (last, suppressed + 1)
            return
        note = f" ({suppressed} similar suppressed)" if suppressed else ""
        warnings.warn(f"tracking: {message}{note}", TrackingWarning, stacklevel=3)
        self._last[kind] = (now, 0)

    def forget(self, prefix: str) -> None:
        """Warn about kinds starting with ``prefix`` at once next time."""
        self._last = {k: v for k, v in self._last.items() if not k.startswith(prefix)}


def is_permanent(error: BaseException) -> bool:
    """Whether retrying ``error`` is pointless (bad request or bad data) rather than an outage."""
    if isinstance(error, (Dropped, TypeError, ValueError)):
        return True
    return getattr(error, "error_code", None) in _PERMANENT_CODES


@dataclass
class _Op:
    kind: str
    send: Send


class Outbox:
    """Metrics and operations on their way to one run of a store that may be unreachable.

    ``connect`` returns ``(client, run_id)``, creating the run if needed; it is called at each
    attempt, and an exception from it (or from a send) that is not :func:`is_permanent` counts as
    an outage. Nothing here raises to the caller except :meth:`drain` (which the owner wraps).
    """

    def __init__(
        self,
        *,
        policy: FlushPolicy,
        connect: Callable[[], tuple[MlflowClient, str]],
        warnings: WarningLimiter,
        store: str,
    ) -> None:
        self.policy = policy
        self.store = store  # for messages
        self._connect = connect
        self._warnings = warnings
        self._metrics: deque[tuple[str, float, int, int]] = deque(maxlen=policy.max_buffered_metrics)
        self._ops: deque[_Op] = deque()
        self._last_flush = time.monotonic()
        self._down_since: float | None = None
        self._retry_delay = policy.retry_after_s
        self._next_try = 0.0
        self.dropped_metrics = 0

    @property
    def healthy(self) -> bool:
        """False while the last attempt to reach the store failed."""
        return self._down_since is None

    @property
    def buffered_metrics(self) -> int:
        return len(self._metrics)

    @property
    def pending_ops(self) -> int:
        return len(self._ops)

    def add_metrics(self, metrics: Iterable[tuple[str, float]], step: int) -> None:
        """Buffer ``(key, value)`` pairs at ``step`` (keys already MLflow-safe); send them when
        ``policy.interval_s`` has passed since the last attempt."""
        now_ms = int(time.time() * 1000)
        for key, value in metrics:
            if len(self._metrics) == self._metrics.maxlen:
                self.dropped_metrics += 1
                self._warnings.warn(
                    "buffer_full", f"metric buffer full ({self._metrics.maxlen}); dropping oldest"
                )
            self._metrics.append((key, value, now_ms, step))
        if time.monotonic() - self._last_flush >= self.policy.interval_s:
            self.drain()

    def submit(self, kind: str, send: Send) -> None:
        """Queue an operation behind the pending ones and try to send them now."""
        if len(self._ops) >= self.policy.max_pending_ops:
            dropped = self._ops.popleft()
            self._warnings.warn("ops_full", f"pending-operation queue full; dropped a {dropped.kind}")
        self._ops.append(_Op(kind, send))
        self.drain()

    def drain(self, *, force: bool = False) -> bool:
        """Pending operations in order, then buffered metrics; ``force`` ignores the back-off.
        True when everything was sent."""
        now = time.monotonic()
        if self._down_since is not None and now < self._next_try and not force:
            return False
        self._last_flush = now
        try:
            client, run_id = self._connect()
            while self._ops:
                op = self._ops[0]
                try:
                    op.send(client, run_id)
                except Exception as e:
                    if not is_permanent(e):
                        raise
                    self._warnings.warn(
                        f"{op.kind}:rejected", f"{op.kind} rejected by the store, dropped: {e}"
                    )
                self._ops.popleft()
            while self._metrics:
                self._send_metrics(client, run_id)
        except Exception as e:
            self._mark_down(e)
            return False
        self._mark_up()
        return True

    def spill(self, path: Path, *, run: str) -> None:
        """Write the waiting metrics to ``path`` (JSON lines, appended) and forget everything waiting."""
        if not self._metrics and not self._ops:
            return
        try:
            with path.open("a") as f:
                for key, value, ts, step in self._metrics:
                    f.write(json.dumps({"key": key, "value": value, "timestamp": ts, "step": step}) + "\n")
            self._warnings.warn(
                "spill",
                f"{run}: {len(self._metrics)} metrics written to {path} and "
                f"{len(self._ops)} operations (params/artifacts) lost: the store stayed unreachable",
            )
        except OSError as e:
            self._warnings.warn(
                "spill", f"lost {len(self._metrics)} metrics and {len(self._ops)} operations: {e}"
            )
        self._metrics.clear()
        self._ops.clear()

    def _send_metrics(self, client: MlflowClient, run_id: str) -> None:
        from mlflow.entities import Metric

        n = min(_BATCH, len(self._metrics))
        batch = [Metric(key, value, ts, step) for key, value, ts, step in islice(self._metrics, n)]
        try:
            client.log_batch(run_id, metrics=batch)
        except Exception as e:
            if not is_permanent(e):
                raise
            self._warnings.warn("log_metrics:rejected", f"{n} metrics rejected by the store, dropped: {e}")
        for _ in range(n):
            self._metrics.popleft()

    def _mark_down(self, error: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._retry_delay = self.policy.retry_after_s
        else:
            self._retry_delay = min(2 * self._retry_delay, self.policy.max_retry_after_s)
        self._next_try = now + self._retry_delay
        from multitalent.tracking.credentials import refused_credentials

        refused = refused_credentials(error)
        problem = (
            f"refused the request: {refused}"
            if refused
            else f"unreachable ({type(error).__name__}: {str(error)[:300]})"
        )
        self._warnings.warn(
            f"outage:{type(error).__name__}",
            f"tracking store {self.store} {problem}; "
            f"buffering {len(self._metrics)} metrics and {len(self._ops)} operations, "
            f"next try in {self._retry_delay:.0f} s",
        )

    def _mark_up(self) -> None:
        if self._down_since is not None:
            _log.warning(
                "tracking store %s reachable again after %.0f s; buffered data sent",
                self.store,
                time.monotonic() - self._down_since,
            )
            self._warnings.forget("outage:")  # a later outage is news again: warn about it at once
        self._down_since = None
        self._retry_delay = self.policy.retry_after_s
