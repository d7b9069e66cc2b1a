"""The partial-label loss (paper Eq. 2), deep supervision and target construction.

Expected values come from closed forms or from a plain-python transcription of the formula (``_ref_loss``),
never from the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalent.catalog import load_preset
from multitalent.losses import (
    DeepSupervisionLoss,
    LabelTargets,
    PartialLabelLoss,
    deep_supervision_weights,
    downsample_labels,
    downsample_targets,
    targets_from_labels,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- plain-python reference
def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, y: float) -> float:
    p = _sig(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _ref_loss(logits, target, annotated, dice="batch", eps=1e-7, reduction="mean") -> float:
    """Eq. 2 on nested lists: logits[b][k] and target[b][k] are flat voxel lists, annotated[b][k] bools.

    ``reduction="sum"``: the per-sample BCE (a voxel mean) and, in sample mode, the per-sample Dice are
    summed over the annotated samples instead of averaged (the reference code)."""
    total = 0.0
    for k in range(len(logits[0])):
        samples = [b for b in range(len(logits)) if annotated[b][k]]
        if not samples:
            continue
        # 1/I with I = (annotated samples) x (voxels per sample)
        voxels = [(x, y) for b in samples for x, y in zip(logits[b][k], target[b][k])]
        bce = sum(_bce(x, y) for x, y in voxels) / len(voxels)
        if reduction == "sum":
            bce = sum(
                sum(_bce(x, y) for x, y in zip(logits[b][k], target[b][k])) / len(logits[b][k])
                for b in samples
            )

        def dice_of(pairs):
            tp = sum(_sig(x) * y for x, y in pairs)
            fp = sum(_sig(x) * (1 - y) for x, y in pairs)
            fn = sum((1 - _sig(x)) * y for x, y in pairs)
            return 2 * tp / max(2 * tp + fp + fn, eps)

        if dice == "batch":
            d = dice_of(voxels)
        else:
            d = sum(dice_of(list(zip(logits[b][k], target[b][k]))) for b in samples)
            if reduction == "mean":
                d /= len(samples)
        total += bce - d
    return total


def _lists(logits, target, annotated):
    b, k = logits.shape[:2]
    return (
        logits.reshape(b, k, -1).tolist(),
        target.reshape(b, k, -1).double().tolist(),
        annotated.tolist(),
    )


def _case(seed: int, b: int = 2, k: int = 3, spatial=(2, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, *spatial, generator=g, dtype=torch.float64) * 2
    target = torch.rand(b, k, *spatial, generator=g) < 0.4
    annotated = torch.rand(b, k, generator=g) < 0.6
    annotated[0, 0] = True  # at least one annotated class
    return logits, target, annotated


def _as_labels(target: torch.Tensor) -> LabelTargets:
    """Any binary (B, K, *spatial) target (K <= 8) as :class:`LabelTargets` of one dataset whose raw value
    ``v`` is the bit mask of the classes present: ``lut[0, v, k] = bit k of v``."""
    b, k = target.shape[:2]
    weights = (2 ** torch.arange(k)).reshape(1, k, *[1] * (target.ndim - 2))
    label = (target.long() * weights).sum(1).to(torch.uint8)
    lut = ((torch.arange(2**k)[:, None] >> torch.arange(k)[None, :]) & 1).bool()[None]
    made = LabelTargets.make(label, torch.zeros(b, dtype=torch.long), lut)
    assert torch.equal(made.dense(), target.bool())
    return made


def _targets(kind: str, target: torch.Tensor):
    return target if kind == "dense" else _as_labels(target)


# ---------------------------------------------------------------------------------------- the loss
def test_zero_logits_closed_form_value_and_gradient():
    # p = 1/2 everywhere: BCE = ln 2 per voxel; tp = m/2, 2tp + fp + fn = sum p + sum y = n/2 + m, so
    # Dice = 2m / (2m + n) with m foreground voxels among the n annotated voxels of the class.
    target = torch.zeros(2, 3, 2, 2, 2, dtype=torch.uint8)
    target[0, 0, 0, 0, :] = 1  # class 0: 2 voxels in sample 0
    target[1, 0, 1, 1, 1] = 1  # ... and 1 in sample 1 (not annotated there: ignored)
    target[0, 1, 0] = 1  # class 1: 4 voxels in sample 0
    target[1, 1, :, 0, 0] = 1  # ... and 2 in sample 1
    target[1, 2, 0, 0, 0] = 1  # class 2: never annotated
    annotated = torch.tensor([[True, True, False], [False, True, False]])
    logits = torch.zeros(2, 3, 2, 2, 2, requires_grad=True)

    loss, metrics = PartialLabelLoss()(logits, target, annotated)

    dice0 = 2 * 2 / (2 * 2 + 8)  # m=2, n=8
    dice1 = 2 * 6 / (2 * 6 + 16)  # m=6, n=16
    expected = (LN2 - dice0) + (LN2 - dice1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["dice_k"].tolist() == pytest.approx([dice0, dice1, 0.0], abs=1e-6)
    assert metrics["bce_k"].tolist() == pytest.approx([LN2, LN2, 0.0], abs=1e-6)
    assert metrics["annotated_k"].tolist() == [1, 2, 0]
    assert metrics["num_annotated_classes"].item() == 2

    loss.backward()
    grad = logits.grad
    assert grad is not None
    # d/dx = p(1-p) d/dp = 1/4 d/dp; dBCE_k/dp = (p - y) / (I p (1-p)); dDice/dp = (2y D - 2tp) / D^2.
    for k, (m, n) in enumerate([(2, 8), (6, 16)]):
        d, tp = n / 2 + m, m / 2
        for b in range(2):
            if not annotated[b, k]:
                continue
            for idx in np.ndindex(2, 2, 2):
                y = float(target[b, k][idx])
                want = (0.5 - y) / n - 0.25 * (2 * y * d - 2 * tp) / d**2
                assert grad[b, k][idx].item() == pytest.approx(want, abs=1e-7)
    assert torch.all(grad[~annotated] == 0)


@pytest.mark.parametrize("targets", ["dense", "labels"])
@pytest.mark.parametrize("chunk", [2**25, 60])  # 60 elements = 5 of the 12 (b, k) rows: chunks 5, 5, 2
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dice", ["batch", "sample"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_plain_python_formula(seed, dice, reduction, chunk, targets):
    logits, target, annotated = _case(seed, b=3, k=4, spatial=(2, 3, 2))
    fn = PartialLabelLoss(dice=dice, reduction=reduction, chunk_elements=chunk)
    loss, metrics = fn(logits, _targets(targets, target), annotated)
    assert loss.dtype == torch.float64
    want = _ref_loss(*_lists(logits, target, annotated), dice=dice, reduction=reduction)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(metrics["loss_k"], metrics["bce_k"] - metrics["dice_k"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("targets", ["dense", "labels"])
@pytest.mark.parametrize("chunk", [2**25, 16])  # 16 elements = 4 of the 6 (b, k) rows: chunks 4, 2
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dice", ["batch", "sample"])
def test_gradient_matches_finite_differences(dice, reduction, chunk, targets):
    logits, target, annotated = _case(7, b=2, k=3, spatial=(2, 2, 1))
    logits.requires_grad_(True)
    fn = PartialLabelLoss(dice=dice, reduction=reduction, chunk_elements=chunk)
    t = _targets(targets, target)
    assert torch.autograd.gradcheck(
        lambda x: fn(x, t, annotated)[0], (logits,), eps=1e-6, atol=1e-8, rtol=1e-6
    )


def test_non_annotated_entries_give_exactly_zero_loss_and_gradient_even_if_nan():
    logits, target, annotated = _case(11, b=2, k=3, spatial=(2, 2, 2))
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    clean = torch.where(annotated[..., None, None, None], logits, 0.0).requires_grad_(True)
    dirty = logits.clone()
    dirty[0, 1] = float("nan")
    dirty[1, 0] = float("inf")
    dirty[1, 2] = -1e30
    dirty.requires_grad_(True)
    noisy_target = target.clone()
    noisy_target[~annotated] = True  # targets of unannotated pairs are irrelevant too

    fn = PartialLabelLoss(chunk_elements=16)  # two (b, k) rows per chunk
    loss_clean, m_clean = fn(clean, target, annotated)
    loss_dirty, m_dirty = fn(dirty, noisy_target, annotated)
    assert torch.isfinite(loss_dirty)
    assert loss_dirty.item() == loss_clean.item()
    loss_dirty.backward()
    loss_clean.backward()
    assert dirty.grad is not None and clean.grad is not None
    assert torch.all(dirty.grad[~annotated] == 0)
    assert torch.equal(dirty.grad[annotated], clean.grad[annotated])
    assert torch.all(dirty.grad[annotated].abs().sum((-1, -2, -3)) > 0)
    for key in ("tp_k", "fp_k", "fn_k", "tp_hard_k", "fp_hard_k", "fn_hard_k"):
        assert torch.equal(m_dirty[key], m_clean[key]), key


@pytest.mark.parametrize(
    ("flags", "rows", "expected"),
    [
        ([1, 1, 0, 0, 1, 1, 1], 2, [(0, 2), (4, 6), (6, 7)]),
        ([0, 0, 0], 4, []),
        ([1, 1, 1, 1], 3, [(0, 3), (3, 4)]),
        ([0, 1, 0, 1], 5, [(1, 2), (3, 4)]),
    ],
)
def test_only_annotated_rows_are_visited(flags, rows, expected):
    from multitalent.losses.voxel_sums import annotated_chunks

    assert annotated_chunks(torch.tensor(flags, dtype=torch.bool), rows) == expected


def test_a_batch_annotating_nothing_costs_nothing_and_gives_zero():
    logits, target, _ = _case(5, b=2, k=3, spatial=(2, 2, 2))
    logits.requires_grad_(True)
    loss, metrics = PartialLabelLoss()(logits, target, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and int(metrics["num_annotated_classes"]) == 0
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_compiled_loss_has_no_graph_break_and_equals_eager_with_nan_in_unannotated_rows():
    """Under torch.compile the pass visits every row and masks (no host read of ``annotated``)."""
    logits, target, _ = _case(13, b=2, k=4, spatial=(2, 3, 3))
    annotated = torch.tensor([[True, True, False, False], [False, False, True, False]])
    logits[~annotated] = float("nan")
    fn = PartialLabelLoss(chunk_elements=36)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    results = []
    for loss_fn in (fn, compiled):
        x = logits.clone().requires_grad_(True)
        loss, _ = loss_fn(x, target, annotated)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (l_eager, g_eager), (l_compiled, g_compiled) = results
    assert torch.isfinite(l_eager) and torch.isfinite(l_compiled)
    torch.testing.assert_close(l_compiled, l_eager)
    assert g_compiled is not None and g_eager is not None
    torch.testing.assert_close(g_compiled, g_eager)
    assert torch.all(g_compiled[~annotated] == 0)


def test_classes_are_summed_not_averaged():
    logits, target, annotated = _case(5, b=2, k=3, spatial=(2, 2, 2))
    annotated = torch.tensor([[True, True, False], [True, False, True]])
    fn = PartialLabelLoss()
    base = logits.clone().requires_grad_(True)
    loss, metrics = fn(base, target, annotated)
    loss.backward()

    # one more class, annotated by nobody: nothing changes, not the value, not the other gradients
    extra = torch.cat([logits, torch.randn(2, 1, 2, 2, 2, dtype=torch.float64) * 5], 1).requires_grad_(True)
    extra_t = torch.cat([target, torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)], 1)
    extra_a = torch.cat([annotated, torch.zeros(2, 1, dtype=torch.bool)], 1)
    loss_extra, _ = fn(extra, extra_t, extra_a)
    loss_extra.backward()
    assert loss_extra.item() == loss.item()
    assert torch.equal(extra.grad[:, :3], base.grad)  # type: ignore[index]

    # duplicating an annotated class adds its whole term once more; its gradient is unchanged
    dup = torch.cat([logits, logits[:, 1:2]], 1).requires_grad_(True)
    dup_t = torch.cat([target, target[:, 1:2]], 1)
    dup_a = torch.cat([annotated, annotated[:, 1:2]], 1)
    loss_dup, _ = fn(dup, dup_t, dup_a)
    loss_dup.backward()
    assert loss_dup.item() == pytest.approx(loss.item() + metrics["loss_k"][1].item(), abs=1e-12)
    assert torch.allclose(dup.grad[:, 3], base.grad[:, 1], atol=0, rtol=1e-12)  # type: ignore[index]
    assert torch.allclose(dup.grad[:, :3], base.grad, atol=0, rtol=1e-12)  # type: ignore[index]


def test_annotated_class_absent_from_patch():
    # class 0 annotated in both samples, no foreground anywhere: Dice 0 with zero Dice gradient, so the
    # gradient is the BCE's alone, (p - 0) / I, which pushes false positives down.
    x = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).reshape(2, 1, 2, 1, 1).requires_grad_(True)
    target = torch.zeros(2, 1, 2, 1, 1, dtype=torch.bool)
    annotated = torch.ones(2, 1, dtype=torch.bool)
    for dice in ("batch", "sample"):
        x.grad = None
        loss, metrics = PartialLabelLoss(dice=dice)(x, target, annotated)
        values = [0.5, -1.0, 2.0, 0.0]
        bce = sum(math.log1p(math.exp(v)) for v in values) / 4  # bce(x, 0) = log(1 + e^x)
        assert metrics["dice_k"].item() == 0.0
        assert loss.item() == pytest.approx(bce, abs=1e-12)
        loss.backward()
        assert x.grad is not None
        assert x.grad.flatten().tolist() == pytest.approx([_sig(v) / 4 for v in values], abs=1e-12)

    # fully confident negatives: sum(p) < eps, the clamp keeps everything finite
    far = torch.full((1, 1, 2, 2, 2), -40.0, requires_grad=True)
    loss, metrics = PartialLabelLoss()(far, torch.zeros_like(far, dtype=torch.bool), annotated[:1])
    loss.backward()
    assert torch.isfinite(loss) and metrics["dice_k"].item() == 0.0
    assert far.grad is not None and torch.all(torch.isfinite(far.grad))


def test_batch_and_sample_dice_differ_as_defined():
    # class present in sample 0 only: batch Dice pools the voxels, sample Dice averages (d0, 0)
    x = torch.tensor([3.0, -3.0, 1.0, -2.0], dtype=torch.float64).reshape(2, 1, 2, 1, 1)
    target = torch.tensor([1, 0, 0, 0], dtype=torch.uint8).reshape(2, 1, 2, 1, 1)
    annotated = torch.ones(2, 1, dtype=torch.bool)
    p = [_sig(v) for v in [3.0, -3.0, 1.0, -2.0]]
    y = [1, 0, 0, 0]
    tp = p[0]
    d0 = 2 * tp / (p[0] + p[1] + 1)
    d_batch = 2 * tp / (sum(p) + sum(y))
    bce = sum(_bce(v, t) for v, t in zip([3.0, -3.0, 1.0, -2.0], y)) / 4
    _, m_batch = PartialLabelLoss(dice="batch")(x, target, annotated)
    loss_s, m_sample = PartialLabelLoss(dice="sample")(x, target, annotated)
    assert m_batch["dice_k"].item() == pytest.approx(d_batch, abs=1e-12)
    assert m_sample["dice_k"].item() == pytest.approx(d0 / 2, abs=1e-12)
    assert loss_s.item() == pytest.approx(bce - d0 / 2, abs=1e-12)
    # both variants are always in the metrics
    assert m_batch["dice_sample_k"].item() == pytest.approx(d0 / 2, abs=1e-12)
    assert m_sample["dice_batch_k"].item() == pytest.approx(d_batch, abs=1e-12)


def test_sum_and_mean_reductions_differ_as_defined():
    # class 0 annotated in both samples, class 1 in sample 1 only: with zero logits every voxel's BCE is
    # ln 2, so the BCE term is n_k ln 2 under "sum" and ln 2 under "mean"; the sample Dice likewise.
    target = torch.zeros(2, 2, 2, 1, 1, dtype=torch.uint8)
    target[0, 0, 0] = 1  # sample 0, class 0: 1 of 2 voxels -> Dice 2 * 0.5 / (1 + 1) = 0.5
    target[1, 0] = 1  # sample 1, class 0: 2 of 2 voxels -> Dice 2 * 1 / (1 + 2) = 2/3
    annotated = torch.tensor([[True, False], [True, True]])
    logits = torch.zeros(2, 2, 2, 1, 1, dtype=torch.float64)
    d0, d1 = 0.5, 2 / 3
    d_batch = 2 * 1.5 / (2 + 3)  # tp = 3/2, sum p = 2, sum y = 3
    expected = {
        ("sum", "batch"): (2 * LN2 - d_batch) + LN2,  # paper, literal
        ("sum", "sample"): (2 * LN2 - (d0 + d1)) + LN2,  # reference code
        ("mean", "batch"): (LN2 - d_batch) + LN2,  # default
        ("mean", "sample"): (LN2 - (d0 + d1) / 2) + LN2,
    }
    for (reduction, dice), want in expected.items():
        loss, metrics = PartialLabelLoss(dice=dice, reduction=reduction)(logits, target, annotated)
        assert loss.item() == pytest.approx(want, abs=1e-12), (reduction, dice)
        # the Dice and BCE values in the metrics stay per-class means whatever the reduction
        assert metrics["bce_mean_k"].tolist() == pytest.approx([LN2, LN2], abs=1e-12)
        assert metrics["dice_sample_k"][0].item() == pytest.approx((d0 + d1) / 2, abs=1e-12)
        assert metrics["dice_batch_k"][0].item() == pytest.approx(d_batch, abs=1e-12)
    assert PartialLabelLoss().reduction == "mean" and PartialLabelLoss().dice == "batch"


def test_hard_and_soft_metrics():
    x = torch.tensor([2.0, -1.0, 0.0, 3.0, 5.0, -5.0, 1.0, -1.0]).reshape(2, 1, 4, 1, 1)
    y = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool).reshape(2, 1, 4, 1, 1)
    annotated = torch.tensor([[True], [False]])
    _, m = PartialLabelLoss()(x.requires_grad_(True), y, annotated)
    # sample 0 only: predictions (logit > 0) 1, 0, 0 (p = 0.5 is not > 0.5), 1 vs truth 1, 1, 0, 0
    assert m["tp_hard_k"].tolist() == [1.0]
    assert m["fp_hard_k"].tolist() == [1.0]
    assert m["fn_hard_k"].tolist() == [1.0]
    p = [_sig(v) for v in [2.0, -1.0, 0.0, 3.0]]
    assert m["tp_k"].item() == pytest.approx(p[0] + p[1], abs=1e-6)
    assert m["fp_k"].item() == pytest.approx(p[2] + p[3], abs=1e-6)
    assert m["fn_k"].item() == pytest.approx(2 - p[0] - p[1], abs=1e-6)
    assert all(not v.requires_grad for v in m.values())
    assert "tp_hard_k" not in PartialLabelLoss(hard_metrics=False)(x, y, annotated)[1]


def test_half_precision_logits_are_upcast():
    logits, target, annotated = _case(3, b=2, k=3, spatial=(2, 2, 2))
    half = logits.to(torch.bfloat16).requires_grad_(True)
    full = half.detach().float().requires_grad_(True)
    loss_h, _ = PartialLabelLoss()(half, target, annotated)
    loss_f, _ = PartialLabelLoss()(full, target, annotated)
    assert loss_h.dtype == torch.float32
    assert loss_h.item() == loss_f.item()
    loss_h.backward()
    loss_f.backward()
    assert half.grad is not None and full.grad is not None
    assert half.grad.dtype == torch.bfloat16
    assert torch.equal(half.grad, full.grad.to(torch.bfloat16))


def test_reduce_is_applied_before_the_ratio():
    # A fake "other rank" holding the same batch: summing the statistics twice is the loss of the
    # batch concatenated with itself, which for means and ratios is the same value.
    logits, target, annotated = _case(9, b=2, k=3, spatial=(2, 2, 2))
    calls = []

    def twice(t):
        calls.append(tuple(t.shape))
        return 2 * t

    loss, metrics = PartialLabelLoss()(logits, target, annotated, reduce=twice)
    doubled = _lists(torch.cat([logits, logits]), torch.cat([target, target]), torch.cat([annotated] * 2))
    assert len(calls) == 1
    assert loss.item() == pytest.approx(_ref_loss(*doubled), abs=1e-12)
    assert metrics["annotated_k"].tolist() == (2 * annotated.sum(0)).tolist()


def test_bad_inputs_are_rejected_with_clear_messages():
    fn = PartialLabelLoss()
    x = torch.zeros(2, 3, 2, 2, 2)
    t = torch.zeros(2, 3, 2, 2, 2, dtype=torch.bool)
    a = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"target_bkzyx shape .* raw label map"):
        fn(x, torch.zeros(2, 2, 2, 2, dtype=torch.uint8), a)
    with pytest.raises(TypeError, match="target_bkzyx must be bool, uint8 or floating"):
        fn(x, t.long(), a)
    with pytest.raises(TypeError, match="logits_bkzyx must be floating"):
        fn(x.long(), t, a)
    with pytest.raises(TypeError, match="annotated_bk must be bool"):
        fn(x, t, a.float())
    with pytest.raises(ValueError, match=r"annotated_bk shape \(3, 2\)"):
        fn(x, t, a.T)
    with pytest.raises(ValueError, match="reduce must return a tensor of shape"):
        fn(x, t, a, reduce=lambda s: s.sum(0))
    with pytest.raises(ValueError, match="dice must be"):
        PartialLabelLoss(dice="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction must be"):
        PartialLabelLoss(reduction="batch")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- deep supervision
@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [1.0]),
        (2, [1.0, 0.0]),
        (3, [2 / 3, 1 / 3, 0.0]),
        (5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0]),
        (6, [16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31, 0.0]),
    ],
)
def test_deep_supervision_weights(n, expected):
    w = deep_supervision_weights(n)
    assert w == pytest.approx(expected, abs=1e-15)
    assert sum(w) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_downsample_targets_is_nearest_exact_and_commutes_with_the_lut():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 4, 6, 8), generator=g, dtype=torch.uint8)
    lut = torch.as_tensor(load_preset("multitalent13").region_lut())
    idx = torch.tensor([0, 12])
    target = targets_from_labels(label, idx, lut)
    shapes = [(4, 6, 8), (2, 3, 4), (1, 3, 2)]
    levels = downsample_targets(target, shapes)
    assert levels[0] is target
    # factor 2: voxel 2i+1 (the one nearest the output voxel's centre); factor 4: 4i+2
    assert torch.equal(levels[1], target[:, :, 1::2, 1::2, 1::2])
    assert torch.equal(levels[2], target[:, :, 2::4, 1::2, 2::4])
    assert levels[1].dtype == torch.bool
    for lab, tgt in zip(downsample_labels(label, shapes), levels):
        assert torch.equal(targets_from_labels(lab, idx, lut), tgt)
    assert torch.equal(downsample_targets(target.float(), shapes[1:2])[0], levels[1].float())


def test_deep_supervision_loss_weights_levels_and_keeps_zero_weight_heads_in_the_graph():
    logits, target, annotated = _case(4, b=2, k=3, spatial=(4, 4, 4))
    levels = [
        logits.clone().requires_grad_(True),
        logits[:, :, ::2, ::2, ::2].clone().requires_grad_(True),
        logits[:, :, ::4, ::4, ::4].clone().requires_grad_(True),
    ]
    targets = [target, target[:, :, 1::2, 1::2, 1::2], target[:, :, 2::4, 2::4, 2::4]]
    w = deep_supervision_weights(3)
    ds = DeepSupervisionLoss(PartialLabelLoss(), w)
    loss, metrics = ds(levels, target, annotated)  # full-resolution target, downsampled inside
    expected = sum(wi * _ref_loss(*_lists(lo, t, annotated)) for wi, lo, t in zip(w, levels, targets))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["loss"].item() == loss.item()
    assert metrics["loss_level2"].item() == pytest.approx(
        _ref_loss(*_lists(levels[2], targets[2], annotated))
    )
    loss.backward()
    assert levels[2].grad is not None and torch.all(levels[2].grad == 0)
    assert levels[1].grad is not None and levels[1].grad.abs().sum() > 0

    skipping = DeepSupervisionLoss(PartialLabelLoss(), w, skip_zero_weight=True)
    fresh = [lv.detach().clone().requires_grad_(True) for lv in levels]
    loss_skip, m_skip = skipping(fresh, targets, annotated)
    loss_skip.backward()
    assert loss_skip.item() == pytest.approx(loss.item(), abs=1e-12)
    assert fresh[2].grad is None and "loss_level2" not in m_skip
    with pytest.raises(ValueError, match="3 outputs but 2 weights"):
        DeepSupervisionLoss(PartialLabelLoss(), [0.5, 0.5])(levels, target, annotated)


# ------------------------------------------------------------------------------------------ targets
def test_targets_from_labels_with_the_multitalent13_catalog():
    cat = load_preset("multitalent13")
    lut = torch.as_tensor(cat.region_lut())
    label = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2], [3, 2, 1, 0]], dtype=torch.uint8).reshape(3, 1, 2, 2)
    datasets = ["01", "13", "07"]  # liver {1,2} + tumour {2}; kidneys {1,2} + tumour {2}; BTCV one per value
    label[0, 0, 1, 1] = 0  # dataset 01 has no raw value 3
    idx = torch.tensor([cat.dataset_index(d) for d in datasets])
    target = targets_from_labels(label, idx, lut)
    assert target.shape == (3, cat.num_classes, 1, 2, 2) and target.dtype == torch.bool
    for b, d in enumerate(datasets):
        for c in cat.classes:
            want = [(c.dataset_id == d and int(v) in c.raw_values) for v in label[b].flatten().tolist()]
            assert target[b, c.index].flatten().tolist() == want, (d, c.key)
    liver = next(c.index for c in cat.classes if c.key == "01:liver")
    assert target[0, liver].flatten().tolist() == [False, True, True, False]
    # the numpy LUT is accepted too, and annotated_bk from the catalog covers exactly the targets' classes
    assert torch.equal(targets_from_labels(label, idx, cat.region_lut()), target)
    annotated = torch.as_tensor(cat.annotated_mask())[idx]
    assert not torch.any(target & ~annotated[..., None, None, None])
    with pytest.raises(TypeError, match="integer raw label values"):
        targets_from_labels(label.float(), idx, lut)
    with pytest.raises(ValueError, match="dataset_idx_b shape"):
        targets_from_labels(label, idx[:2], lut)


def test_label_targets_make_the_rows_of_targets_from_labels():
    """Any row range, spanning samples or not, in any dtype, equals the dense targets' rows; the loss and
    gradient are bit for bit those of the dense targets, with every level of a multi-dataset batch."""
    cat = load_preset("multitalent13")
    lut = torch.as_tensor(cat.region_lut())
    g = torch.Generator().manual_seed(3)
    datasets = ["01", "13", "07", "07"]
    idx = torch.tensor([cat.dataset_index(d) for d in datasets])
    highest = [int(lut[i].any(-1).nonzero().max()) for i in idx.tolist()]
    label = torch.stack([torch.randint(0, h + 1, (3, 4, 5), generator=g) for h in highest]).to(torch.uint8)
    dense = targets_from_labels(label, idx, lut)
    annotated = torch.as_tensor(cat.annotated_mask())[idx]
    made = LabelTargets.make(label, idx, lut, annotated_r=tuple(annotated.flatten().tolist()))
    assert made.shape == dense.shape and made.device == dense.device
    flat = dense.reshape(dense.shape[0] * dense.shape[1], -1)
    k = cat.num_classes
    for start, end in [
        (0, 1),
        (k - 3, k + 2),
        (5, 3 * k + 1),
        (0, 4 * k),
        (4 * k - 1, 4 * k),
        (0, 0),
        (k, k),
    ]:
        rows = made.rows(start, end, torch.float32)
        assert rows.dtype == torch.float32 and torch.equal(rows, flat[start:end].float()), (start, end)
    assert torch.equal(made.dense(), dense)
    logits = torch.randn(dense.shape, generator=g)
    results = []
    for target in (dense, made):
        x = logits.clone().requires_grad_(True)
        loss, _ = PartialLabelLoss(chunk_elements=70)(x, target, annotated)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and g0 is not None and g1 is not None and torch.equal(g0, g1)
    with pytest.raises(ValueError, match="annotated_r has 3 flags"):
        LabelTargets.make(label, idx, lut, annotated_r=(True, False, True))
    with pytest.raises(TypeError, match="LabelTargets: label_bzyx must hold integer"):
        LabelTargets.make(label.float(), idx, lut)
    with pytest.raises(ValueError, match=r"target_bkzyx shape .* != logits shape"):
        PartialLabelLoss()(logits[:, :-1], made, annotated[:, :-1])


def test_the_objective_with_label_targets_equals_dense_targets_under_deep_supervision():
    """The trainer's objective (labels + region table, rows made in the loss, flags read once) against
    the former path (every level's dense targets built first): the same loss and gradients, bit for bit,
    and under torch.compile (fullgraph) within float tolerance."""
    from multitalent.models import build_network
    from multitalent.train.step import MultiTalentObjective, StepInputs

    cat = load_preset("multitalent13")
    torch.manual_seed(0)
    net = build_network("unet", cat.classes_per_dataset(), size="tiny", patch_size_zyx=(16, 32, 32))
    g = torch.Generator().manual_seed(4)
    idx = torch.tensor([cat.dataset_index("01"), cat.dataset_index("07")])
    inputs = StepInputs(
        torch.randn(2, 1, 16, 32, 32, generator=g),
        torch.randint(0, 3, (2, 16, 32, 32), generator=g, dtype=torch.uint8),
        idx,
        torch.as_tensor(cat.annotated_mask())[idx],
    )
    n_levels = int(net.ds_levels)
    assert n_levels > 1
    results = []
    for dense in (True, False):
        net.zero_grad(set_to_none=True)
        loss, _ = MultiTalentObjective(cat, n_levels=n_levels, dense_targets=dense)(net, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    (l_dense, g_dense), (l_rows, g_rows) = results
    assert torch.equal(l_dense, l_rows) and len(g_dense) == len(g_rows) > 0
    assert all(torch.equal(a, b) for a, b in zip(g_dense, g_rows))
    objective = MultiTalentObjective(cat, n_levels=n_levels)
    compiled = torch.compile(lambda: objective(net, inputs)[0], backend="aot_eager", fullgraph=True)
    net.zero_grad(set_to_none=True)
    loss = compiled()
    loss.backward()
    torch.testing.assert_close(loss.detach(), l_rows)
    for p, want in zip([p for p in net.parameters() if p.grad is not None], g_rows):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)


def test_bf16_logits_reach_the_loss_as_they_are_and_give_the_upcast_result():
    """The objective no longer makes a float32 copy of every head's bf16 logits: the loss upcasts the
    annotated rows chunk by chunk, with the same loss and the same bf16 gradients, bit for bit."""
    from multitalent.train.step import MultiTalentObjective, StepInputs

    cat = load_preset("multitalent13")
    g = torch.Generator().manual_seed(6)
    idx = torch.tensor([cat.dataset_index("01"), cat.dataset_index("07")])
    shapes = [(8, 16, 16), (4, 8, 8), (2, 4, 4)]
    logits = [torch.randn(2, cat.num_classes, *s, generator=g).to(torch.bfloat16) for s in shapes]
    inputs = StepInputs(
        torch.zeros(2, 1, 8, 16, 16),
        torch.randint(0, 3, (2, 8, 16, 16), generator=g, dtype=torch.uint8),
        idx,
        torch.as_tensor(cat.annotated_mask())[idx],
    )
    objective = MultiTalentObjective(cat, n_levels=len(shapes))
    results = []
    for upcast_first in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in logits]
        outputs = [x.float() for x in leaves] if upcast_first else leaves
        loss, _ = objective(lambda _image, outputs=outputs: outputs, inputs)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    (l_up, g_up), (l_bf, g_bf) = results
    assert l_bf.dtype == torch.float32 and torch.equal(l_up, l_bf)
    assert all(a is not None and b is not None and a.dtype == torch.bfloat16 for a, b in zip(g_up, g_bf))
    assert all(torch.equal(a, b) for a, b in zip(g_up, g_bf))


# --------------------------------------------------------------------- global batch Dice on 2 ranks
WORLD = 2


def _ddp_cases():
    """Full batches and how they are split over the ranks (uneven on purpose)."""
    g = torch.Generator().manual_seed(2024)
    logits = torch.randn(3, 4, 3, 2, 2, generator=g, dtype=torch.float64)
    target = torch.rand(3, 4, 3, 2, 2, generator=g) < 0.4
    # class 0 annotated on rank 0 only, class 2 by 1 sample of each rank, class 3 by nobody
    annotated = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    split = [[0], [1, 2]]
    return [
        {
            "dice": dice,
            "reduction": reduction,
            "logits": logits,
            "target": target,
            "annotated": annotated,
            "split": split,
        }
        for reduction in ("mean", "sum")
        for dice in ("batch", "sample")
    ]


def _ddp_model_batch():
    g = torch.Generator().manual_seed(7)
    image = torch.randn(4, 1, 4, 4, 4, generator=g)
    target = torch.rand(4, 3, 4, 4, 4, generator=g) < 0.3
    annotated = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    return image, target, annotated, [[0, 1], [2, 3]]


class _TinyNet(torch.nn.Module):
    """Three deep-supervision outputs (full, 1/2, 1/4 resolution)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = torch.nn.ModuleList(torch.nn.Conv3d(1, 3, 3, padding=1) for _ in range(3))

    def forward(self, x):
        return [
            head(torch.nn.functional.avg_pool3d(x, 2**i) if i else x) for i, head in enumerate(self.heads)
        ]


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from multitalent.losses import all_reduce_sum

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        reduce = all_reduce_sum()
        results: dict = {"cases": []}
        for case in _ddp_cases():
            rows = case["split"][rank]
            x = case["logits"][rows].clone().requires_grad_(True)
            loss, metrics = PartialLabelLoss(dice=case["dice"], reduction=case["reduction"])(
                x, case["target"][rows], case["annotated"][rows], reduce=reduce
            )
            loss.backward()
            results["cases"].append({"loss": loss.detach(), "grad": x.grad, "metrics": metrics})

        image, target, annotated, split = _ddp_model_batch()
        net = torch.nn.parallel.DistributedDataParallel(_TinyNet())
        ds = DeepSupervisionLoss(PartialLabelLoss(), deep_supervision_weights(3))
        rows = split[rank]
        loss, _ = ds(net(image[rows]), target[rows], annotated[rows], reduce=reduce)
        loss.backward()
        results["model_loss"] = loss.detach()
        results["model_grads"] = [p.grad.clone() for p in net.module.parameters()]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_batch_dice_on_two_gloo_processes_equals_single_process(tmp_path):
    """Convention: with ``reduce`` = differentiable all-reduce sum, every rank's loss equals the
    single-process loss of the concatenated batch; the gradient w.r.t. a rank's own logits is
    WORLD x the single-process gradient of those logits, so DDP's gradient averaging (/ WORLD) gives
    exactly the single-process parameter gradient."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for i, case in enumerate(_ddp_cases()):
        full = case["logits"].clone().requires_grad_(True)
        fn = PartialLabelLoss(dice=case["dice"], reduction=case["reduction"])
        loss, metrics = fn(full, case["target"], case["annotated"])
        loss.backward()
        assert full.grad is not None
        lists = _lists(case["logits"], case["target"], case["annotated"])
        want = _ref_loss(*lists, dice=case["dice"], reduction=case["reduction"])
        assert loss.item() == pytest.approx(want, abs=1e-12)
        for r in range(WORLD):
            got = ranks[r]["cases"][i]
            assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-12), (fn, r)
            torch.testing.assert_close(
                got["grad"], WORLD * full.grad[case["split"][r]], rtol=1e-10, atol=1e-12
            )
            for key in ("tp_k", "fp_k", "fn_k", "annotated_k", "bce_k", "dice_k", "tp_hard_k"):
                torch.testing.assert_close(got["metrics"][key], metrics[key], rtol=1e-10, atol=1e-12)

    image, target, annotated, _ = _ddp_model_batch()
    net = _TinyNet()
    ds = DeepSupervisionLoss(PartialLabelLoss(), deep_supervision_weights(3))
    loss, _ = ds(net(image), target, annotated)
    loss.backward()
    for r in range(WORLD):
        assert ranks[r]["model_loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        for got, p in zip(ranks[r]["model_grads"], net.parameters()):
            assert p.grad is not None
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    # the zero-weight (lowest resolution) head is in the graph with an exactly zero gradient
    assert all(torch.all(g == 0) for g in ranks[0]["model_grads"][4:])
