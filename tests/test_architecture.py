"""The dependency layers of ``multitalent`` (``scripts/import_layers.py``) hold, and every module imports.

The layer order is ``LAYERS`` in ``scripts/import_layers.py``; ``docs/architecture.md`` is its output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_layers", REPO / "scripts" / "import_layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


layers = _load_script()


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list]:
    return layers.collect()


KNOWN = {"multitalent", "multitalent.a", "multitalent.a.x", "multitalent.a.y", "multitalent.b"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import multitalent.b", [("multitalent.b", "module")]),
        ("from multitalent.a import y, name", [("multitalent.a.y", "module"), ("multitalent.a", "module")]),
        ("from multitalent.b import f, g", [("multitalent.b", "module")]),
        ("from multitalent.a import name_in_init", [("multitalent.a", "module")]),
        ("from . import y", [("multitalent.a.y", "module")]),
        ("from ..b import f", [("multitalent.b", "module")]),
        ("def f():\n    from multitalent.b import g", [("multitalent.b", "lazy")]),
        ("class C:\n    from multitalent.b import g", [("multitalent.b", "module")]),
        (
            "if TYPE_CHECKING:\n    from multitalent.b import T\nelse:\n    import multitalent.a.y",
            [("multitalent.b", "type"), ("multitalent.a.y", "module")],
        ),
        ("if typing.TYPE_CHECKING:\n    def f():\n        import multitalent.b", [("multitalent.b", "type")]),
        (
            'T = {"run": "multitalent.b:run", "doc": "see multitalent.b", "x": "multitalent.nope"}',
            [("multitalent.b", "dynamic")],
        ),
        ("import numpy\nfrom os import path\nimport multitalent.a.x as same", []),
    ],
)
def test_imports_of_records_each_kind(source: str, expected: list[tuple[str, str]]) -> None:
    found = layers.imports_of("multitalent.a.x", source, KNOWN)
    assert [(i.target, i.kind) for i in found] == expected


def test_cycles_finds_strongly_connected_components() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}}
    assert layers.cycles(edges) == [["a", "b", "c"], ["e", "f"]]
    assert layers.cycles({"a": {"b"}, "b": set()}) == []


def test_every_group_has_exactly_one_layer(graph: tuple[dict[str, Path], list]) -> None:
    modules, _ = graph
    index = layers.layer_of()  # raises on a group listed twice
    missing = {layers.group_of(m) for m in modules} - set(index)
    assert not missing, f"add {sorted(missing)} to LAYERS in scripts/import_layers.py"


def test_no_cycle_between_subpackages(graph: tuple[dict[str, Path], list]) -> None:
    _, imports = graph
    edges: dict[str, set[str]] = {}
    for a, b in layers.group_edges(imports):
        edges.setdefault(a, set()).add(b)
    assert layers.cycles(edges) == []


def test_no_module_level_cycle(graph: tuple[dict[str, Path], list]) -> None:
    _, imports = graph
    assert layers.cycles(layers.module_level_edges(imports)) == []


def test_every_import_goes_down_the_layers(graph: tuple[dict[str, Path], list]) -> None:
    modules, imports = graph
    broken = [v for v in layers.violations(modules, imports) if " runs " in v]
    assert not broken, "\n".join(broken)


def test_architecture_doc_is_up_to_date(graph: tuple[dict[str, Path], list]) -> None:
    modules, imports = graph
    assert layers.DOC.read_text() == layers.render(modules, imports), (
        "docs/architecture.md is stale: run python scripts/import_layers.py"
    )


# Imports each named module with no multitalent module loaded before it; third-party modules stay
# cached between them, which keeps a chunk to one interpreter start and one torch import.
_IMPORT_EACH = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    failures = {}
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m == "multitalent" or m.startswith("multitalent.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-3)
    print(json.dumps(failures))
    """
)


def test_every_module_imports_alone_in_a_fresh_interpreter(graph: tuple[dict[str, Path], list]) -> None:
    modules, _ = graph
    names = sorted(modules)
    n_chunks = max(1, min(4, os.cpu_count() or 1))
    chunks = [names[i::n_chunks] for i in range(n_chunks)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}

    def run(chunk: list[str]) -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_EACH, *chunk],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"import subprocess for {chunk} failed:\n{done.stderr[-3000:]}"
        result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    with ThreadPoolExecutor(len(chunks)) as pool:
        failures = {k: v for result in pool.map(run, chunks) for k, v in result.items()}
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in sorted(failures.items()))
