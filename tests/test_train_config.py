"""Training configuration without Ray: job validation, DeepSpeed config derivation, the poly schedule,
checkpoint manifests and verification on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multitalent.distributed.deepspeed_config import (
    DeepSpeedConfigError,
    DeepSpeedSettings,
    derive_deepspeed_config,
    resolve_precision,
)
from multitalent.jobs import JobError
from multitalent.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainerState,
    checkpoint_dir_name,
    choose_resume,
    order_candidates,
    parse_dir_name,
    run_checkpoints,
    verify_checkpoint,
    write_rank_manifest,
)
from multitalent.train.components import deepspeed_config
from multitalent.train.job import TrainJob, load_train_job
from multitalent.train.schedule import PolySchedule, build_optimizer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "jobs" / "pretrain.yaml"


# ----------------------------------------------------------------------------- job files
def test_pretrain_job_is_the_paper_setting():
    job = load_train_job(PRETRAIN)
    assert job.catalog == "multitalent13" and job.architecture.size == "paper"
    assert job.architecture.patch_zyx == [96, 192, 192] and job.architecture.deep_supervision
    o = job.optimiser
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.grad_clip) == (
        "sgd",
        0.01,
        0.99,
        True,
        3e-5,
        12.0,
    )
    assert (job.schedule.epochs, job.schedule.iterations_per_epoch, job.schedule.poly_exponent) == (
        2000,
        250,
        0.9,
    )
    assert job.batch.global_size == 4 and job.workers.num_workers == 2 and job.micro_batch == 2
    assert job.workers.use_gpu and job.precision == "auto"


def test_swin_unetr_trains_as_the_reference_unless_the_job_says_otherwise():
    swin = load_train_job(PRETRAIN, ["architecture.arch=swin_unetr"])
    o = swin.optimiser
    assert (o.name, o.lr, o.eps, o.weight_decay) == ("adamw", 5e-4, 1e-4, 3e-5)
    assert swin.architecture.checkpointing  # gradient checkpointing on, as in the paper
    cnn = load_train_job(PRETRAIN)
    assert (cnn.optimiser.name, cnn.optimiser.lr, cnn.optimiser.eps) == ("sgd", 1e-2, 1e-8)
    assert not cnn.architecture.checkpointing
    told = load_train_job(
        PRETRAIN,
        ["architecture.arch=swin_unetr", "optimiser.name=sgd", "architecture.gradient_checkpointing=false"],
    )
    assert (told.optimiser.name, told.optimiser.lr) == ("sgd", 1e-2) and not told.architecture.checkpointing
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], swin.optimiser)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["eps"] == 1e-4 and optimizer.defaults["lr"] == 5e-4


def test_the_job_file_selects_the_loss_reading_and_the_oversampling_mode(tmp_path):
    from multitalent.catalog import load_catalog
    from multitalent.data.sources import ZarrPatchSource
    from multitalent.train.components import DataSetup, zarr_source

    job = load_train_job(PRETRAIN, ["loss.reduction=sum", "loss.dice=sample", "data.fg_mode=coin"])
    assert (job.loss.reduction, job.loss.dice, job.data.fg_mode) == ("sum", "sample", "coin")
    assert load_train_job(PRETRAIN).data.fg_mode == "fixed"  # the paper jobs force round(B/3) per batch
    with pytest.raises(JobError, match=r"loss\.reduction"):
        load_train_job(PRETRAIN, ["loss.reduction=median"])
    catalog = load_catalog("phantom")
    from multitalent.train.step import MultiTalentObjective

    objective = MultiTalentObjective(catalog, n_levels=2, dice=job.loss.dice, reduction=job.loss.reduction)
    inner = objective.loss.loss
    assert (inner.dice, inner.reduction) == ("sample", "sum")
    fixed = load_train_job(PRETRAIN, ["catalog=phantom"])
    from multitalent.preprocess.plan import Plan

    setup = DataSetup(
        tmp_path, catalog, Plan.for_catalog(catalog), [{"dataset_id": "P01", "case_id": "a"}], []
    )
    source = zarr_source(
        fixed, setup, cases=setup.train_cases, patch_zyx=(8, 8, 8), batch_size=2, rank=1, world_size=2
    )
    assert isinstance(source, ZarrPatchSource) and source.fg_mode == "fixed"


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("optimiser.momentun=0.9", "optimiser.momentun"),  # unknown key
        ("zero_stage=4", "zero_stage"),
        ("zero_stage='1'", "zero_stage"),  # a string is not an int (strict)
        ("workers.placement_strategy=ANYWHERE", "workers.placement_strategy"),
        ("checkpoint.keep=1", "checkpoint.keep"),  # a corrupt latest checkpoint needs a predecessor
        ("architecture.patch_zyx=[96, 192]", "architecture"),
    ],
)
def test_bad_job_values_are_errors_naming_the_field(override, where):
    with pytest.raises(JobError, match=rf"pretrain\.yaml: invalid job(.|\n)*{where}"):
        load_train_job(PRETRAIN, [override])


def test_global_batch_must_divide_over_the_workers():
    with pytest.raises(JobError, match=r"global_size 4 is not divisible by workers\.num_workers 3"):
        load_train_job(PRETRAIN, ["workers.num_workers=3"])


def test_tiny_job_extends_pretrain_and_overrides_only_what_it_sets():
    job = load_train_job(REPO / "jobs" / "pretrain_cpu_tiny.yaml")
    assert job.catalog == "phantom" and job.architecture.size == "tiny" and not job.workers.use_gpu
    assert job.workers.resources_per_worker == {"CPU": 1.0}
    assert job.optimiser.momentum == 0.99  # inherited
    assert job.micro_batch == 1


# ----------------------------------------------------------------------------- DeepSpeed config
def test_deepspeed_config_is_derived_from_the_job():
    gpu = deepspeed_config(load_train_job(PRETRAIN, ["zero_stage=2"]))
    assert gpu["train_micro_batch_size_per_gpu"] == 2 and gpu["train_batch_size"] == 4
    assert gpu["gradient_accumulation_steps"] == 1 and gpu["gradient_clipping"] == 12.0
    assert gpu["zero_optimization"] == {"stage": 2} and gpu["bf16"] == {"enabled": True}
    assert gpu["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in gpu and "scheduler" not in gpu
    cpu = deepspeed_config(
        load_train_job(PRETRAIN, ["workers.use_gpu=false", "workers.resources_per_worker=null"])
    )
    assert cpu["bf16"] == {"enabled": False}
    assert (
        resolve_precision("auto", use_gpu=True) == "bf16"
        and resolve_precision("auto", use_gpu=False) == "fp32"
    )
    assert resolve_precision("bf16", use_gpu=False) == "bf16"


def test_deepspeed_passthrough_adds_options_that_are_not_derived():
    job = load_train_job(
        PRETRAIN, ["deepspeed.zero_optimization.overlap_comm=true", "deepspeed.prescale_gradients=false"]
    )
    config = deepspeed_config(job)
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert config["prescale_gradients"] is False


@pytest.mark.parametrize(
    ("override", "key", "source"),
    [
        (
            "deepspeed.train_micro_batch_size_per_gpu=2",
            "deepspeed.train_micro_batch_size_per_gpu",
            "batch.global_size",
        ),
        ("deepspeed.gradient_clipping=1.0", "deepspeed.gradient_clipping", "optimiser.grad_clip"),
        ("deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage", "zero_stage"),
        ("deepspeed.bf16.enabled=false", "deepspeed.bf16.enabled", "precision"),
        ("deepspeed.train_batch_size=8", "deepspeed.train_batch_size", "batch.global_size"),
        ("deepspeed.steps_per_print=10", "deepspeed.steps_per_print", r"\(never: the trainer logs"),
    ],
)
def test_deriving_a_value_twice_is_an_error_naming_the_key(override, key, source):
    job = load_train_job(PRETRAIN, [override])
    with pytest.raises(DeepSpeedConfigError, match=rf"{key}: derived from the job \({source}"):
        deepspeed_config(job)


def test_deepspeed_settings_are_plain_values_without_a_job():
    settings = DeepSpeedSettings(global_batch=8, micro_batch=2, grad_clip=1.0, zero_stage=3, precision="bf16")
    config = derive_deepspeed_config(settings)
    assert config["train_batch_size"] == 8 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"] == {"stage": 3} and config["bf16"] == {"enabled": True}
    with pytest.raises(DeepSpeedConfigError, match=r"gradient_clipping: derived from the job \(grad_clip"):
        derive_deepspeed_config(
            DeepSpeedSettings(
                global_batch=8,
                micro_batch=2,
                grad_clip=1.0,
                zero_stage=1,
                passthrough={"gradient_clipping": 2},
            )
        )


@pytest.mark.parametrize("section", ["optimizer", "scheduler", "fp16"])
def test_trainer_owned_sections_are_refused(section):
    job = load_train_job(PRETRAIN, [f"deepspeed.{section}.type=x"])
    with pytest.raises(DeepSpeedConfigError, match=rf"deepspeed\.{section}: not allowed"):
        deepspeed_config(job)


# ----------------------------------------------------------------------------- schedule, optimiser
def test_poly_schedule_steps_at_epoch_starts():
    s = PolySchedule(base_lr=0.01, epochs=4, iterations_per_epoch=10, exponent=0.9)
    assert [s.lr_at(i) for i in (0, 9)] == [0.01, 0.01]
    assert s.lr_at(10) == pytest.approx(0.01 * 0.75**0.9)
    assert s.lr_at(39) == pytest.approx(0.01 * 0.25**0.9)
    assert s.lr_at(40) == 0.0  # past the end
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainJob().optimiser)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert s.apply(optimizer, 25) == pytest.approx(0.01 * 0.5**0.9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    s.check_state(s.state_dict(), where="ckpt")
    with pytest.raises(ValueError, match="ckpt: the checkpoint's schedule"):
        s.check_state({**s.state_dict(), "epochs": 5}, where="ckpt")


@pytest.mark.parametrize("at_epoch_ends", [True, False])
def test_checkpoints_come_every_n_iterations_after_validation_and_optionally_at_epoch_ends(at_epoch_ends):
    from multitalent.train.cadence import Cadence

    job = load_train_job(
        PRETRAIN,
        [
            "schedule.epochs=6",
            "schedule.iterations_per_epoch=10",
            "checkpoint.every_iterations=25",
            f"checkpoint.at_epoch_ends={str(at_epoch_ends).lower()}",
            "validation.every_epochs=4",
        ],
    )
    cadence = Cadence.of(job)
    due = [i + 1 for i in range(job.schedule.total_iterations) if cadence.checkpoint_due(i)]
    # every 25; validation after epochs 4 and 6 (the last); with at_epoch_ends every 10 as well
    assert due == ([10, 20, 25, 30, 40, 50, 60] if at_epoch_ends else [25, 40, 50, 60])


def test_adamw_option():
    job = load_train_job(
        PRETRAIN, ["optimiser.name=adamw", "optimiser.lr=0.0001", "architecture.arch=swin_unetr"]
    )
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], job.optimiser)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-4


# ----------------------------------------------------------------------------- checkpoints
def fake_checkpoint(run_dir: Path, iteration: int, attempt: str = "abc123", world_size: int = 2) -> Path:
    """A checkpoint folder as Ray merges it: each rank's files plus its manifest."""
    folder = run_dir / checkpoint_dir_name(iteration, attempt)
    for rank in range(world_size):
        part = run_dir / "parts" / f"{iteration}-{attempt}-{rank}"
        (part / "deepspeed").mkdir(parents=True)
        (part / "deepspeed" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(
            bytes(range(256)) * (rank + 3)
        )
        (part / f"rank-{rank}.rng.pt").write_bytes(b"rng" * (rank + 1))
        if rank == 0:
            state = TrainerState(iteration=iteration, world_size=world_size, attempt=attempt)
            (part / STATE_FILE).write_text(state.to_json())
        write_rank_manifest(part, rank)
        for f in part.rglob("*"):
            if f.is_file():
                target = folder / f.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                f.replace(target)
    return folder


def test_a_complete_checkpoint_verifies(tmp_path):
    folder = fake_checkpoint(tmp_path, 30)
    state = verify_checkpoint(folder)
    assert state.iteration == 30 and state.world_size == 2
    manifest = json.loads((folder / "rank-1.sha256.json").read_text())
    assert set(manifest["files"]) == {"deepspeed/zero_pp_rank_1_optim_states.pt", "rank-1.rng.pt"}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: _flip(f / "deepspeed" / "zero_pp_rank_1_optim_states.pt"), "fails its SHA-256 check"),
        (lambda f: (f / "rank-0.rng.pt").write_bytes(b"r"), r"has 1 bytes, rank 0 wrote 3"),  # truncated
        (lambda f: (f / "deepspeed" / "zero_pp_rank_0_optim_states.pt").unlink(), "is missing"),
        (lambda f: (f / "rank-1.sha256.json").unlink(), "rank 1's manifest rank-1.sha256.json is missing"),
        (lambda f: (f / "rank-0.sha256.json").write_text("{"), "unreadable manifest"),
        (lambda f: (f / STATE_FILE).unlink(), "no trainer_state.json"),
        (lambda f: (f / STATE_FILE).write_text('{"iteration": 1, "bogus": 2}'), "invalid trainer_state.json"),
    ],
)
def test_damaged_checkpoints_fail_verification_with_the_reason(tmp_path, damage, reason):
    folder = fake_checkpoint(tmp_path, 30)
    damage(folder)
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(folder)


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path):
    old = fake_checkpoint(tmp_path, 10)
    mid = fake_checkpoint(tmp_path, 20)
    new = fake_checkpoint(tmp_path, 30)
    (tmp_path / "not-a-checkpoint").mkdir()
    assert run_checkpoints(tmp_path) == [new, mid, old]
    assert parse_dir_name(new.name) == 30 and parse_dir_name("checkpoint_000001") is None

    _flip(new / "deepspeed" / "zero_pp_rank_1_optim_states.pt")
    choice = choose_resume(order_candidates(new, run_checkpoints(tmp_path)))
    assert choice.folder == mid.resolve() and choice.state is not None and choice.state.iteration == 20
    assert len(choice.rejected) == 1 and new.name in choice.rejected[0]

    for folder in (mid, old):
        (folder / "rank-0.sha256.json").unlink()
    nothing = choose_resume(run_checkpoints(tmp_path))
    assert nothing.folder is None and len(nothing.rejected) == 3


def test_rays_latest_goes_first_among_equal_iterations(tmp_path):
    a = fake_checkpoint(tmp_path, 30, attempt="aaaaaa")
    b = fake_checkpoint(tmp_path, 30, attempt="bbbbbb")
    c = fake_checkpoint(tmp_path, 20)
    assert order_candidates(a, [b, a, c]) == [a, b, c]
    assert order_candidates(b, [a, b, c]) == [b, a, c]


def test_a_relative_catalog_file_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    # Ray workers run in other directories: a job naming its catalog file relative to where the
    # command runs must still load it there (it used to fail inside the workers).
    from multitalent.catalog import load_catalog
    from multitalent.train.launch import absolute_paths

    phantom = load_catalog("phantom")
    data = phantom.to_dict()
    data.pop("hash")
    data["name"] = "mine"
    data["datasets"] = [d for d in data["datasets"] if d["id"] in ("P04", "P05")]
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "mine.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    job = load_train_job(
        Path(__file__).parents[1] / "jobs" / "pretrain_cpu_tiny.yaml", ["catalog=cats/mine.json"]
    )
    fixed = absolute_paths(job)
    assert fixed.catalog == str(tmp_path / "cats" / "mine.json")
    monkeypatch.chdir(tmp_path / "cats")  # elsewhere, as a worker
    assert [d.id for d in load_catalog(fixed.catalog).datasets] == ["P04", "P05"]
    monkeypatch.chdir(tmp_path)
    both = absolute_paths(job.model_copy(update={"catalog": "phantom+cats/mine.json"}))
    assert both.catalog == f"phantom+{tmp_path / 'cats' / 'mine.json'}"
    assert absolute_paths(job.model_copy(update={"catalog": "phantom"})).catalog == "phantom"
