"""The package's layout rule, checked rather than claimed (README, "Project layout").

Read with ``ast`` from the source files (nothing is imported): every import of every module, those inside
functions included (a lazy import is still an import), but not the ones under ``if TYPE_CHECKING:``.

* no import cycle between modules;
* no import against the declared layer order (a module imports only its own layer and the layers below);
* no underscore name imported from another module;
* no source file over 500 lines, and the trainer's per-epoch loop fits on one screen (<= 60 lines).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "fusionkd"

#: bottom to top: a module may import modules of its own layer and of the layers below it, never above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("fusionkd.errors", "fusionkd.version", "fusionkd.registry", "fusionkd.presets")),
    ("data", ("fusionkd.data",)),
    ("models", ("fusionkd.models",)),
    ("methods", ("fusionkd.methods",)),
    ("plug-ins", ("fusionkd.plugins",)),
    ("engine", ("fusionkd.engine",)),
    ("workflows", ("fusionkd.api", "fusionkd.compare", "fusionkd.tune")),
    ("interface", ("fusionkd.commands", "fusionkd.cli", "fusionkd.__main__", "fusionkd")),
]
MAX_LINES = 500
MAX_EPOCH_LOOP = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, index = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index >= 0, f"{module} is in no layer: add it to LAYERS"
    return index


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import in ``module``'s file."""
    path = modules()[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if _type_checking(node) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "fusionkd"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fusionkd":
                continue
            names = [a.name for a in node.names]
            sub = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules()]
            out += [(s, [], node.lineno) for s in sub]  # `from . import submodule`
            rest = [n for n in names if f"{target}.{n}" not in modules()]
            if rest or not sub:
                out.append((target, rest, node.lineno))
    return out


@cache
def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t in modules() and t != m} for m in modules()}


def test_there_is_no_import_cycle():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    shown = ["; ".join(f"{a} -> {b}" for a in c for b in sorted(g[a]) if b in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_every_import_follows_the_layer_order():
    upward = []
    for m in modules():
        for target, _, line in imports(m):
            if target in modules() and layer_of(target) > layer_of(m):
                upward.append(f"{modules()[m].relative_to(SRC)}:{line} imports {target} "
                              f"({LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_underscore_name_is_imported_from_another_module():
    private = [f"{modules()[m].relative_to(SRC)}:{line} takes {n} from {target}"
               for m in modules() for target, names, line in imports(m) if target != m
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "private names used across modules (give them a public name):\n" + "\n".join(private)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(SRC)) for p in PKG.rglob("*.py")))
def test_no_source_file_is_over_500_lines(path):
    n = len((SRC / path).read_text().splitlines())
    assert n <= MAX_LINES, f"{path} has {n} lines (at most {MAX_LINES}: split it by job)"


def test_the_epoch_loop_reads_on_one_screen():
    """The trainer's per-epoch loop (the ``for epoch in ...`` statement) is at most 60 lines."""
    loops = []
    for m, path in modules().items():
        if not m.startswith("fusionkd.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "epoch":
                loops.append((f"{path.relative_to(SRC)}:{node.lineno}", node.end_lineno - node.lineno + 1))
    assert loops, "no `for epoch in ...` loop found in fusionkd.engine"
    long = [f"{where}: {n} lines" for where, n in loops if n > MAX_EPOCH_LOOP]
    assert not long, f"epoch loops over {MAX_EPOCH_LOOP} lines: " + ", ".join(long)


def test_the_layer_rule_sees_real_imports():
    """The checker itself: it finds the trainer's imports of the data layer and of the errors module."""
    targets = {t for t, _, _ in imports("fusionkd.engine.trainer")}
    assert any(t.startswith("fusionkd.data") for t in targets)
    assert layer_of("fusionkd.engine.trainer") > layer_of("fusionkd.data.formats") > layer_of("fusionkd.errors")
