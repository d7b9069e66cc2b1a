"""Adding datasets to a published model (``init: {transfer: all}``): the package's heads keep their
outputs bit for bit, new head groups are appended, training continues, and converting the enlarged
collection with the package's plan reuses every case already converted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multitalent.catalog import load_preset
from multitalent.preprocess.plan import PLAN_FILE, Plan
from multitalent.registry import open_package
from test_finetune import PATCH, make_package

REPO = Path(__file__).resolve().parents[1]
OLD = ["P01", "P02", "P03", "P04", "P05", "P06"]  # the package's datasets; phantom appends P07


def expand_job(shards: Path, storage: Path, package: Path, *extra: str):
    from multitalent.train.job import load_train_job

    return load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [
            f"shards.path={shards}",
            f"run.storage_path={storage}",
            "run.name=expand",
            f"init={{model: '{package}', transfer: all}}",
            "architecture.patch_zyx=[16, 32, 32]",
            "workers.num_workers=1",
            "batch.global_size=2",
            "validation.fold=null",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def old_package(phantom_shards, tmp_path_factory) -> Path:
    catalog = load_preset("phantom").subset(OLD)
    return make_package(
        tmp_path_factory.mktemp("old") / "package", Plan.load(phantom_shards / PLAN_FILE), catalog
    )


def test_old_heads_keep_their_outputs_bit_for_bit_and_new_ones_are_appended(
    old_package, phantom_shards, tmp_path
):
    from multitalent.train.components import assemble

    parts = assemble(expand_job(phantom_shards, tmp_path, old_package), world_size=1)
    package = open_package(old_package)
    n_old = package.catalog.num_classes
    assert parts.model.head_groups[: len(OLD)] == package.catalog.classes_per_dataset()
    assert (
        len(parts.model.head_groups) == len(OLD) + 1
        and parts.init is not None
        and parts.init.kept_head_groups == 6
    )
    old_net, new_net = package.load_network(), parts.model.eval()
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        for a, b in zip(old_net(x), new_net(x)):
            assert torch.equal(a, b[:, :n_old])
    lines = "\n".join(parts.init.lines(parts.model))
    assert "6:3@17-19(new)" in lines and "0:2@0-1(package)" in lines


def test_a_catalog_that_does_not_start_with_the_packages_is_refused(phantom_shards, tmp_path):
    from multitalent.train.components import assemble

    catalog = load_preset("phantom").subset(["P01", "P03"])
    package = make_package(tmp_path / "pkg", Plan.load(phantom_shards / PLAN_FILE), catalog)
    with pytest.raises(
        ValueError, match=r"catalog: dataset 1 differs from the package's in dataset: job 'P02'"
    ):
        assemble(expand_job(phantom_shards, tmp_path, package), world_size=1)


@pytest.fixture
def process_group(gloo_group):
    """A one-process gloo group (tests/conftest.py ``gloo_group``)."""
    yield


def test_training_the_enlarged_network_continues(process_group, old_package, phantom_shards, tmp_path):
    """In process (no Ray): the worker's Trainer, 3 steps, no callbacks."""
    from multitalent.train.loop import Trainer, WorkerInfo

    job = expand_job(phantom_shards, tmp_path, old_package, "schedule.stop_after_iterations=3")
    trainer = Trainer(job, worker=WorkerInfo(0, 1, torch.device("cpu"), False), run_dir=tmp_path / "expand")
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.fit([])
    assert trainer.state.iteration == 3 and all(torch.isfinite(torch.tensor(trainer.losses)))
    after = trainer.engine.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".groups.6." in k)  # new heads learn
    assert trainer.parts.setup is not None
    assert {c.dataset_id for c in trainer.parts.setup.train_cases} == set(OLD) | {"P07"}


def test_converting_an_extended_catalog_reconverts_no_old_case(phantom_shards, tmp_path):
    """Convert P01+P02; publish-style package of that plan; convert P01+P02+P03 with ``plan: package``."""
    from multitalent.convert.job import ConvertJob
    from multitalent.convert.pipeline import run_conversion
    from multitalent.jobs import load_job
    from multitalent.shards import load_manifest

    raw = phantom_shards.parent / "raw"
    out = tmp_path / "out"
    common = [f"raw_root={raw}", f"out={out}", "ray.num_cpus=2", "synth=null"]
    first = load_job(REPO / "jobs" / "convert.yaml", ConvertJob, [*common, "datasets=[P01, P02]"])
    s1 = run_conversion(first, log=lambda _: None)
    assert s1.ok and s1.converted > 0
    old = load_preset("phantom").subset(["P01", "P02"])
    package = make_package(tmp_path / "pkg", Plan.load(out / PLAN_FILE), old)
    second = load_job(
        REPO / "jobs" / "convert.yaml", ConvertJob, [*common, "datasets=[P01, P02, P03]", f"plan={package}"]
    )
    s2 = run_conversion(second, log=lambda _: None)
    manifest = load_manifest(out)
    n_new = manifest.datasets()["P03"]
    assert s2.ok and s2.skipped == s1.converted and s2.converted == n_new > 0
    plan = Plan.load(out / PLAN_FILE)
    assert plan.normalization == open_package(package).plan.normalization
    assert manifest.catalog_hash == load_preset("phantom").subset(["P01", "P02", "P03"]).hash
