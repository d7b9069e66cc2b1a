"""Tracker on a real sqlite store and a real MLflow server that goes down; the outbox on a real
sqlite store whose directory disappears; overlay and curve PNGs.

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
from multitalent.tracking.outbox import Outbox, WarningLimiter

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


# --------------------------------------------------------------------------- outbox
@pytest.fixture
def store(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real MLflow sqlite store with one run, opened per request (NullPool), so moving its
    directory away is an outage: MLflow answers TEMPORARILY_UNAVAILABLE until it is back."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    experiment = client.create_experiment("exp", artifact_location=(run_dir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    class Store:
        def __init__(self) -> None:
            self.client, self.run_id, self.away = client, run_id, run_dir.with_name("away")

        def connect(self) -> tuple[Any, str]:
            return self.client, self.run_id

        def disappear(self) -> None:
            run_dir.rename(self.away)

        def come_back(self) -> None:
            self.away.rename(run_dir)

    return Store()


def _outbox(store: Any, **policy: Any) -> Outbox:
    policy = {"interval_s": 0.0, **policy}
    return Outbox(
        policy=FlushPolicy(**policy), connect=store.connect, warnings=WarningLimiter(300.0), store="sqlite"
    )


def _log_text(text: str, artifact_file: str) -> Any:
    return lambda client, run_id: client.log_text(run_id, text, artifact_file)


def test_outbox_holds_everything_while_the_store_is_gone_and_backs_off(store: Any) -> None:
    outbox = _outbox(store, retry_after_s=3600.0)
    outbox.add_metrics([("train/loss", 0.0)], step=0)
    assert outbox.healthy and outbox.buffered_metrics == 0

    store.disappear()
    with pytest.warns(TrackingWarning) as caught:
        outbox.add_metrics([("train/loss", 1.0)], step=1)
        outbox.submit("log_text", _log_text("written while away", "notes/away.txt"))
        outbox.add_metrics([("train/loss", 2.0), ("train/lr", 0.1)], step=2)
    assert len(caught) == 1 and "unreachable" in str(caught[0].message)  # one warning per outage
    assert not outbox.healthy and outbox.buffered_metrics == 3 and outbox.pending_ops == 1

    store.come_back()
    assert not outbox.drain()  # backing off: the next try is an hour away, so nothing is attempted
    assert outbox.buffered_metrics == 3
    assert outbox.drain(force=True)
    assert outbox.healthy and outbox.buffered_metrics == 0 and outbox.pending_ops == 0
    assert _history(store.client, store.run_id, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert _history(store.client, store.run_id, "train/lr") == [(2, 0.1)]
    assert "notes/away.txt" in _artifacts(store.client, store.run_id)


def test_outbox_drops_the_oldest_metrics_and_rejected_operations(store: Any) -> None:
    outbox = _outbox(store, max_buffered_metrics=3, retry_after_s=0.0, max_retry_after_s=0.0)
    store.disappear()
    with pytest.warns(TrackingWarning) as caught:
        for step in range(5):
            outbox.add_metrics([("train/loss", float(step))], step=step)
    assert [m for m in map(str, (w.message for w in caught)) if "buffer full" in m]
    assert outbox.buffered_metrics == 3 and outbox.dropped_metrics == 2

    def param(value: str) -> Any:
        from mlflow.entities import Param

        return lambda client, run_id: client.log_batch(run_id, params=[Param("lr", value)])

    outbox.submit("log_params", param("0.1"))
    outbox.submit("log_params", param("0.2"))  # MLflow parameters are immutable: the store rejects it
    outbox.submit("log_text", _log_text("after the rejected one", "notes/after.txt"))
    store.come_back()
    with pytest.warns(TrackingWarning, match="log_params rejected by the store, dropped"):
        assert outbox.drain()
    assert _history(store.client, store.run_id, "train/loss") == [(2, 2.0), (3, 3.0), (4, 4.0)]
    assert store.client.get_run(store.run_id).data.params == {"lr": "0.1"}
    assert "notes/after.txt" in _artifacts(store.client, store.run_id)


def test_outbox_spills_what_the_store_never_got(store: Any, tmp_path: Path) -> None:
    outbox = _outbox(store)
    store.disappear()
    with pytest.warns(TrackingWarning, match="unreachable"):
        for step in range(3):
            outbox.add_metrics([("train/loss", float(step))], step=step)
    outbox.submit("log_text", _log_text("never sent", "notes/lost.txt"))
    spill = tmp_path / "unsent.jsonl"
    with pytest.warns(TrackingWarning, match="3 metrics written to .* and 1 operations"):
        outbox.spill(spill, run="run r")
    rows = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rows] == [("train/loss", i, i) for i in range(3)]
    assert outbox.buffered_metrics == 0 and outbox.pending_ops == 0


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


def _black_runs(line: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of the runs of pure black pixels in a row or column of RGB pixels."""
    black = np.r_[False, (line == 0).all(axis=-1), False].astype(np.int8)
    starts, ends = np.flatnonzero(np.diff(black) == 1), np.flatnonzero(np.diff(black) == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def test_overlay_colours_where_the_masks_are() -> None:
    picture = _overlay()  # one 16 x 16 slice, panel_px=64: enlarged 4x to a 64 x 64 panel
    assert picture.mode == "RGB"
    rgb = np.asarray(picture)
    # The image is constant, so the panel is the only pure black in the picture (its corners are
    # outside the masks): find it by content, then read voxels through it.
    rows = [r for r in range(rgb.shape[0]) if (rgb[r] == 0).all(axis=-1).any()]
    top = rows[0]
    [(left, width)] = _black_runs(rgb[top])
    assert (left, width) == (0, 64) and len(rows) == 64 and rows == list(range(top, top + 64))
    assert top > 0  # a title strip above the panel

    def pixel(y: int, x: int, dy: int = 2, dx: int = 2) -> tuple[int, ...]:
        return tuple(int(v) for v in rgb[top + 4 * y + dy, left + 4 * x + dx])

    def fill(k: int) -> tuple[int, ...]:  # FILL_ALPHA of the class colour over black
        return tuple(round(FILL_ALPHA * c) for c in PALETTE[k])

    assert pixel(1, 1) == (0, 0, 0)  # background (z=2 was picked: most ground truth)
    assert pixel(6, 6) == pytest.approx(fill(0), abs=1)  # ground truth of class 0, inside the prediction
    assert pixel(12, 12) == pytest.approx(fill(1), abs=1)  # ground truth of class 1
    assert pixel(5, 7, dy=0) == PALETTE[0]  # top edge of the class-0 prediction: outline
    assert pixel(9, 9, dy=3) == PALETTE[0]  # bottom edge of the prediction
    assert pixel(7, 7) == pytest.approx(fill(0), abs=1)  # inside the prediction: no outline
    # The legend under the panel: one swatch per class present, in the class colour.
    legend = rgb[top + 64 :]
    for k in (0, 1):
        assert (legend == PALETTE[k]).all(axis=-1).sum() >= 10 * 10


def test_overlay_picks_spread_slices_and_checks_shapes() -> None:
    from multitalent.tracking.pictures import pick_slices

    image_zyx, pred, target = _masks()
    assert pick_slices(target, pred, 2) == [2, 4]
    assert pick_slices(np.zeros_like(target), np.zeros_like(pred), 2) == [2, 3]  # nothing to show: spread
    assert pick_slices(target, pred, 3) == [2, 4]  # only slices with something to show
    picture = overlay_png(image_zyx, pred, target, ["a", "b"], slices=3, panel_px=32)
    rgb = np.asarray(picture)
    # Two 16 x 16 slices enlarged 2x (panel_px=32), side by side with a gap, from the left edge.
    row = next(r for r in range(rgb.shape[0]) if (rgb[r] == 0).all(axis=-1).any())
    (left0, width0), (left1, width1) = _black_runs(rgb[row])
    assert (left0, width0, width1) == (0, 32, 32) and left1 > 32
    with pytest.raises(ValueError, match="class names"):
        overlay_png(image_zyx, pred, target, ["only one"])
    with pytest.raises(ValueError, match="target_kzyx"):
        overlay_png(image_zyx, pred, target[:, :3], ["a", "b"])


def test_overlay_slice_draws_a_label_map_like_a_mask_stack() -> None:
    """The preview's label maps and validation's mask stacks go through the same renderer:
    label value v is channel v - 1; the slice's edge is not an outline border."""
    from multitalent.overlay import label_masks, overlay_slice

    label = np.zeros((6, 8), dtype=np.uint8)
    label[0:3, 0:4] = 2  # touches the top and left edges
    masks = label_masks(label)
    assert masks.shape == (2, 6, 8) and not masks[0].any() and masks[1].sum() == 12
    rgb = overlay_slice(np.zeros((6, 8), np.float32), masks, masks, window=(0.0, 1.0), scale=2)
    assert rgb.shape == (12, 16, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == pytest.approx(tuple(round(FILL_ALPHA * c) for c in PALETTE[1]), abs=1)
    assert tuple(rgb[5, 2]) == PALETTE[1] and tuple(rgb[2, 7]) == PALETTE[1]  # inner edges: outline
    assert tuple(rgb[11, 15]) == (0, 0, 0)


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
