"""The DeepSpeed engine as the trainer builds it, in this process (world size 1, gloo): the poly
schedule's rate reaches the optimizer under every ZeRO stage, and the consolidated weights match."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multitalent.distributed.engine import build_engine, full_state_dict
from multitalent.train.components import deepspeed_config
from multitalent.train.job import load_train_job
from multitalent.train.schedule import PolySchedule, build_optimizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def process_group(gloo_group):
    """A one-process gloo group (tests/conftest.py ``gloo_group``)."""
    yield


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_scheduled_rate_reaches_the_optimizer(process_group, stage):
    job = load_train_job(
        REPO / "jobs" / "pretrain_cpu_tiny.yaml",
        [f"zero_stage={stage}", "workers.num_workers=1", "batch.global_size=1", "optimiser.lr=0.5"],
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    engine = build_engine(
        model,
        build_optimizer(model.parameters(), job.optimiser),
        config=deepspeed_config(job),
        use_gpu=False,
    )
    schedule = PolySchedule(0.5, epochs=2, iterations_per_epoch=1, exponent=1.0)
    x = torch.randn(3, 4)

    def step(iteration: int) -> dict[str, torch.Tensor]:
        before = full_state_dict(engine, zero_stage=stage)
        assert before is not None
        schedule.apply(engine.optimizer, iteration)
        engine.backward(engine(x).square().mean())
        engine.step()
        return before

    before = step(2)  # epoch 2 of 2: lr 0, so nothing moves (weight decay scales with lr too)
    after = full_state_dict(engine, zero_stage=stage)
    assert after is not None and all(torch.equal(before[k], after[k]) for k in before)
    assert engine.get_lr() == [0.0]
    before = step(0)  # lr 0.5
    after = full_state_dict(engine, zero_stage=stage)
    assert after is not None and any(not torch.equal(before[k], after[k]) for k in before)
    assert engine.get_lr() == [0.5]
    assert set(after) == set(model.state_dict()) and all(v.dtype == torch.float32 for v in after.values())
