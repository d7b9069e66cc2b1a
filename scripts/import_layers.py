"""The dependency layers of ``multitalent``, drawn from its imports.

Parses every module under ``platform/multitalent`` with :mod:`ast` (nothing is imported) and records
each import of a ``multitalent`` module with its kind:

* ``module``: runs when the importing module is imported (top level, class bodies, ``try`` blocks);
* ``lazy``: inside a function, runs when the function is called;
* ``type``: under ``if TYPE_CHECKING:``, never runs, but is still a design dependency;
* ``dynamic``: a string constant naming a ``multitalent`` module (``"multitalent.x.y"`` or
  ``"multitalent.x.y:func"``), the targets of ``importlib.import_module`` tables such as the CLI's.

Every kind counts for the layering rules: a type-only import of a higher layer is still an arrow
that runs back up. :data:`LAYERS` is the intended order, the one place it is defined.

Usage::

    python scripts/import_layers.py           # rewrite docs/architecture.md, print violations
    python scripts/import_layers.py --check   # exit 1 if the doc is stale or a rule is broken
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "platform" / "multitalent"
DOC = REPO / "docs" / "architecture.md"
ROOT = "multitalent"
# The group of the package root ``multitalent/__init__.py`` (it holds ``__version__`` only).
ROOT_GROUP = "__init__"

# The intended layer order, lowest first: (layer name, its groups, why it sits there). A group is a
# subpackage or a top-level module of ``multitalent``. An import may only go to a lower layer;
# groups sharing a layer are peers and import none of each other.
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "foundation",
        (ROOT_GROUP, "jobs", "catalog", "arrays", "metric_names", "overlay", "storage", "provenance"),
        "pure data, job-file loading, array conversion, metric names, the overlay renderer, local or "
        "object-storage locations and the code's commit that every stage uses; import nothing of "
        "multitalent beyond this layer",
    ),
    ("rawio", ("rawio",), "raw data enters here: the catalog says where each dataset's files are"),
    ("preprocess", ("preprocess",), "turns a loaded raw case into the plan's grid and intensity range"),
    ("shards", ("shards",), "stores preprocessed cases (Zarr, WebDataset, manifest); knows no sampling"),
    ("data", ("data",), "reads shards into sampled, augmented patch batches"),
    ("models", ("models",), "plain nn.Modules fed by batches; know nothing of losses or training"),
    ("losses", ("losses",), "compare the model's outputs with labels; distributed sums passed in"),
    ("evaluation", ("evaluation",), "metrics over the label space, usable without training or tracking"),
    ("tracking", ("tracking",), "records what training and evaluation produce (MLflow, names, pictures)"),
    (
        "registry",
        ("registry",),
        "model packages (plain files) and the MLflow model registry; publishing a run is train.publish",
    ),
    (
        "distributed",
        ("distributed", "raycluster"),
        "Ray and DeepSpeed plumbing from plain settings; never the application's job object",
    ),
    (
        "applications",
        ("train", "convert", "inference"),
        "assemble the layers below into jobs (train, convert, predict); independent of each other",
    ),
    (
        "experiments",
        ("experiment",),
        "compare training methods by running the applications' commands (train, predict, evaluate)",
    ),
    (
        "test data",
        ("synth",),
        "phantom generator for tests and demos: above production code, so no job can depend on it",
    ),
    (
        "demo",
        ("demo",),
        "the README's first command: its layout, held-out cases, table and overlay; the stages run in "
        "demo.cli, a command",
    ),
    (
        "command line",
        ("cli",),
        "multitalent.cli and every package's cli module: parse arguments, dispatch to the applications",
    ),
)

KINDS = ("module", "lazy", "type", "dynamic")


@dataclass(frozen=True)
class Import:
    """One import of a ``multitalent`` module: ``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    kind: str
    line: int


def layer_of() -> dict[str, int]:
    """Group -> index of its layer in :data:`LAYERS`."""
    index: dict[str, int] = {}
    for i, (_, groups, _) in enumerate(LAYERS):
        for group in groups:
            if group in index:
                raise ValueError(f"group {group!r} is in two layers")
            index[group] = i
    return index


def group_of(module: str) -> str:
    """``multitalent.data.augment`` -> ``data``; ``multitalent.cli`` -> ``cli``; the root -> ``__init__``.

    A package's command-line module (``multitalent.convert.cli``) belongs to ``cli``: commands sit above
    every stage and may tie several together (``convert`` generating the phantom collection first).
    """
    parts = module.split(".")
    if len(parts) > 2 and parts[-1] == "cli":
        return "cli"
    return parts[1] if len(parts) > 1 else ROOT_GROUP


def module_names(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their own name, not ``.__init__``)."""
    names: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The longest known module that ``name`` (a dotted module or ``module:attr``) starts with."""
    name = name.split(":")[0]
    known_set = set(known)
    while name:
        if name in known_set:
            return name
        name = name.rpartition(".")[0]
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.imports: list[Import] = []
        self._in_function = 0
        self._in_type_checking = 0

    def _kind(self) -> str:
        if self._in_type_checking:
            return "type"
        return "lazy" if self._in_function else "module"

    def _add(self, target: str | None, line: int, kind: str | None = None) -> None:
        imp = Import(self.module, target or "", kind or self._kind(), line)
        # One statement naming several things of one module is one import.
        if target and target != self.module and imp not in self.imports:
            self.imports.append(imp)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._in_function += 1
        self.generic_visit(node)
        self._in_function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._in_type_checking += 1
        for stmt in node.body:
            self.visit(stmt)
        self._in_type_checking -= 1
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                self._add(_resolve(alias.name, self.known), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            # Relative: strip ``level`` trailing parts (a package counts as its own first level).
            parts = self.module.split(".")
            keep = len(parts) - node.level + (1 if self.is_package else 0)
            base = ".".join(parts[:keep] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if not (base == ROOT or base.startswith(ROOT + ".")):
            return
        for alias in node.names:
            # ``from pkg import submodule`` imports the submodule; ``from pkg import name`` the package.
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else _resolve(base, self.known), node.lineno)

    def visit_Constant(self, node: ast.Constant) -> None:
        # Only an exact module name (optionally ``:attr``), so prose mentioning a module is no import.
        name = node.value.split(":")[0] if isinstance(node.value, str) else ""
        if name.startswith(ROOT + ".") and name in self.known:
            self._add(name, node.lineno, "dynamic")


def imports_of(module: str, source: str, known: set[str], *, is_package: bool = False) -> list[Import]:
    """The ``multitalent`` imports of one module's source (see the module docstring for kinds)."""
    collector = _Collector(module, is_package, known)
    collector.visit(ast.parse(source))
    return collector.imports


def collect(package_dir: Path = PACKAGE_DIR) -> tuple[dict[str, Path], list[Import]]:
    """``(modules, imports)`` of the whole package."""
    modules = module_names(package_dir)
    known = set(modules)
    found: list[Import] = []
    for name, path in modules.items():
        found += imports_of(name, path.read_text(), known, is_package=path.name == "__init__.py")
    return modules, found


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(found)


def group_edges(imports: Iterable[Import]) -> dict[tuple[str, str], list[Import]]:
    """(source group, target group) -> the imports behind that arrow; imports within a group left out."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        a, b = group_of(imp.source), group_of(imp.target)
        if a != b:
            edges[(a, b)].append(imp)
    return dict(sorted(edges.items()))


def module_level_edges(imports: Iterable[Import]) -> dict[str, set[str]]:
    """Module -> modules it imports at module level (``module`` and ``type`` kinds; function-local
    and string imports are deferred by design and left out)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.kind in ("module", "type"):
            edges[imp.source].add(imp.target)
    return edges


def _where(imps: Sequence[Import], modules: Mapping[str, Path]) -> str:
    return ", ".join(f"{modules[i.source].relative_to(REPO)}:{i.line} ({i.kind}) -> {i.target}" for i in imps)


def violations(modules: Mapping[str, Path], imports: Sequence[Import]) -> list[str]:
    """Every broken rule, one line each: unplaced groups, upward or sideways arrows, cycles."""
    layer = layer_of()
    found = [
        f"group {g!r} is in no layer: add it to LAYERS in scripts/import_layers.py"
        for g in sorted({group_of(m) for m in modules} - set(layer))
    ]
    edges = group_edges(imports)
    for (a, b), imps in edges.items():
        if a not in layer or b not in layer or layer[a] < layer[b]:
            how = "up"
        elif layer[a] == layer[b]:
            how = "sideways (peers)"
        else:
            continue
        found.append(f"{a} -> {b} runs {how}: {_where(imps, modules)}")
    for component in cycles({a: {b for (x, b) in edges if x == a} for (a, _) in edges}):
        found.append(f"subpackage cycle: {' <-> '.join(component)}")
    module_edges = module_level_edges(imports)
    for component in cycles(module_edges):
        inner = [
            i
            for i in imports
            if i.source in component and i.target in component and i.kind in ("module", "type")
        ]
        found.append(f"module-level cycle: {' <-> '.join(component)}: {_where(inner, modules)}")
    return found


def _node(group: str) -> str:
    return "g_" + group.strip("_")


def render(modules: Mapping[str, Path], imports: Sequence[Import]) -> str:
    """The text of ``docs/architecture.md``."""
    layer = layer_of()
    edges = group_edges(imports)
    found = violations(modules, imports)
    per_group: dict[str, int] = defaultdict(int)
    for m in modules:
        per_group[group_of(m)] += 1
    kinds: dict[str, int] = defaultdict(int)
    for imp in imports:
        kinds[imp.kind] += 1

    lines = [
        "# Architecture: dependency layers",
        "",
        "<!-- Generated by `python scripts/import_layers.py` from the imports; do not edit by hand.",
        "     tests/test_architecture.py fails when this file is stale. -->",
        "",
        "Each box is a subpackage (or top-level module) of `multitalent`; an arrow `a --> b` means some",
        "module of `a` imports a module of `b`, labelled with the number of import statements. Solid:",
        "at least one runs (at import time, inside a function, or by module name through `importlib`);",
        "dotted: only under `if TYPE_CHECKING:`. Red: against the layer order. Layers are listed lowest",
        "first, and an import may only go to a lower layer; groups in one layer import none of each other.",
        "",
        "```mermaid",
        "flowchart BT",
    ]
    for i, (name, groups, _) in enumerate(LAYERS):
        lines.append(f'  subgraph L{i}["{i} {name}"]')
        lines += [f'    {_node(g)}["{g} ({per_group.get(g, 0)})"]' for g in groups]
        lines.append("  end")
    red = []
    for n, ((a, b), imps) in enumerate(edges.items()):
        arrow = "-.->" if all(i.kind == "type" for i in imps) else "-->"
        lines.append(f"  {_node(a)} {arrow}|{len(imps)}| {_node(b)}")
        if a not in layer or b not in layer or layer[a] <= layer[b]:
            red.append(str(n))
    if red:
        lines.append(f"  linkStyle {','.join(red)} stroke:#d00,stroke-width:3px")
    lines += ["```", "", "## Layers", "", "| # | layer | groups (modules) | why here |", "|---|---|---|---|"]
    for i, (name, groups, why) in enumerate(LAYERS):
        cells = ", ".join(f"`{g}` ({per_group.get(g, 0)})" for g in groups)
        lines.append(f"| {i} | {name} | {cells} | {why} |")
    lines += [
        "",
        "`synth` sits above every production layer: it writes phantom test data, and only the command",
        "line (and the tests) may reach it. `__init__` is the package root (`__version__`).",
        "",
        "## Imports counted",
        "",
        f"{len(modules)} modules; {len(imports)} imports of `multitalent` modules: "
        + ", ".join(f"{kinds[k]} {k}" for k in KINDS)
        + " (`module`: at import time; `lazy`: inside a function; `type`: under `TYPE_CHECKING`;"
        " `dynamic`: a module name in a string, for `importlib`). All kinds count for the rules.",
        "",
        "## Violations",
        "",
    ]
    lines += [f"- {v}" for v in found] or ["None."]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale or a rule is broken")
    args = parser.parse_args(argv)
    modules, imports = collect()
    text = render(modules, imports)
    found = violations(modules, imports)
    for v in found:
        print(f"violation: {v}")
    if args.check:
        stale = not DOC.is_file() or DOC.read_text() != text
        if stale:
            print(f"{DOC.relative_to(REPO)} is stale: run python scripts/import_layers.py")
        return int(stale or bool(found))
    DOC.write_text(text)
    print(
        f"wrote {DOC.relative_to(REPO)}: {len(modules)} modules, {len(imports)} imports, "
        f"{len(found)} violations"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
