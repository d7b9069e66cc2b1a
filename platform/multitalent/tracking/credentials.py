"""An MLflow server refusing the client's credentials (basic auth: HTTP 401 or 403), told from an outage.

MLflow's client sends the user and password of ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
(or ``~/.mlflow/credentials``) with every request, and only when both are set. A refusal is a setting to
fix, not a store that will come back: callers say so in one line, naming the user but never the password.
"""

from __future__ import annotations

_SETTINGS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a failed MLflow REST call (``MlflowException``) or artifact transfer
    (``requests.HTTPError``); ``None`` for anything else."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    if hasattr(error, "get_http_status_code") and getattr(error, "error_code", None) in (
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
        "PERMISSION_DENIED",
    ):
        return int(error.get_http_status_code())
    return None


def refused_credentials(error: BaseException) -> str | None:
    """Why the server refused the request, when ``error`` is a 401 or 403 (a clause naming the user and
    the settings to fix); ``None`` for any other error."""
    status = http_status(error)
    if status not in (401, 403):
        return None
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if status == 403:
        return f"permission denied (HTTP 403) for user {creds.username!r}: ask the server's admin for access"
    if not creds.username and not creds.password:
        return f"not authenticated (HTTP 401): no credentials were sent; set {_SETTINGS}"
    if not creds.username or not creds.password:
        missing = "MLFLOW_TRACKING_PASSWORD" if creds.username else "MLFLOW_TRACKING_USERNAME"
        return f"not authenticated (HTTP 401): {missing} is not set, so no credentials were sent"
    return f"not authenticated (HTTP 401): the server refused user {creds.username!r}; check {_SETTINGS}"


class CredentialsRefused(ValueError):
    """The tracking server refuses this process's credentials: a setting to fix, not an outage."""


def check_credentials(tracking_uri: str, *, timeout_s: int = 10) -> None:
    """Ask an HTTP(S) tracking server one cheap authenticated question before work starts.

    A training run tolerates a store that is down (it buffers, see :mod:`multitalent.tracking.outbox`),
    so an unreachable server is not an error here; credentials the server refuses would lose the whole
    run's tracking, so they are. Other URIs (sqlite, a database) are not checked.

    Raises:
        CredentialsRefused: the server answered 401 or 403 (one line: the URI, the user, what to set).
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except Exception as e:
        reason = refused_credentials(e)
        if reason:
            raise CredentialsRefused(f"MLflow server {tracking_uri} refused the request: {reason}") from None
