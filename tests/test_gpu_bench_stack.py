"""bench/gpu_stack.py report: steps/s per launch from MLflow's per-iteration timestamps, against the bare
loop, and the problems it must name (no resume, gaps in the loss history)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(storage: Path, name: str, *, launches: list[tuple[int, str | None]], steps: list[int]) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("m") or client.get_experiment(client.create_experiment("m"))
    run = client.create_run(exp.experiment_id)
    t0 = 1_700_000_000_000  # ms; one step every 100 ms, a 5 s pause before the second launch
    stamp = {i: t0 + 100 * i + (5000 if len(launches) > 1 and i >= launches[1][0] else 0) for i in steps}
    client.log_batch(run.info.run_id, metrics=[Metric("train/loss", 1.0, stamp[i], i) for i in steps])
    run_dir = storage / name
    run_dir.mkdir(parents=True)
    (run_dir / "mlflow_run_id").write_text(run.info.run_id)
    records = [
        {"event": "start", "iteration": it, "resumed_from": frm, "time": (stamp[it] - 2000) / 1000}
        for it, frm in launches
    ]
    (run_dir / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_report(tmp_path):
    storage = tmp_path / "runs"
    storage.mkdir()
    _run(storage, "z1", launches=[(0, None), (20, "/x/ckpt-it000000020-abc")], steps=list(range(30)))
    _run(storage, "z3", launches=[(0, None), (10, None)], steps=[i for i in range(20) if i != 15])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"bare torch loop": {"ms": 50.0}, "platform step": {"ms": 80.0}}))
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_stack.py"), "report", f"--storage={storage}",
         "--runs=z1,z3,missing", f"--bare={bare}", "--warmup=2", f"--out={out}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # problems found
    result = json.loads(out.read_text())
    z1 = [r for r in result["rows"] if r["run"] == "z1"]
    assert [r["iterations"] for r in z1] == ["0-19", "20-29"]
    assert z1[1]["resumed_from"] == "ckpt-it000000020-abc"
    for r in z1:
        # 100 ms apart; the 5 s pause lies before the second launch's first step, outside its window
        assert r["steps_per_s"] == pytest.approx(10.0, rel=1e-6)
        assert r["vs_bare"] == pytest.approx(0.5) and r["vs_platform_step"] == pytest.approx(0.8)
        assert r["startup_s"] == pytest.approx(2.0)
    problems = "\n".join(result["problems"])
    assert "missing: no MLflow run id" in problems
    assert "z3: loss history has gaps at iterations [15]" in problems
    assert "z3: the second launch did not resume" in problems
    assert "z1" not in problems
    assert "| z1 | 2 | 20-29 | ckpt-it000000020-abc | 10.00 | 100.0 | 0.50 | 0.80 |" in proc.stdout
