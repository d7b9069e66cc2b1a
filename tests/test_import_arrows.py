"""Arrows that must keep pointing one way, checked on the source (no imports, no torch): the plan file
has one writer and one reader, the converter does not generate its own test data, the shard formats
do not know the data loader, and the augmentation transforms do not import their caller."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "multitalent"


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(p.read_text(), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> set[str]:
    """Every module named in an import statement, at any depth (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _importers(prefix: str, target: str) -> list[str]:
    return sorted(
        name
        for name, tree in _modules().items()
        if name.startswith(prefix) and any(i == target or i.startswith(f"{target}.") for i in _imports(tree))
    )


def test_plan_file_name_is_spelled_once():
    """Only ``preprocess/plan.py`` names the file; everyone else goes through ``Plan.save``/``Plan.load``
    and ``PLAN_FILE`` (prose mentioning plan.json in docstrings and help texts is fine)."""
    spelled = sorted(
        name
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value == "plan.json"
    )
    assert spelled == ["multitalent.preprocess.plan"]


def test_only_the_convert_command_generates_phantom_data():
    assert _importers("multitalent.convert", "multitalent.synth") == ["multitalent.convert.cli"]


def test_shards_never_import_the_data_loader():
    assert _importers("multitalent.shards", "multitalent.data") == []


def test_augmentation_transforms_do_not_import_their_caller():
    assert _importers("multitalent.data.augment_", "multitalent.data.augment") == []
