"""Invariants of the label space and its presets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from multitalent.catalog import Catalog, ClassSpec, DatasetSpec, available_presets, load_catalog, load_preset
from multitalent.catalog.model import CatalogError


def test_multitalent13_matches_the_paper():
    cat = load_preset("multitalent13")
    assert len(cat.datasets) == 13
    assert cat.num_classes == 47
    assert sum(d.num_cases for d in cat.datasets) == 1460
    regions = {c.key for c in cat.classes if len(c.raw_values) > 1}
    assert regions == {"01:liver", "03:pancreas", "13:kidneys"}
    assert len(cat.group_members("difficult")) == 12
    assert {cat.classes[i].key for i in cat.group_members("cancer")} == {
        "01:liver tumour",
        "02:lung nodule",
        "03:pancreas tumour",
        "04:liver tumour",
        "06:colon cancer",
        "13:kidney tumour",
    }


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_is_consistent(name):
    cat = load_preset(name)
    assert [c.index for c in cat.classes] == list(range(cat.num_classes))
    assert len({c.key for c in cat.classes}) == cat.num_classes
    mask = cat.annotated_mask()
    assert mask.sum() == cat.num_classes and (mask.sum(axis=0) == 1).all()
    assert Catalog.from_dict(cat.to_dict()) == cat


def test_appending_a_dataset_never_renumbers():
    cat = load_preset("multitalent13")
    new = DatasetSpec(
        id="hospital",
        name="Hospital",
        layout="nnunet_v2",
        labels={1: "liver", 2: "lesion"},
        classes=(ClassSpec("liver", (1, 2)), ClassSpec("lesion", (2,), ("cancer",))),
    )
    bigger = cat.extend(new)
    assert bigger.classes[: cat.num_classes] == cat.classes
    assert bigger.num_classes == cat.num_classes + 2
    assert bigger.hash != cat.hash
    assert bigger.classes_per_dataset()[-1] == 2


def test_hash_ignores_names_and_counts_but_not_labels():
    cat = load_preset("multitalent13")
    d = cat.to_dict()
    d["datasets"][0]["name"] = "renamed"
    d["datasets"][0]["num_cases"] = 1
    d.pop("hash")
    assert Catalog.from_dict(d).hash == cat.hash
    d["datasets"][0]["classes"][0]["raw_values"] = [1]
    assert Catalog.from_dict(d).hash != cat.hash


def test_region_lut_maps_raw_values_to_classes():
    cat = load_preset("multitalent13")
    lut = cat.region_lut()
    liver, tumour = cat.class_slice("01").start, cat.class_slice("01").start + 1
    d = cat.dataset_index("01")
    assert lut[d, 1, liver] and not lut[d, 1, tumour]
    assert lut[d, 2, liver] and lut[d, 2, tumour]
    assert not lut[d, 0].any()
    label = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    targets = lut[d][label]  # (2, 2, K)
    np.testing.assert_array_equal(targets[..., liver], label > 0)
    np.testing.assert_array_equal(targets[..., tumour], label == 2)
    np.testing.assert_array_equal(cat.targets(label, "01")[0], label > 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout": "dicom"}, "layout"),
        ({"labels": {"0": "bg"}}, "background"),
        ({"classes": [{"name": "x", "raw_values": [7]}]}, "not declared"),
        ({"classes": [{"name": "x", "raw_values": [1], "groups": ["rare"]}]}, "unknown groups"),
        ({"id": "a:b"}, "id"),
    ],
)
def test_bad_definitions_are_rejected_with_a_reason(change, message):
    d = {"id": "x", "layout": "msd", "labels": {"1": "organ"}} | change
    with pytest.raises(CatalogError, match=message):
        Catalog.from_dict({"name": "t", "datasets": [d]})


def test_duplicate_dataset_ids_rejected():
    d = {"id": "x", "layout": "msd", "labels": {"1": "organ"}}
    with pytest.raises(CatalogError, match="duplicate"):
        Catalog.from_dict({"name": "t", "datasets": [d, d]})


def test_catalog_file_and_unknown_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndatasets:\n- {id: a, layout: btcv, labels: {1: spleen}}\n")
    assert load_catalog(path).classes[0].key == "a:spleen"
    with pytest.raises(CatalogError, match="unknown catalog preset"):
        load_catalog("nope")


def test_catalog_imports_without_torch():
    code = "import sys, multitalent.catalog, multitalent.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_catalog_show_cli():
    out = subprocess.run(
        [sys.executable, "-m", "multitalent.cli", "catalog", "show", "--preset", "multitalent13"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "13 datasets, 47 classes, 3 regions, 12 difficult, 6 cancer" in out
    assert "region {1,2}" in out
