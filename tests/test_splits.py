"""The 5-fold splits: written with the converted collection, read by training and evaluation alike."""

from __future__ import annotations

import json

import pytest

from multitalent.data.sampling import (
    SPLITS_FILE,
    fold_keys,
    load_splits,
    make_splits,
    split_cases,
    split_collection,
    write_splits,
)


def keys():
    return [("A", f"a{i:02d}") for i in range(12)] + [("B", f"b{i}") for i in range(3)]


def test_splits_file_is_nnunets_rule_per_dataset(tmp_path):
    path = write_splits(tmp_path, keys())
    data = load_splits(path)
    assert data["seed"] == 12345 and data["n_splits"] == 5
    for fold in range(5):
        train, val = fold_keys(data, fold)
        assert (train, val) == split_cases(keys(), fold)  # the function training used before the file
        assert all(d == "A" for d, _ in val)  # B has fewer cases than folds: always in training
    vals = [set(fold_keys(data, f)[1]) for f in range(5)]
    assert set().union(*vals) == {k for k in keys() if k[0] == "A"}
    assert sum(len(v) for v in vals) == 12
    assert fold_keys(data, None) == (sorted(keys()), [])
    assert make_splits(keys()) == json.loads(path.read_text())


def test_training_reads_the_file_and_refuses_a_stale_one(tmp_path):
    records = [{"dataset_id": d, "case_id": c} for d, c in keys()]
    assert split_collection(tmp_path, records, 1) == split_cases(records, 1)  # no file: computed
    write_splits(tmp_path, keys())
    train, val = split_collection(tmp_path, records, 1)
    assert (train, val) == split_cases(records, 1)
    with pytest.raises(ValueError, match="convert again"):
        split_collection(tmp_path, [*records, {"dataset_id": "A", "case_id": "new"}], 1)
    (tmp_path / SPLITS_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a readable splits file"):
        split_collection(tmp_path, records, 1)


def test_converted_phantom_has_splits_matching_its_manifest(phantom_shards):
    from multitalent.shards import load_manifest

    manifest = load_manifest(phantom_shards)
    data = load_splits(phantom_shards / SPLITS_FILE)
    train, val = split_collection(phantom_shards, list(manifest.cases), 0)
    assert [(c.dataset_id, c.case_id) for c in val] == fold_keys(data, 0)[1]
    assert len(train) + len(val) == len(manifest.cases)
