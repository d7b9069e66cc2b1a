"""Validation Dice: hand-computed tables on a tiny catalog, groups on multitalent13."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multitalent.catalog import Catalog, load_preset
from multitalent.evaluation import DiceAccumulator, tp_fp_fn


@pytest.fixture
def tiny() -> Catalog:
    # Global classes: 0 A:liver, 1 A:liver tumour (cancer, difficult), 2 B:spleen,
    # 3 B:kidney (difficult), 4 C:aorta
    return Catalog.from_dict(
        {
            "name": "tiny",
            "datasets": [
                {
                    "id": "A",
                    "layout": "msd",
                    "labels": {"1": "liver", "2": "tumour"},
                    "classes": [
                        {"name": "liver", "raw_values": [1, 2]},
                        {"name": "liver tumour", "raw_values": [2], "groups": ["cancer", "difficult"]},
                    ],
                },
                {
                    "id": "B",
                    "layout": "msd",
                    "labels": {"1": "spleen", "2": "kidney"},
                    "groups": {"kidney": ["difficult"]},
                },
                {"id": "C", "layout": "msd", "labels": {"1": "aorta"}},
            ],
        }
    )


# Rows are cases: (tp_k, fp_k, fn_k, annotated_k). Counts in unannotated slots must be ignored.
CASES = [
    ([8, 1, 9, 9, 9], [2, 1, 5, 5, 5], [0, 2, 5, 5, 5], [1, 1, 0, 0, 0]),  # dataset A
    ([2, 0, 9, 9, 9], [0, 0, 5, 5, 5], [2, 0, 5, 5, 5], [1, 1, 0, 0, 0]),  # A, no tumour anywhere
    ([9, 9, 3, 0, 9], [5, 5, 1, 0, 5], [5, 5, 0, 0, 5], [0, 0, 1, 1, 0]),  # B, no kidney anywhere
]


def _filled(catalog: Catalog) -> DiceAccumulator:
    acc = DiceAccumulator(catalog)
    for tp, fp, fn, annotated in CASES:
        acc.update(np.array(tp), np.array(fp), np.array(fn), np.array(annotated, dtype=bool))
    return acc


def test_global_dice_by_hand(tiny: Catalog) -> None:
    report = _filled(tiny).report()
    liver = 2 * 10 / (2 * 10 + 2 + 2)  # tp 8+2, fp 2+0, fn 0+2
    tumour = 2 * 1 / (2 * 1 + 1 + 2)
    spleen = 2 * 3 / (2 * 3 + 1 + 0)
    assert report.method == "global"
    assert report.per_class == pytest.approx({"A:liver": liver, "A:liver tumour": tumour, "B:spleen": spleen})
    # kidney was annotated but empty in reference and prediction: not scored; aorta never annotated.
    assert report.empty_classes == ("B:kidney",)
    assert "C:aorta" not in report.per_class and "C" not in report.per_dataset
    assert report.per_dataset == pytest.approx({"A": (liver + tumour) / 2, "B": spleen})
    assert report.class_average == pytest.approx((liver + tumour + spleen) / 3)
    assert report.dataset_average == pytest.approx(((liver + tumour) / 2 + spleen) / 2)
    assert report.groups == pytest.approx({"difficult": tumour, "cancer": tumour})
    assert report.num_rows == 3


def test_per_case_dice_by_hand(tiny: Catalog) -> None:
    report = _filled(tiny).report("per_case")
    liver = (16 / 18 + 4 / 6) / 2
    tumour = 2 / 5  # the second case had nothing to score for the tumour (0/0 skipped)
    spleen = 6 / 7
    assert report.method == "per_case"
    assert report.per_class == pytest.approx({"A:liver": liver, "A:liver tumour": tumour, "B:spleen": spleen})
    assert report.class_average == pytest.approx((liver + tumour + spleen) / 3)


def test_batched_and_torch_inputs_match_per_case_updates(tiny: Catalog) -> None:
    tp, fp, fn, annotated = (np.array(x) for x in zip(*CASES))
    batched = DiceAccumulator(tiny)
    batched.update(torch.tensor(tp), torch.tensor(fp), torch.tensor(fn), torch.tensor(annotated))
    expected = _filled(tiny)
    for method in ("global", "per_case"):
        assert batched.report(method) == expected.report(method)
    # annotated may be a count of annotated samples (as PartialLabelLoss reports it)
    counted = DiceAccumulator(tiny)
    counted.update(tp, fp, fn, annotated * 3)
    assert counted.report() == expected.report()


def test_merge_equals_single_accumulator(tiny: Catalog) -> None:
    first, second = DiceAccumulator(tiny), DiceAccumulator(tiny)
    for i, (tp, fp, fn, annotated) in enumerate(CASES):
        (first if i % 2 else second).update(tp, fp, fn, annotated)
    first.merge(second.state_dict())
    assert first.report() == _filled(tiny).report()
    assert first.report("per_case") == _filled(tiny).report("per_case")


def test_reset_and_empty_report(tiny: Catalog) -> None:
    acc = _filled(tiny)
    acc.reset()
    report = acc.report()
    assert report.per_class == {} and report.groups == {}
    assert report.class_average is None and report.dataset_average is None
    assert report.to_metrics() == {}


def test_shape_errors_name_the_problem(tiny: Catalog) -> None:
    acc = DiceAccumulator(tiny)
    with pytest.raises(ValueError, match="K=5"):
        acc.update(np.zeros(4), np.zeros(4), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="shapes differ"):
        acc.update(np.zeros(5), np.zeros(5), np.zeros((2, 5)), np.ones(5))
    with pytest.raises(ValueError, match="method"):
        acc.report("median")  # type: ignore[arg-type]


def test_to_metrics_names(tiny: Catalog) -> None:
    metrics = _filled(tiny).report().to_metrics(prefix="val")
    report = _filled(tiny).report()
    assert metrics == pytest.approx(
        {
            "val/dice/A/liver": report.per_class["A:liver"],
            "val/dice/A/liver_tumour": report.per_class["A:liver tumour"],
            "val/dice/B/spleen": report.per_class["B:spleen"],
            "val/dice_dataset/A": report.per_dataset["A"],
            "val/dice_dataset/B": report.per_dataset["B"],
            "val/dice_mean/class": report.class_average,
            "val/dice_mean/dataset": report.dataset_average,
            "val/dice_mean/difficult": report.groups["difficult"],
            "val/dice_mean/cancer": report.groups["cancer"],
        }
    )


def test_groups_on_multitalent13() -> None:
    catalog = load_preset("multitalent13")
    rng = np.random.default_rng(0)
    k = catalog.num_classes
    annotated_dk = catalog.annotated_mask()
    acc = DiceAccumulator(catalog)
    evaluated = [catalog.dataset_index("01"), catalog.dataset_index("07")]  # LiTS and BTCV only
    for d in evaluated:
        for _ in range(2):
            acc.update(
                rng.integers(1, 50, k), rng.integers(0, 20, k), rng.integers(0, 20, k), annotated_dk[d]
            )
    report = acc.report()
    tp, fp, fn = (acc.state_dict()[n] for n in ("tp_k", "fp_k", "fn_k"))
    dice = {
        c.key: 2 * tp[c.index] / (2 * tp[c.index] + fp[c.index] + fn[c.index])
        for c in catalog.classes
        if c.dataset_id in ("01", "07")
    }
    difficult = ["01:liver tumour", "07:gallbladder", "07:right adrenal gland", "07:left adrenal gland"]
    assert set(report.per_dataset) == {"01", "07"}
    assert len(report.per_class) == 2 + 13  # LiTS liver + tumour, BTCV's 13 organs
    assert report.groups["difficult"] == pytest.approx(np.mean([dice[key] for key in difficult]))
    assert report.groups["cancer"] == pytest.approx(dice["01:liver tumour"])
    btcv = [value for key, value in dice.items() if key.startswith("07:")]
    assert report.per_dataset["07"] == pytest.approx(np.mean(btcv))
    assert report.per_class == pytest.approx(dice)


def test_tp_fp_fn_numpy_and_torch() -> None:
    pred = np.zeros((2, 2, 3, 4), dtype=bool)
    target = np.zeros_like(pred)
    pred[0, 0, 0, :3] = True  # 3 predicted
    target[0, 0, 0, 1:] = True  # 3 true, 2 overlap
    target[1, 1, 2, :] = True  # 4 missed
    expected_tp = [[2, 0], [0, 0]]
    expected_fp = [[1, 0], [0, 0]]
    expected_fn = [[1, 0], [0, 4]]
    for p, t in ((pred, target), (torch.from_numpy(pred).float(), torch.from_numpy(target).to(torch.uint8))):
        tp, fp, fn = tp_fp_fn(p, t)
        assert np.asarray(tp).tolist() == expected_tp
        assert np.asarray(fp).tolist() == expected_fp
        assert np.asarray(fn).tolist() == expected_fn
    with pytest.raises(ValueError, match="shape"):
        tp_fp_fn(pred, target[:1])
