"""The import rule of the package (histo_wsl/README.md): no import goes up the layers, no cycle.

Every module's imports are read with ``ast``, the lazy ones inside functions included, so a
``from histo_wsl.x import y`` written in a function to keep ``--help`` fast still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "histo_wsl"

#: the layers, lowest first: a module may import from its own layer and the layers below
LAYERS: list[set[str]] = [
    {"histo_wsl.errors", "histo_wsl.runtime"},
    {"histo_wsl.slideio"},
    {"histo_wsl.tissue"},
    {
        "histo_wsl.data",
        "histo_wsl.networks",
        "histo_wsl.reporting",
        "histo_wsl.registry",
        # the meters: training validates with them, evaluation reports them
        "histo_wsl.evaluation.metrics",
        "histo_wsl.evaluation.bootstrap",
    },
    {"histo_wsl.training"},
    {"histo_wsl.methods"},
    {"histo_wsl.inference"},
    {
        "histo_wsl.evaluation",
        "histo_wsl.synthetic",
        # fp16 re-save with a prediction check: needs the predictor
        "histo_wsl.registry.export",
    },
    {"histo_wsl.cli", "histo_wsl.__main__", "histo_wsl.api"},
]


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest name in :data:`LAYERS` it is or lies under."""
    if module == "histo_wsl":  # the package's top: its version only
        return 0
    best, level = "", -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    assert level >= 0, f"{module} is in no layer of tests/test_layers.py: add its package"
    return level


def module_name(path: Path) -> str:
    """``histo_wsl/a/b.py`` → ``histo_wsl.a.b`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The histo_wsl modules ``path`` imports, eagerly or inside functions (TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from histo_wsl.pkg import mod` imports the module pkg.mod when there is one
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n == "histo_wsl" or n.startswith("histo_wsl.")}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the histo_wsl modules it imports."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def test_no_import_goes_up_the_layers():
    graph = import_graph()
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    # a package's __init__ naming its modules' public names is not a cycle with them
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" → ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_rule_catches_an_upward_import_and_a_cycle(tmp_path):
    """The checker itself: a layer-0 module importing the CLI, and two modules importing each other."""
    assert layer_of("histo_wsl.runtime.batch") < layer_of("histo_wsl.cli.app")
    assert layer_of("histo_wsl.evaluation.metrics") < layer_of("histo_wsl.evaluation.images")
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from histo_wsl.cli import app\n")
    assert imports_of(src, {"histo_wsl.cli.app"}) == {"histo_wsl.cli.app"}
