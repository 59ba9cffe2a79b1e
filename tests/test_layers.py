"""The package's layers (docs/architecture.md): no module imports from a layer above its own,
and no two modules import each other, directly or round a cycle. Lazy imports inside
functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mimco"

#: bottom to top; a module may import its own layer (without cycles) and the layers below
LAYERS: list[tuple[str, ...]] = [
    ("mimco", "mimco.errors", "mimco.config", "mimco.config_rules", "mimco.distributed",
     "mimco.io", "mimco.runs", "mimco.plugins"),
    ("mimco.masking", "mimco.data", "mimco.models"),
    ("mimco.methods",),
    ("mimco.engine",),
    ("mimco.eval",),
    ("mimco.pipeline", "mimco.studies"),
    ("mimco.cli", "mimco.__main__", "mimco.api"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The mimco modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mimco")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mimco"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return out


def layer_of(name: str) -> int:
    for i, group in enumerate(LAYERS):
        if name in group:
            return i
    for i, group in enumerate(LAYERS):
        if any(name.startswith(g + ".") for g in group if g != "mimco"):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and docs/architecture.md")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps if layer_of(d) > layer_of(m))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_upward_import():
    assert upward(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_look_for():
    g = {"mimco.models.vit": {"mimco.engine.trainer"}, "mimco.engine.trainer": set(),
         "mimco.cli.a": {"mimco.cli.b"}, "mimco.cli.b": {"mimco.cli.a"}}
    assert upward(g) == ["mimco.models.vit -> mimco.engine.trainer"]
    assert cycles(g) == [["mimco.cli.a", "mimco.cli.b"]]


def doc_table() -> list[tuple[str, str]]:
    """(modules column, whole row) of each row of docs/architecture.md's layer table, bottom to top."""
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    table = text.split("## Layers, bottom to top", 1)[1].split("\n\n")[2]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    return [(r.split("|")[2], r) for r in rows]


def test_the_documented_layers_are_the_enforced_ones():
    """docs/architecture.md's layer table: one row per layer of LAYERS, in order, listing that layer's
    modules and folders, and naming every module of the package in the row of its layer."""
    rows = doc_table()
    assert len(rows) == len(LAYERS)
    for (modules_col, _), group in zip(rows, LAYERS):
        named = {m.strip(" `") for m in modules_col.split(",")}
        want = {("mimco." + n.removesuffix(".py").removesuffix("/").replace("/", ".")) for n in named}
        assert want == {g for g in group if g != "mimco"}, modules_col
    for name, path in modules().items():
        rel = path.relative_to(SRC).as_posix()
        if path.name == "__init__.py" or name in ("mimco.__main__",):
            continue
        row = rows[layer_of(name)][1]
        assert f"`{rel}`" in row or f"`{path.name}`" in row, f"docs/architecture.md: {rel} is not in its layer's row"
