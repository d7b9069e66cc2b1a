"""Every training job in jobs/ loads and dry-runs (all components built, no step, no Ray), and the
training batches are reproducible per iteration (the basis of exact resume)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from multitalent.data.batch import DrawnBatch, collate
from multitalent.train import dry_run, load_train_job
from multitalent.train.batches import (
    AugmentPlan,
    StepBatches,
    step_generator,
    webdataset_batches,
    zarr_batches,
)
from multitalent.train.components import load_data_setup, webdataset_source_factory, zarr_source

REPO = Path(__file__).resolve().parents[1]
MULTITALENT = str(Path(sys.executable).with_name("multitalent"))
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def job_kind(path: Path) -> str | None:
    data = yaml.safe_load(path.read_text()) or {}
    if "kind" in data:
        return data["kind"]
    parent = data.get("extends")
    return job_kind(path.parent / parent) if isinstance(parent, str) else None


TRAIN_JOBS = [p for p in JOBS if job_kind(p) == "train"]


def test_every_job_file_has_a_known_kind():
    kinds = {p.name: job_kind(p) for p in JOBS}
    assert set(kinds.values()) <= {"convert", "train", "predict", "evaluate", "experiment"}, kinds
    assert {"pretrain.yaml", "pretrain_cpu_tiny.yaml"} <= {p.name for p in TRAIN_JOBS}


@pytest.mark.parametrize("path", TRAIN_JOBS, ids=lambda p: p.name)
def test_training_job_dry_runs_as_written(path, tmp_path):
    """As written (shards possibly not converted here): everything but the data is built."""
    job = load_train_job(path, [f"run.storage_path={tmp_path}"])
    report = dry_run(job)
    text = report.text()
    assert f"catalog: {job.catalog}" in text and "model: " in text and "deepspeed: " in text
    assert f"ZeRO {job.zero_stage}" in text and "fresh start" in text
    assert report.deepspeed_config["train_micro_batch_size_per_gpu"] == job.micro_batch
    if not Path(job.shards.path).is_absolute() and not (REPO / job.shards.path).exists():
        assert report.batch_shape is None and any("no plan.json" in e for e in report.errors)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAIN_JOBS, ids=lambda p: p.name)
def test_training_job_dry_runs_on_the_phantom_shards(path, phantom_shards, tmp_path):
    """Pointed at converted shards (the phantom's label space), the data source and a batch are built."""
    job = load_train_job(
        path, [f"run.storage_path={tmp_path}", f"shards.path={phantom_shards}", "catalog=phantom"]
    )
    report = dry_run(job)
    # A fine-tuning job's model package is not published here: its warning is expected.
    assert [w for w in report.warnings if not (job.init and w.startswith("init:"))] == []
    assert report.batch_shape is not None and report.batch_shape[:2] == (job.micro_batch, 1)
    assert "training /" in report.text() and "batch (rank 0, iteration 0)" in report.text()


@pytest.mark.slow
def test_a_webdataset_job_dry_runs_its_webdataset_source(phantom_shards, tmp_path):
    """The dry run builds the job's own source (the workers' assembly), not always a Zarr one."""
    sets = [
        f"run.storage_path={tmp_path}",
        f"shards.path={phantom_shards}",
        "architecture.patch_zyx=[16,32,32]",
    ]
    zarr = dry_run(load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", sets))
    wds = dry_run(
        load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", [*sets, "shards.source=webdataset"])
    )
    assert wds.warnings == [] and wds.batch_shape == zarr.batch_shape
    assert wds.batch_shape is not None and wds.batch_shape[:2] == (1, 1)
    assert "from webdataset" in wds.text() and "from zarr" in zarr.text()
    keys = [line for line in wds.text().splitlines() if line.startswith("batch ")]
    make = webdataset_source_factory(
        load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", [*sets, "shards.source=webdataset"]),
        load_data_setup(load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml", sets)),
        patch_zyx=(16, 32, 32),
        rank=0,
        world_size=2,
    )
    first = next(iter(make(0)))  # the stream's first batch: the one the dry run showed
    assert f"keys {first.keys}" in keys[0]
    tuned = load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [*sets, "shards.source=webdataset", "data.webdataset.shuffle_buffer=3"],
    )
    source = webdataset_source_factory(
        tuned, load_data_setup(tuned), patch_zyx=(16, 32, 32), rank=0, world_size=2
    )(0)
    assert source.shuffle_buffer == 3  # the job file reaches the stream


@pytest.mark.slow
def test_cli_dry_run_prints_the_resolved_job_and_the_components(phantom_shards, tmp_path):
    out = subprocess.run(
        [
            MULTITALENT, "train", str(REPO / "jobs" / "pretrain_cpu_tiny.yaml"), "--dry-run",
            "--set", f"shards.path={phantom_shards}", "--set", f"run.storage_path={tmp_path}",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    resolved, _, summary = out.stdout.partition("---\n")
    assert yaml.safe_load(resolved)["catalog"] == "phantom"
    assert "workers: 2 x CPU" in summary and "batch (rank 0, iteration 0): image (1, 1," in summary


def test_cli_reports_a_bad_job_with_its_path(tmp_path):
    out = subprocess.run(
        [MULTITALENT, "train", str(REPO / "jobs" / "pretrain.yaml"), "--dry-run", "--set", "zero_stage=7"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "pretrain.yaml: invalid job" in out.stderr and "zero_stage" in out.stderr


# ----------------------------------------------------------------------------- reproducible batches
@pytest.fixture(scope="module")
def tiny(phantom_shards):
    job = load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [f"shards.path={phantom_shards}", "architecture.patch_zyx=[16, 32, 32]", "batch.global_size=4"],
    )
    return job, load_data_setup(job)


def _source(tiny, rank: int, plan: AugmentPlan):
    job, setup = tiny
    return zarr_source(
        job, setup, cases=setup.train_cases, patch_zyx=plan.read_zyx, batch_size=2, rank=rank, world_size=2
    )


@pytest.mark.slow
def test_the_batch_of_an_iteration_depends_only_on_seed_rank_and_iteration(tiny):
    plan = AugmentPlan.make(enabled=True, where="loader", patch_zyx=[16, 32, 32])
    rank0 = StepBatches(_source(tiny, 0, plan), start=0, stop=4, augment=plan)
    first = dict(rank0)
    assert sorted(first) == [0, 1, 2, 3]
    again = StepBatches(_source(tiny, 0, plan), start=2, stop=4, augment=plan)  # a resumed stream
    for i, batch in again:
        assert batch.keys == first[i].keys
        torch.testing.assert_close(batch.image_bczyx, first[i].image_bczyx, rtol=0, atol=0)
        torch.testing.assert_close(batch.label_bzyx, first[i].label_bzyx, rtol=0, atol=0)
    assert tuple(first[0].image_bczyx.shape) == (2, 1, 16, 32, 32)  # augmented down to the patch
    other_rank = StepBatches(_source(tiny, 1, plan), start=0, stop=1, augment=plan).batch_at(0)
    assert not torch.equal(other_rank.image_bczyx, first[0].image_bczyx)
    # Augmentation in the step (on the device): the loader draws the parameters and reads the enlarged
    # patch only for the rotated or scaled samples, as for augmentation in the loader; applied in the step,
    # the result is the loader's, and that of reading every sample enlarged and augmenting with the
    # iteration's generator (the WebDataset path).
    in_step = AugmentPlan.make(enabled=True, where="device", patch_zyx=[16, 32, 32])
    assert in_step.config is not None
    drawn_batches = StepBatches(_source(tiny, 0, in_step), start=0, stop=4, augment=in_step)
    wide = []
    for i in range(4):
        drawn = drawn_batches.batch_at(i)
        assert isinstance(drawn, DrawnBatch) and drawn.keys == first[i].keys
        for group, shape in ((drawn.wide, in_step.read_zyx), (drawn.narrow, in_step.patch_zyx)):
            # int16 HU, normalised where the batch is augmented (on the device in training)
            assert group is None or (
                tuple(group.image_bczyx.shape[2:]) == shape and group.image_bczyx.dtype == torch.int16
            )
        out = drawn.augment(in_step.config, in_step.patch_zyx)
        with pytest.raises(ValueError, match="without a normalization"):
            dataclasses.replace(drawn, normalization=None).augment(in_step.config, in_step.patch_zyx)
        torch.testing.assert_close(out.image_bczyx, first[i].image_bczyx, rtol=0, atol=0)
        assert torch.equal(out.label_bzyx, first[i].label_bzyx)
        src = _source(tiny, 0, in_step)
        src.set_epoch(i)
        draws = src.draws(worker=0, num_workers=1)
        picks = [next(draws) for _ in range(2)]
        enlarged = collate(
            [src.read_sample(d.case, d.center_zyx, fg_class=d.fg_class) for d in picks],
            annotated_dk=src.annotated_dk,
        )
        all_wide = in_step.apply(enlarged, step_generator(0, 0, i))
        torch.testing.assert_close(all_wide.image_bczyx, first[i].image_bczyx, rtol=0, atol=0)
        assert torch.equal(all_wide.label_bzyx, first[i].label_bzyx)
        wide += drawn.params.reads_beyond_patch_b.tolist()
    assert any(wide) and not all(wide)  # both reads happened in these 4 batches


@pytest.mark.slow
@pytest.mark.parametrize("where", ["off", "device"])
def test_loader_processes_do_not_change_the_batches(tiny, where):
    """Also the drawn batches of augmentation on the device (int16 groups and their parameters) cross the
    loader processes intact."""
    plan = AugmentPlan.make(enabled=where != "off", where="device", patch_zyx=[16, 32, 32])
    inline = list(zarr_batches(_source(tiny, 1, plan), start=3, stop=8, augment=plan, loader_workers=0))
    workers = list(zarr_batches(_source(tiny, 1, plan), start=3, stop=8, augment=plan, loader_workers=2))
    assert [i for i, _ in workers] == [i for i, _ in inline] == [3, 4, 5, 6, 7]
    for (_, a), (_, b) in zip(inline, workers):
        assert a.keys == b.keys
        if where == "device":
            assert isinstance(a, DrawnBatch) and isinstance(b, DrawnBatch) and plan.config is not None
            a, b = a.augment(plan.config, plan.patch_zyx), b.augment(plan.config, plan.patch_zyx)
        assert torch.equal(a.image_bczyx, b.image_bczyx) and torch.equal(a.label_bzyx, b.label_bzyx)


@pytest.mark.slow
def test_webdataset_stream_resumes_mid_epoch_on_the_same_batches(tiny):
    job, setup = tiny
    plan = AugmentPlan.make(enabled=False, where="loader", patch_zyx=[16, 32, 32])
    make = webdataset_source_factory(job, setup, patch_zyx=plan.read_zyx, rank=0, world_size=2)
    per_epoch = job.schedule.iterations_per_epoch
    kw = {"iterations_per_epoch": per_epoch, "augment": plan, "loader_workers": 0}
    full = dict(webdataset_batches(make, start=0, stop=per_epoch + 2, **kw))
    assert sorted(full) == list(range(per_epoch + 2))
    resumed = dict(webdataset_batches(make, start=2, stop=per_epoch + 2, **kw))
    assert sorted(resumed) == list(range(2, per_epoch + 2))
    for i, batch in resumed.items():
        assert batch.keys == full[i].keys and torch.equal(batch.image_bczyx, full[i].image_bczyx)
