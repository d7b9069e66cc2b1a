"""Tracker on a real sqlite store and a real MLflow server that goes down; overlay and curve PNGs.

The outage test serves MLflow's own server app (``mlflow.server.fastapi_app``, what ``mlflow
server`` runs under uvicorn) from a thread of the test process, because starting ``mlflow server``
as a subprocess took 15-52 s (depending on load) on the shared 2-core test machine. Stopping it
closes the socket, so the client sees the same connection-refused outage as a dead server.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multitalent.catalog import load_preset
from multitalent.metric_names import metric_key
from multitalent.overlay import FILL_ALPHA, PALETTE
from multitalent.preprocess.plan import Plan
from multitalent.tracking import FlushPolicy, Tracker, TrackingWarning, curves_png, overlay_png
from multitalent.tracking.pictures import GAP_PX, LEGEND_COL_PX, LEGEND_ROW_PX, TITLE_PX

JOB_YAML = """\
name: smoke
train:
  epochs: 2
  lr: 0.01
  datasets: ["01", "07"]
"""
EAGER = FlushPolicy(interval_s=0.0)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store. Creating one runs MLflow's schema migrations (~3-11 s here),
    so tests copy this file instead of migrating a store each."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def run_dir(tmp_path: Path, migrated_db: Path) -> Path:
    """A run directory whose embedded store ``mlflow.db`` already has MLflow's schema."""
    path = tmp_path / "run"
    path.mkdir()
    shutil.copy(migrated_db, path / "mlflow.db")
    return path


def _client(run_dir: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")


def _artifacts(client: Any, run_id: str | None, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _history(client: Any, run_id: str | None, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- names
def test_metric_key_passes_mlflow_validation() -> None:
    from mlflow.utils.validation import _validate_metric_name

    names = ["val/dice/07/portal and splenic vein", "07:liver", "/a//b/./../c/", "ü ber", "x" * 400, ""]
    for name in names:
        key = metric_key(name)
        _validate_metric_name(key)  # raises on a bad name
        assert len(key) <= 250 and posixpath.normpath(key) == key
    assert metric_key("val/dice/07/portal and splenic vein") == "val/dice/07/portal_and_splenic_vein"


# --------------------------------------------------------------------------- sqlite store
def test_sqlite_run_logs_everything(tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as in a Ray worker: the current directory is not the run's
    catalog = load_preset("multitalent13")
    plan = Plan.for_catalog(catalog, target_spacing_zyx_mm=(3.0, 1.5, 1.5))

    tracker = Tracker.start(tracking_uri=None, experiment="exp", run_name="r1", run_dir=run_dir, policy=EAGER)
    assert tracker.run_id is not None
    tracker.log_job(JOB_YAML)
    tracker.log_label_space(catalog)
    tracker.log_plan(plan)
    tracker.log_params({"world_size": 2, "zero stage": 1})
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.01 * (1 - step / 5)}, step=step)
    tracker.log_metrics({"val/dice/07/left kidney": np.float32(0.5)}, step=4)
    tracker.log_image(_overlay(), "overlays/07.png")
    tracker.log_figure_curves({"train/loss": [(s, 1.0 / (s + 1)) for s in range(5)]})
    tracker.log_dict({"epoch": 1}, "state/epoch.json")
    tracker.end()

    client = _client(run_dir)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.info.artifact_uri.startswith((run_dir.resolve() / "mlartifacts").as_uri())
    params = run.data.params
    assert params["job.train.epochs"] == "2" and params["job.train.datasets"] == '["01", "07"]'
    assert params["catalog.hash"] == catalog.hash and params["catalog.num_classes"] == "47"
    assert params["plan.target_spacing_zyx_mm"] == "[3.0, 1.5, 1.5]" and "plan.catalog.name" not in params
    assert params["plan.normalization.scheme"] == "ct"
    assert params["zero_stage"] == "1"
    loss = _history(client, tracker.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(5))
    assert [v for _, v in loss] == pytest.approx([1.0 / (s + 1) for s in range(5)])
    assert _history(client, tracker.run_id, "val/dice/07/left_kidney") == [(4, 0.5)]
    artifacts = _artifacts(client, tracker.run_id)
    assert {"job.yaml", "label_space.json", "plan.json", "overlays/07.png", "curves/curves.png"} <= artifacts
    local = Path(client.download_artifacts(tracker.run_id, "job.yaml", str(tmp_path)))
    assert local.read_text() == JOB_YAML
    label_space = json.loads(
        Path(client.download_artifacts(tracker.run_id, "label_space.json", str(tmp_path))).read_text()
    )
    assert label_space["hash"] == catalog.hash
    logged_plan = Path(client.download_artifacts(tracker.run_id, "plan.json", str(tmp_path))).read_text()
    assert Plan.from_json(logged_plan) == plan
    assert not (elsewhere / "mlruns").exists() and not (elsewhere / "mlflow.db").exists()


def test_resume_by_run_id_appends_to_the_same_run(run_dir: Path) -> None:
    first = Tracker.start(tracking_uri=None, experiment="exp", run_name="r", run_dir=run_dir, policy=EAGER)
    first.log_job(JOB_YAML)
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.end("KILLED")  # the job died; the checkpoint kept first.run_id

    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # same job, same params: no conflict
        second = Tracker.start(
            tracking_uri=None,
            experiment="exp",
            run_name="r",
            run_dir=run_dir,
            run_id=first.run_id,
            policy=EAGER,
        )
        second.log_job(JOB_YAML)
    assert second.run_id == first.run_id
    client = _client(run_dir)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in range(3, 5):
        second.log_metrics({"train/loss": float(step)}, step=step)
    with pytest.warns(TrackingWarning, match="already logged"):
        second.log_params({"job.train.epochs": 3})
    second.end()

    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    assert _history(client, first.run_id, "train/loss") == [(s, float(s)) for s in range(5)]
    assert runs[0].data.params["job.train.epochs"] == "2"


def test_unknown_run_id_starts_a_new_run(run_dir: Path) -> None:
    with pytest.warns(TrackingWarning, match="starting a new run"):
        tracker = Tracker.start(
            tracking_uri=None, experiment="exp", run_name="r", run_dir=run_dir, run_id="0" * 32, policy=EAGER
        )
    assert tracker.run_id is not None and tracker.run_id != "0" * 32
    tracker.end()


def test_metrics_are_batched_until_interval_or_flush(run_dir: Path) -> None:
    tracker = Tracker.start(
        tracking_uri=None,
        experiment="exp",
        run_name="r",
        run_dir=run_dir,
        policy=FlushPolicy(interval_s=3600),
    )
    for step in range(10):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    client = _client(run_dir)
    assert tracker.buffered_metrics == 10
    assert _history(client, tracker.run_id, "train/loss") == []
    assert tracker.flush()
    assert tracker.buffered_metrics == 0
    assert len(_history(client, tracker.run_id, "train/loss")) == 10
    tracker.end()


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = Tracker.disabled()
    tracker.log_metrics({"x": 1.0}, step=0)
    tracker.log_job(JOB_YAML)
    tracker.end()
    assert tracker.run_id is None and tracker.buffered_metrics == 0


# --------------------------------------------------------------------------- outage
class _Server:
    """MLflow's tracking server app under uvicorn in a thread; start/stop on a fixed port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import uvicorn
        from mlflow.server.fastapi_app import app

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")
def test_outage_warns_buffers_and_recovers(
    tmp_path: Path, migrated_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    shutil.copy(migrated_db, tmp_path / "server.db")
    monkeypatch.setenv("_MLFLOW_SERVER_FILE_STORE", f"sqlite:///{tmp_path / 'server.db'}")
    monkeypatch.setenv("_MLFLOW_SERVER_SERVE_ARTIFACTS", "true")
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_DESTINATION", str(tmp_path / "server-artifacts"))
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", "mlflow-artifacts:/")
    server = _Server(_free_port())
    uri = f"http://127.0.0.1:{server.port}"
    # No back-off, so every call retries at once and the test needs no sleeping.
    policy = FlushPolicy(interval_s=0.0, retry_after_s=0.0, max_retry_after_s=0.0)

    # 1. The server is down when training starts: no run yet, nothing raised, metrics buffered.
    with pytest.warns(TrackingWarning, match="unreachable"):
        tracker = Tracker.start(
            tracking_uri=uri, experiment="exp", run_name="r", run_dir=tmp_path / "run", policy=policy
        )
    assert tracker.run_id is None and not tracker.healthy
    tracker.log_job(JOB_YAML)
    tracker.log_metrics({"train/loss": 0.0}, step=0)

    # 2. It comes up: the run is created and the backlog sent in order.
    server.start()
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert tracker.healthy and tracker.run_id is not None and tracker.buffered_metrics == 0

    # 3. It dies mid-training: calls keep returning, warn (rate-limited), and buffer.
    server.stop()
    with pytest.warns(TrackingWarning) as caught:
        for step in range(2, 6):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        tracker.log_text("logged during the outage", "notes/outage.txt")
        assert not tracker.flush()
    assert len(caught) == 1  # one warning per failure kind and period, not one per call
    assert not tracker.healthy and tracker.buffered_metrics == 4

    # 4. It comes back on the same store: everything buffered arrives.
    server.start()
    try:
        assert tracker.flush()
        tracker.end()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        assert _history(client, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(6)]
        assert {"job.yaml", "notes/outage.txt"} <= _artifacts(client, tracker.run_id)
        assert client.get_run(tracker.run_id).data.params["job.name"] == "smoke"
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        server.stop()


def test_end_during_outage_spills_metrics_to_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.warns(TrackingWarning):
        tracker = Tracker.start(
            tracking_uri=uri, experiment="exp", run_name="r", run_dir=tmp_path, policy=EAGER
        )
        for step in range(3):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        tracker.end()
    lines = (tmp_path / "mlflow-unsent-metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


# --------------------------------------------------------------------------- pictures
def _masks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image_zyx = np.full((6, 16, 16), -100.0, dtype=np.float32)  # constant: renders black
    target = np.zeros((2, 6, 16, 16), dtype=bool)
    target[0, 2, 4:9, 4:9] = True
    target[1, 2, 11:14, 11:14] = True
    target[1, 4, 1:3, 1:3] = True
    pred = np.zeros_like(target)
    pred[0, 2, 5:10, 5:10] = True  # shifted by one voxel
    return image_zyx, pred, target


def _overlay() -> Any:
    image_zyx, pred, target = _masks()
    return overlay_png(image_zyx, pred, target, ["liver", "liver tumour"], slices=1, panel_px=64)


def test_overlay_colours_where_the_masks_are() -> None:
    picture = _overlay()
    scale = 64 // 16
    legend_rows = 2 + 1  # two classes present, one explanation line
    assert picture.mode == "RGB"
    assert picture.size == (
        max(16 * scale, LEGEND_COL_PX),
        TITLE_PX + 16 * scale + GAP_PX + legend_rows * LEGEND_ROW_PX + GAP_PX,
    )
    rgb = np.asarray(picture)

    def pixel(y: int, x: int, dy: int = scale // 2, dx: int = scale // 2) -> tuple[int, ...]:
        return tuple(int(v) for v in rgb[TITLE_PX + y * scale + dy, x * scale + dx])

    def fill(k: int) -> tuple[int, ...]:
        return tuple(round(FILL_ALPHA * c) for c in PALETTE[k])

    assert pixel(1, 1) == (0, 0, 0)  # background (z=2 was picked: most ground truth)
    assert pixel(6, 6) == pytest.approx(fill(0), abs=1)  # ground truth of class 0, inside the prediction
    assert pixel(12, 12) == pytest.approx(fill(1), abs=1)  # ground truth of class 1
    assert pixel(5, 7, dy=0) == PALETTE[0]  # top edge of the class-0 prediction: outline
    assert pixel(9, 9, dy=scale - 1) == PALETTE[0]  # bottom edge of the prediction


def test_overlay_picks_spread_slices_and_checks_shapes() -> None:
    from multitalent.tracking.pictures import pick_slices

    image_zyx, pred, target = _masks()
    assert pick_slices(target, pred, 2) == [2, 4]
    assert pick_slices(np.zeros_like(target), np.zeros_like(pred), 2) == [
        2,
        3,
    ]  # even spread: nothing to show
    picture = overlay_png(image_zyx, pred, target, ["a", "b"], slices=3, panel_px=32)
    assert picture.size[0] == max(3 * 32 + 2 * GAP_PX, LEGEND_COL_PX)
    with pytest.raises(ValueError, match="class names"):
        overlay_png(image_zyx, pred, target, ["only one"])
    with pytest.raises(ValueError, match="target_kzyx"):
        overlay_png(image_zyx, pred, target[:, :3], ["a", "b"])


def test_curves_png_draws_coloured_lines() -> None:
    history = {
        "train/loss": [(s, 1.0 / (s + 1)) for s in range(20)],
        "val/dice_mean/class": [(5 * s, s / 4) for s in range(4)],
    }
    picture = curves_png(history, width_px=800, height_px=300)
    assert picture.size == (800, 300)
    rgb = np.asarray(picture).astype(int)
    blue = (np.abs(rgb - np.array([31, 119, 180])).sum(axis=2) < 30).sum()  # matplotlib's first colour
    assert blue > 100
    assert curves_png({}).size == (1000, 400)
