"""The distributed trainer end to end: real Ray Train (2 CPU workers, gloo), real DeepSpeed, real MLflow
(sqlite store under the run directory), on the phantom shards with a tiny U-Net.

The reference run (ZeRO-1, 2 epochs x 6 iterations, augmentation on and seeded per iteration) is
launched twice: stopped after 6 iterations, then resumed to 12. Tests compare it with an uninterrupted
run (resume equivalence), with ZeRO-2 and ZeRO-3 runs (same fp32 math), and relaunch a copy whose
latest checkpoint is corrupted (it must fall back and still reproduce the weights). Each test launches
Ray Train at most once (~30-60 s each on 2 busy cores; the fixture launches twice).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalent.jobs import JobError
from multitalent.train import dry_run, load_train_job, run_checkpoints, run_training, verify_checkpoint
from multitalent.train.checkpoint import WEIGHTS_FILE, CheckpointError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_job(shards: Path, storage: Path, name: str, *extra: str):
    """The CPU test variant, smaller still: 16x32x32 patches, 2 x 2 batch, high lr so 12 steps learn."""
    return load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [
            f"shards.path={shards}",
            f"run.storage_path={storage}",
            f"run.name={name}",
            "architecture.patch_zyx=[16, 32, 32]",
            "batch.global_size=4",
            "optimiser.lr=0.1",
            "optimiser.momentum=0.9",
            "schedule.epochs=2",
            "schedule.iterations_per_epoch=6",
            "checkpoint.every_iterations=3",
            "validation.max_cases=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def progress_records() -> dict[str, list[dict]]:
    """The progress records of the reference run's two launches (filled by ``reference``)."""
    return {"first": [], "second": []}


@pytest.fixture(scope="module")
def reference(ray_local, phantom_shards, tmp_path_factory, progress_records):
    """``(first launch, final result)``: 6 iterations, stop; relaunch the same run name, 6 more."""
    storage = tmp_path_factory.mktemp("runs")
    first = run_training(
        tiny_job(phantom_shards, storage, "reference", "schedule.stop_after_iterations=6"),
        on_progress=progress_records["first"].append,
    )
    second = run_training(
        tiny_job(phantom_shards, storage, "reference"), on_progress=progress_records["second"].append
    )
    return first, second


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / WEIGHTS_FILE, weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def mlflow_client(result):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=result.tracking_uri)


def test_zero1_loss_decreases_and_mlflow_holds_params_metrics_pictures(reference):
    first, result = reference
    assert first.iterations == 6 and result.iterations == 12 and result.optimizer_steps == 12
    assert result.skipped_nonfinite == 0
    assert result.loss_iterations == list(range(12))  # the history spans both launches
    losses = np.asarray(result.losses)
    assert np.isfinite(losses).all()
    assert losses[-3:].mean() < 0.8 * losses[:3].mean(), losses

    verify_checkpoint(result.checkpoint)  # the final checkpoint verifies
    kept = run_checkpoints(result.run_dir)
    assert [p.name.split("-")[1] for p in kept] == ["it000000012", "it000000009", "it000000006"]  # keep 3

    client = mlflow_client(result)
    experiment = client.get_experiment_by_name("multitalent")
    assert len(client.search_runs([experiment.experiment_id])) == 1  # both launches log to one run
    assert result.mlflow_run_id == first.mlflow_run_id
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["job.zero_stage"] == "1" and params["world_size"] == "2"
    assert params["catalog.name"] == "phantom" and "plan.target_spacing_zyx_mm" in params
    loss_history = sorted(client.get_metric_history(result.mlflow_run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in loss_history] == list(range(12))
    np.testing.assert_allclose([m.value for m in loss_history], losses, rtol=1e-6)
    lr = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "train/lr")}
    assert lr[0] == pytest.approx(0.1) and lr[6] == pytest.approx(0.1 * 0.5**0.9)  # poly, per epoch
    metrics = run.data.metrics
    for name in (
        "train/samples_per_s",
        "train/peak_memory_mb",
        "val/dice_mean/class",
        "val/dice_mean/dataset",
    ):
        assert name in metrics and math.isfinite(metrics[name])
    assert any(k.startswith("val/dice/") for k in metrics)
    dice_points = client.get_metric_history(result.mlflow_run_id, "val/dice_mean/class")
    assert sorted(m.step for m in dice_points) == [5, 11]  # every epoch
    for epoch in ("epoch_0001", "epoch_0002"):
        pictures = [a.path for a in client.list_artifacts(result.mlflow_run_id, f"validation/{epoch}")]
        assert pictures and all(p.endswith(".png") for p in pictures)
    # The curves picture plots the same steps as MLflow (the iteration that ended), loss and Dice alike.
    curves = verify_checkpoint(result.checkpoint).curves
    assert [int(a) for a, _ in curves["val/dice_mean/class"]] == [5, 11]
    assert [int(a) for a, _ in curves["train/epoch_loss"]] == [5, 11]
    root = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"job.yaml", "plan.json", "label_space.json", "curves"} <= root
    assert [a.path for a in client.list_artifacts(result.mlflow_run_id, "curves")] == ["curves/curves.png"]


def test_resumed_run_equals_an_uninterrupted_run(ray_local, phantom_shards, tmp_path, reference):
    """6 iterations, stop, resume, 6 more == 12 uninterrupted: losses and weights (fp32, within 1e-5)."""
    _, ref = reference
    result = run_training(tiny_job(phantom_shards, tmp_path, "uninterrupted"))
    assert result.iterations == 12
    np.testing.assert_allclose(ref.losses, result.losses, rtol=1e-5)
    assert_same_weights(weights(ref.checkpoint), weights(result.checkpoint))


def test_zero2_trains_the_same_math(ray_local, phantom_shards, tmp_path, reference):
    """ZeRO-2 shards gradients and optimizer state differently; the fp32 math must match ZeRO-1."""
    _, ref = reference
    result = run_training(tiny_job(phantom_shards, tmp_path, "zero2", "zero_stage=2", "schedule.epochs=1"))
    assert result.iterations == 6
    np.testing.assert_allclose(result.losses, ref.losses[:6], rtol=1e-4)
    verify_checkpoint(result.checkpoint)


def test_corrupted_latest_checkpoint_is_skipped_for_the_previous_one(
    ray_local, phantom_shards, reference, tmp_path
):
    _, ref = reference
    run_dir = tmp_path / "reference"
    shutil.copytree(ref.run_dir, run_dir)
    latest, previous = run_checkpoints(run_dir)[:2]
    assert previous.name.startswith("ckpt-it000000009-")
    victim = latest / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(latest)

    result = run_training(tiny_job(phantom_shards, tmp_path, "reference"))
    # Resumed from iteration 9 (not from the corrupted 12), redid 9..11 into a new folder, and
    # reproduced the reference weights.
    assert result.checkpoint is not None and result.checkpoint.name != latest.name
    assert result.checkpoint.name.startswith("ckpt-it000000012-")
    assert_same_weights(weights(result.checkpoint), weights(ref.checkpoint))
    client = mlflow_client(result)
    rejected = [a.path for a in client.list_artifacts(result.mlflow_run_id, "resume")]
    assert len(rejected) == 1, "the rejected checkpoint is recorded in the MLflow run"


def test_relaunching_under_another_schedule_fails_on_the_driver_naming_both(
    phantom_shards, reference, tmp_path
):
    """Not a failed Ray worker group: the launch (and its dry run) names the checkpoint and the schedules,
    before any worker starts, and leaves the run as it was."""
    _, ref = reference
    shutil.copytree(ref.run_dir, tmp_path / "reference")
    before = sorted(p.name for p in (tmp_path / "reference").iterdir())
    job = tiny_job(phantom_shards, tmp_path, "reference", "schedule.epochs=3")
    with pytest.raises(JobError, match=r"ckpt-it000000012-.*schedule .* differs from the job's"):
        run_training(job)
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == before
    report = dry_run(job)
    assert any("differs from the job's" in e and "'epochs': 3" in e for e in report.errors), report.errors


def test_zero3_skips_nonfinite_losses_counts_them_and_stops_after_too_many(
    ray_local, phantom_shards, tmp_path, reference
):
    """Under ZeRO-3 (collective forward passes) a skipped step must not hang; finite steps keep
    ZeRO-1's math."""
    from mlflow.tracking import MlflowClient

    from multitalent.train import NonFiniteLossError

    _, ref = reference
    job = tiny_job(
        phantom_shards,
        tmp_path,
        "nonfinite",
        "zero_stage=3",
        "schedule.epochs=1",
        "checkpoint.every_iterations=2",
        "nonfinite.max_consecutive=2",
        "debug.poison_loss_at=[1, 3, 4, 5]",  # 1: skipped, then 3, 4, 5 in a row > 2: stop
    )
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 consecutive iterations"):
        run_training(job)
    # The stop leaves a checkpoint (Ray's result carries only checkpoint metrics) recording why.
    (folder, *_) = run_checkpoints(job.run_dir)
    state = verify_checkpoint(folder)
    assert state.iteration == 6 and state.skipped_nonfinite == 4 and state.optimizer_steps == 2
    assert state.stop_reason is not None and "nonfinite.max_consecutive = 2" in state.stop_reason
    client = MlflowClient(tracking_uri=f"sqlite:///{job.run_dir.parent / 'mlflow.db'}")  # storage path's
    run = client.get_run(state.mlflow_run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["multitalent.stop_reason"]
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped_nonfinite")}
    assert skipped[1] == 1 and skipped[5] == 4
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(loss) == [0, 2]
    # Iteration 0 is ZeRO-1's; iteration 2 follows one optimizer step (the lr is the same), not two.
    assert loss[0] == pytest.approx(ref.losses[0], rel=1e-4)
    assert all(v.dtype == torch.float32 for v in weights(folder).values())


# ----------------------------------------------------------------------------------- what a person sees
def test_progress_reaches_the_driver_as_the_run_goes(reference, progress_records):
    """Each launch reports its start, every epoch (loss, lr, samples/s, ETA, validation Dice) and its end
    to the driver; the result carries the last validation pass for the final table."""
    first, result = reference
    # "waiting" notices come from the driver while the workers start (after 30 s), depending on load.
    one, two = ([r for r in progress_records[k] if r["event"] != "waiting"] for k in ("first", "second"))
    assert all(
        "start" in r["message"]
        for k in progress_records
        for r in progress_records[k]
        if r["event"] == "waiting"
    )
    assert [r["event"] for r in one] == ["start", "epoch", "end"]
    assert [r["event"] for r in two] == ["start", "epoch", "end"]
    assert one[0]["iteration"] == 0 and one[0]["resumed_from"] is None and one[0]["world_size"] == 2
    assert two[0]["iteration"] == 6 and two[0]["resumed_from"].startswith("ckpt-it000000006-")
    for epoch, r in ((1, one[1]), (2, two[1])):
        assert r["epoch"] == epoch and r["epochs"] == 2 and r["iteration"] == 6 * epoch and r["total"] == 12
        assert r["loss"] > 0 and r["samples_per_s"] > 0 and r["eta_s"] >= 0
        assert "val/dice_mean/class" in r["validation"]
        assert any(k.startswith("val/dice_dataset/") for k in r["validation"])
    assert one[1]["lr"] == pytest.approx(0.1) and one[1]["eta_s"] == 0  # the launch stops at 6
    assert one[2]["iteration"] == 6 and two[2]["iteration"] == 12 and two[2]["stop_reason"] is None
    assert result.validation == two[1]["validation"] and result.validation_iteration == 12
    assert first.validation_iteration == 6


def test_progress_printers_and_the_result_table(reference, progress_records):
    from multitalent.catalog import load_catalog
    from multitalent.train.progress import done_record, jsonl_printer, result_text, text_printer

    _, result = reference
    out = io.StringIO()
    show = text_printer(out)
    for r in progress_records["first"] + progress_records["second"]:
        show(r)
    text = out.getvalue()
    assert "training: 2 epochs x 6 iterations on 2 worker(s), global batch 4; from iteration 0" in text
    assert "(resumed from ckpt-it000000006-" in text
    epoch_lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    pattern = r"epoch 2/2  it 12/12  loss \d+\.\d{4}  lr \S+  \d+\.\d samples/s  \S+/epoch  ETA 0s"
    assert re.fullmatch(pattern, epoch_lines[1]), epoch_lines[1]
    assert re.search(r"^  val Dice \d\.\d{3} \(mean of classes\)  P\d\d \d\.\d\d", text, re.M), text
    assert "stopped at iteration 6 of 12 (relaunch to continue)" in text

    table = result_text(result, load_catalog("phantom"))
    assert "done: 12 iterations (12 optimizer steps, 0 skipped as non-finite)" in table
    assert "validation Dice (iteration 12; per class, grouped by dataset):" in table
    scored = [line for line in table.splitlines() if re.match(r"^  P\d\d +\S.* \d\.\d{3}$", line)]
    assert scored, table  # one row per class, the dataset named on its first row
    assert "mean over classes" in table and f"checkpoint: {result.checkpoint}" in table
    assert f"mlflow ui --backend-store-uri {result.tracking_uri}" in table

    out = io.StringIO()
    for r in [*progress_records["second"], done_record(result)]:
        jsonl_printer(out)(r)
    parsed = [json.loads(line) for line in out.getvalue().splitlines()]
    parsed = [r for r in parsed if r["event"] != "waiting"]
    assert [r["event"] for r in parsed] == ["start", "epoch", "end", "done"]
    assert (
        parsed[-1]["checkpoint"] == str(result.checkpoint) and parsed[-1]["validation"] == result.validation
    )


def test_cli_prints_a_line_per_epoch_and_the_result_table(ray_local, phantom_shards, tmp_path):
    """``multitalent train`` on a short run, on the running local Ray: what the console shows."""
    sets = [
        f"shards.path={phantom_shards}",
        f"run.storage_path={tmp_path}",
        "run.name=cli",
        "architecture.patch_zyx=[16, 32, 32]",
        "schedule.epochs=2",
        "schedule.iterations_per_epoch=2",
        "checkpoint.every_iterations=2",
        "validation.max_cases=2",
        "validation.overlays=false",
    ]
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("multitalent")),
            "train",
            str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"),
            "--address",
            ray_local.get_runtime_context().gcs_address,
            *[arg for s in sets for arg in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "worker(s) are starting" not in line]
    assert lines[0].startswith("training: 2 epochs x 2 iterations on 2 worker(s)"), proc.stdout
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split("  it ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss " in line and " samples/s" in line and "ETA " in line for line in epochs)
    assert sum(line.startswith("  val Dice ") for line in lines) == 2
    assert "done: 4 iterations (4 optimizer steps, 0 skipped as non-finite)" in proc.stdout
    assert "validation Dice (iteration 4; per class, grouped by dataset):" in proc.stdout
    assert "mean over classes" in proc.stdout and "checkpoint: " in proc.stdout
    assert "not scored (no validation case of theirs in this pass): P01" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert "Traceback" not in proc.stderr
