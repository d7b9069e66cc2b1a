"""Fine-tuning from a published backbone, for real: a tiny U-Net package published into the storage
path's sqlite store, then Ray Train + DeepSpeed (1 CPU worker) runs through the three phases
(heads 4 iterations, warmup 4, poly 2).

One uninterrupted run, and one launched three times (stopped mid-phase-1 at 3, mid-phase-2 at 6, then
finished): the two must end with the same weights. Also: the published fp32 weights of a run, and of a
bf16 / ZeRO-3 engine, are DeepSpeed's fp32 master weights.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from multitalent.catalog import load_preset
from multitalent.models import build_network
from multitalent.preprocess.plan import PLAN_FILE, Plan
from multitalent.registry import open_package, pull
from multitalent.registry.package import ModelCard, write_package
from multitalent.registry.store import publish_package
from multitalent.train import load_train_job, run_training
from multitalent.train.checkpoint import STATE_FILE, WEIGHTS_FILE, TrainerState

REPO = Path(__file__).resolve().parents[1]
PATCH = (16, 32, 32)
pytestmark = pytest.mark.slow


def make_package(out: Path, plan: Plan, catalog=None, seed: int = 7) -> Path:
    catalog = catalog or load_preset("phantom")
    torch.manual_seed(seed)
    model = build_network("unet", catalog.classes_per_dataset(), size="tiny", patch_size_zyx=PATCH)
    plan = Plan.for_catalog(
        catalog, normalization=plan.normalization, target_spacing_zyx_mm=plan.target_spacing_zyx_mm
    )
    card = ModelCard(cases={}, validation={}, training={})
    return write_package(
        out, model=model, state_dict=model.state_dict(), plan=plan, catalog=catalog, card=card
    )


@pytest.fixture(scope="module")
def published(phantom_shards, tmp_path_factory):
    """``(storage path, tracking URI, package folder)``: the package registered as phantom-tiny@champion
    in ``<storage>/mlflow.db``, the store a job of that storage path uses by default."""
    from mlflow.tracking import MlflowClient

    storage = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    package = make_package(storage.parent / f"{storage.name}-package", Plan.load(phantom_shards / PLAN_FILE))
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("pretrain", artifact_location=(storage / "mlartifacts").as_uri())
    run_id = client.create_run(exp, run_name="pretrain").info.run_id
    publish_package(package, name="phantom-tiny", run_id=run_id, tracking_uri=uri, alias="champion")
    return storage, uri, package


def ft_job(shards: Path, storage: Path, name: str, *extra: str):
    return load_train_job(
        REPO / "jobs" / "finetune_cpu_tiny.yaml",
        [
            f"shards.path={shards}",
            f"run.storage_path={storage}",
            f"run.name={name}",
            "architecture.patch_zyx=[16, 32, 32]",
            "finetune.heads_epochs=2",
            "finetune.warmup_epochs=2",
            "finetune.heads_lr=0.01",
            "optimiser.lr=0.05",
            "optimiser.momentum=0.9",
            "schedule.epochs=5",
            "schedule.iterations_per_epoch=2",
            "checkpoint.every_iterations=2",
            "checkpoint.keep=10",  # the tests read the first launch's checkpoints after the last
            "validation.fold=null",
            *extra,
        ],
    )


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def test_step0_backbone_is_the_published_one_heads_are_new_and_alone_in_the_optimiser(
    published, phantom_shards
):
    from multitalent.train.components import assemble

    storage, _, package = published
    parts = assemble(
        ft_job(phantom_shards, storage, "step0", "init.model=models:/phantom-tiny/1"), world_size=1
    )
    ours, theirs = parts.model.state_dict(), open_package(package).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in backbone_of(theirs))
    heads = [k for k in theirs if k.startswith("heads.")]
    assert heads and not all(torch.equal(ours[k], theirs[k]) for k in heads)  # fresh heads
    in_optimizer = {id(p) for g in parts.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in parts.model.head_parameters()}
    assert type(parts.optimizer).__name__ == "AdamW" and parts.optimizer.defaults["amsgrad"]
    assert not any(p.requires_grad for p in parts.model.backbone_parameters())
    assert parts.deepspeed_config["gradient_clipping"] == 0.0  # no clipping in the heads phase
    assert parts.init is not None and parts.init.parent == "phantom-tiny/1"


def test_a_different_architecture_or_plan_is_refused_naming_the_field(published, phantom_shards, tmp_path):
    from multitalent.preprocess.plan import Normalization
    from multitalent.train.components import assemble

    storage, _, package = published
    job = ft_job(
        phantom_shards, storage, "mismatch", f"init.model={package}", "architecture.patch_zyx=[16, 32, 64]"
    )
    with pytest.raises(ValueError, match=r"architecture\.patch_zyx: the job has \[16, 32, 64\]"):
        assemble(job, world_size=1)
    other = Plan.for_catalog(
        load_preset("phantom"), normalization=Normalization(clip=(-1000, 1000), mean=1, std=2)
    )
    other_pkg = make_package(tmp_path / "other", other)
    with pytest.raises(ValueError, match=r"plan field normalization\.clip"):
        assemble(ft_job(phantom_shards, storage, "mismatch2", f"init.model={other_pkg}"), world_size=1)


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
def uninterrupted(ray_local, published, phantom_shards):
    storage, _, _ = published
    return run_training(ft_job(phantom_shards, storage, "straight"))


@pytest.fixture(scope="module")
def interrupted(ray_local, published, phantom_shards):
    """Launched three times: stopped at iteration 3 (mid heads phase), 6 (mid warmup), then finished."""
    storage, _, _ = published
    first = run_training(ft_job(phantom_shards, storage, "resumed", "schedule.stop_after_iterations=3"))
    second = run_training(ft_job(phantom_shards, storage, "resumed", "schedule.stop_after_iterations=6"))
    return first, second, run_training(ft_job(phantom_shards, storage, "resumed"))


def state_of(folder: Path) -> TrainerState:
    return TrainerState.from_json((folder / STATE_FILE).read_text(), where=str(folder))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / WEIGHTS_FILE, weights_only=True)


def test_the_heads_phase_changes_no_backbone_parameter(interrupted, published):
    first, second, _ = interrupted
    assert first.iterations == 3 and state_of(first.checkpoint).phase == "heads"
    assert second.iterations == 6 and state_of(second.checkpoint).phase == "warmup"
    theirs = open_package(published[2]).state_dict()
    ours = weights(first.checkpoint)
    assert all(torch.equal(ours[k], v) for k, v in backbone_of(theirs).items())
    assert not all(torch.equal(ours[k], theirs[k]) for k in theirs if k.startswith("heads."))
    later = weights(second.checkpoint)  # the warmup phase trains the backbone
    assert not all(torch.equal(later[k], v) for k, v in backbone_of(theirs).items())


def test_resuming_mid_heads_and_mid_warmup_reproduces_the_uninterrupted_run(interrupted, uninterrupted):
    final = interrupted[2]
    assert final.iterations == uninterrupted.iterations == 10
    a, b = weights(final.checkpoint), weights(uninterrupted.checkpoint)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, f"weights differ by up to {worst}"
    assert final.losses == pytest.approx(uninterrupted.losses, abs=1e-5)


def test_the_logged_lr_follows_the_phases_and_the_run_records_its_parent(uninterrupted, published):
    from mlflow.tracking import MlflowClient

    from multitalent.train.components import build_schedule

    storage, uri, _ = published
    assert uninterrupted.tracking_uri == uri  # one store per storage path
    client = MlflowClient(tracking_uri=uri)
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(uninterrupted.mlflow_run_id, "train/lr")
    )
    schedule = build_schedule(ft_job(storage, storage, "x"))
    assert history == [(i, pytest.approx(schedule.lr_at(i))) for i in range(10)]
    # heads: 0.01 * 1/2, 2/2; warmup: 0.05 * 1/2, 2/2; poly over 1 epoch: 0.05
    assert [v for _, v in history[::2]] == pytest.approx([0.005, 0.01, 0.025, 0.05, 0.05])
    tags = client.get_run(uninterrupted.mlflow_run_id).data.tags
    assert tags["multitalent.parent_model"] == "phantom-tiny/1"


def test_publishing_a_run_packages_its_fp32_master_weights(uninterrupted, published, tmp_path, capsys):
    from multitalent.cli import main
    from multitalent.train.publish import fp32_weights

    _, uri, _ = published
    assert main(["publish", str(uninterrupted.run_dir), "--name", "phantom-ft", "--alias", "champion"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-2:] == ["models:/phantom-ft/1", "models:/phantom-ft@champion"]
    # No progress bars in a log (stderr not a terminal): DeepSpeed's shard loading, MLflow's transfers.
    assert "%|" not in err, err
    assert (
        main(["pull", "models:/phantom-ft@champion", "--tracking-uri", uri, "--out", str(tmp_path / "cli")])
        == 0
    )
    out, err = capsys.readouterr()
    assert "verified" in out and "%|" not in err, err
    pkg = pull("models:/phantom-ft@champion", tmp_path / "ft", tracking_uri=uri)
    assert pkg.version == "1"
    ours = pkg.state_dict()
    master = fp32_weights(uninterrupted.checkpoint)
    assert ours.keys() == master.keys() and all(torch.equal(ours[k], master[k]) for k in ours)
    on_disk = weights(uninterrupted.checkpoint)  # fp32 run: the module weights are the master weights
    assert all(torch.equal(ours[k], on_disk[k]) for k in ours)
    card = (pkg.folder / "MODEL_CARD.md").read_text()
    assert "parent model: phantom-tiny/1" in card and uninterrupted.mlflow_run_id in card
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=uri).get_model_version("phantom-ft", "1").tags
    assert tags["multitalent.parent"] == "phantom-tiny/1"


# ------------------------------------------------------------------------------ bf16 / ZeRO-3, in process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_weights_published_are_deepspeeds_consolidated_fp32(stage, tmp_path):
    """Run in a subprocess (its own gloo group): a bf16 engine steps twice, saves a checkpoint; the
    weights publishing reads equal ``safe_get_full_fp32_param`` of every parameter, not the bf16 module."""
    import subprocess
    import sys

    script = tmp_path / "bf16.py"
    script.write_text(BF16_SCRIPT)
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO / "platform"),
    }
    out = subprocess.run(
        [sys.executable, str(script), str(stage), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {
        "equal_master": True,
        "differs_from_bf16": True,
        "package_equal": True,
        "dtype": "float32",
    }


BF16_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from deepspeed.utils import safe_get_full_fp32_param
from multitalent.catalog import load_preset
from multitalent.distributed.engine import build_engine
from multitalent.models import build_network
from multitalent.preprocess.plan import Plan
from multitalent.train.publish import fp32_weights
from multitalent.registry.package import ModelCard, open_package, write_package

stage, out = int(sys.argv[1]), Path(sys.argv[2])
catalog = load_preset("phantom")
torch.manual_seed(0)
model = build_network("unet", catalog.classes_per_dataset(), size="tiny", patch_size_zyx=(16, 32, 32))
config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "gradient_clipping": 12.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
          "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
engine = build_engine(model, sgd, config=config, use_gpu=False)
x = torch.randn(1, 1, 16, 32, 32, dtype=torch.bfloat16)
for _ in range(2):
    engine.backward(sum(o.float().square().mean() for o in engine(x)))
    engine.step()
master = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in engine.module.named_parameters()}
engine.save_checkpoint(str(out / "ckpt"), tag="deepspeed")
published = fp32_weights(out / "ckpt")
fresh = build_network("unet", catalog.classes_per_dataset(), size="tiny", patch_size_zyx=(16, 32, 32))
write_package(out / "pkg", model=fresh, state_dict=published, plan=Plan.for_catalog(catalog), catalog=catalog,
              card=ModelCard(cases={}, validation={}, training={}))
pkg_state = open_package(out / "pkg").tensors()
if stage == 3:
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        bf16 = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
else:
    bf16 = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
json.dump({
    "equal_master": all(torch.equal(published[n], master[n]) for n in master),
    "differs_from_bf16": any(not torch.equal(published[n], bf16[n]) for n in master),
    "package_equal": all(torch.equal(pkg_state[n], master[n]) for n in master),
    "dtype": str(next(iter(pkg_state.values())).dtype).removeprefix("torch."),
}, open(out / "result.json", "w"))
"""
