"""The totalsegmentator and phantom presets."""

from __future__ import annotations

from multitalent.catalog import load_preset
from multitalent.catalog.model import LAYOUTS


def test_totalsegmentator_has_117_unique_classes_in_official_order() -> None:
    cat = load_preset("totalsegmentator")
    [d] = cat.datasets
    assert d.layout == "totalsegmentator" and d.num_cases == 1204
    assert cat.num_classes == 117
    assert sorted(d.labels) == list(range(1, 118))
    names = [c.name for c in cat.classes]
    assert len(set(names)) == 117
    assert all(" " not in n for n in names)  # mask file stems
    spot = {
        1: "spleen",
        5: "liver",
        21: "urinary_bladder",
        51: "heart",
        52: "aorta",
        79: "spinal_cord",
        90: "brain",
        116: "sternum",
        117: "costal_cartilages",
    }
    assert {v: d.labels[v] for v in spot} == spot
    assert [d.labels[v] for v in range(26, 51)] == ["vertebrae_S1"] + [
        f"vertebrae_L{i}" for i in range(5, 0, -1)
    ] + [f"vertebrae_T{i}" for i in range(12, 0, -1)] + [f"vertebrae_C{i}" for i in range(7, 0, -1)]


def test_phantom_has_regions_conflicts_and_every_layout() -> None:
    cat = load_preset("phantom")
    assert {d.layout for d in cat.datasets} == set(LAYOUTS)
    assert 12 <= cat.num_classes <= 20
    regions = {c.key for c in cat.classes if len(c.raw_values) > 1}
    assert regions == {"P01:liver", "P03:kidneys", "P06:heart"}
    # each organ-with-tumour region contains its tumour class
    for region, tumour in (("P01:liver", "P01:liver tumour"), ("P03:kidneys", "P03:kidney tumour")):
        by_key = {c.key: c for c in cat.classes}
        assert set(by_key[tumour].raw_values) < set(by_key[region].raw_values)
    # the heart conflict: two datasets, one with and one without the aortic root
    hearts = {c.dataset_id: c for c in cat.classes if c.name == "heart"}
    assert set(hearts) == {"P05", "P06"}
    names05 = {cat.dataset("P05").labels[v] for v in hearts["P05"].raw_values}
    names06 = {cat.dataset("P06").labels[v] for v in hearts["P06"].raw_values}
    assert names05 == {"heart"} and names06 == {"heart", "aortic root"}
    aortas = {c.dataset_id for c in cat.classes if c.name == "aorta"}
    assert aortas == {"P04", "P05", "P06"}
    assert all(3 <= d.num_cases <= 12 for d in cat.datasets)
    assert len({d.location for d in cat.datasets}) == len(cat.datasets)
    assert cat.group_members("cancer")
