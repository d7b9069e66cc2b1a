"""bench/gpu_levers.py at a tiny size on the CPU: every row runs or says why not, and every lever that runs
computes the baseline's loss and gradients (the table the GPU run prints, checked before a GPU is lent)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def levers():
    sys.path.insert(0, str(REPO / "bench"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    try:
        yield importlib.import_module("gpu_levers")
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(REPO / "bench"))


TINY = ["--device=cpu", "--small", "--patch=16,32,32", "--archs=unet", "--warmup=0", "--reps=1"]


@pytest.mark.slow
def test_levers_table_on_cpu(levers, capsys):
    rows = levers.run(
        [*TINY, "--compile-backend=aot_eager", "--budget-s=600"]  # aot_eager: dynamo + AOT autograd, no C++
    )
    out = capsys.readouterr().out
    assert [r.row for r in rows] == list(levers.DEFAULT_ROWS)
    for r in rows:
        assert f"| unet | {r.row} |" in out
        if r.row == "cuda_graphs":
            assert r.status == "skipped: CUDA graphs need a CUDA device"
            continue
        if r.row == "fused_sgd" and r.status.startswith("skipped"):
            continue  # a torch build without the fused CPU kernel
        assert r.status == "ok", (r.row, r.status)
        assert r.ms > 0 and r.tflops > 0
        if r.row == "baseline":
            assert r.check == "reference"
        elif r.row == "trivial_loss":
            assert r.check == "n/a"
        else:
            assert r.check == "pass", (r.row, r.loss_rel, r.grad_rel)
            assert r.loss_rel <= 1e-4 and r.grad_rel <= 1e-3
    compiled = [r for r in rows if r.row.startswith("compile")]
    assert compiled and all("0 graph break(s)" in r.note for r in compiled), [r.note for r in compiled]
    assert "levers table" in out and "the loss's share of the baseline step" in out
    from multitalent.losses import voxel_sums

    assert voxel_sums.VISIT_ALL_ROWS is False  # the all_loss_rows row restored the default


def test_row_names(levers):
    assert levers.parse_row("baseline") == frozenset()
    assert levers.parse_row("compile_step+fused_sgd") == {"compile_step", "fused_sgd"}
    with pytest.raises(ValueError, match="unknown lever"):
        levers.parse_row("compile_everything")
    with pytest.raises(ValueError, match="exclude each other"):
        levers.parse_row("fused_sgd+forloop_sgd")


@pytest.mark.slow
def test_failing_lever_prints_its_error_and_the_table_goes_on(levers, monkeypatch, capsys):
    real = levers.make_step

    def broken(a, lever_set, net, opt):
        if "channels_last" in lever_set:
            raise RuntimeError("planted failure")
        return real(a, lever_set, net, opt)

    monkeypatch.setattr(levers, "make_step", broken)
    rows = levers.run([*TINY, "--rows=baseline,channels_last,forloop_sgd"])
    by = {r.row: r for r in rows}
    assert by["channels_last"].status == "error: RuntimeError: planted failure"
    assert by["forloop_sgd"].status == "ok" and by["forloop_sgd"].check == "pass"
    assert "planted failure" in capsys.readouterr().out
