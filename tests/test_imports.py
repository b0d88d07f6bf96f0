"""Start-up and structure: ``import object2brain`` and ``--help`` import no torch; the import graph
of the package has no cycles and its layers point one way only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "object2brain"

#: Packages that compute (no file layout of a study, no figures, no command line).
STAGE_PACKAGES = ("activations", "data", "explain", "heads", "lesion", "models", "rsa")
#: What the stages must not import: the layers above them.
UPPER_LAYERS = ("api", "cli", "pipeline", "report")


def _loaded_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which heavy modules it left in ``sys.modules``."""
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'numpy', 'pandas')}))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    loaded: dict[str, bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_import_object2brain_imports_no_torch() -> None:
    loaded = _loaded_after("import object2brain\nobject2brain.__version__")
    assert loaded == {"torch": False, "numpy": False, "pandas": False}


def test_help_imports_no_torch() -> None:
    code = (
        "from object2brain.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['rsa', '--help'])\nexcept SystemExit:\n    pass"
    )
    loaded = _loaded_after(code)
    assert not loaded["torch"] and not loaded["numpy"], loaded


def test_api_names_resolve_lazily() -> None:
    import object2brain as o2b

    for name in o2b.__all__:
        assert getattr(o2b, name) is not None, name
    assert callable(o2b.rsa) and callable(o2b.lesion) and callable(o2b.simulate)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = o2b.nothing  # type: ignore[attr-defined]


# --- the import graph ------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _target(name: str) -> str | None:
    """The module of the package that ``name`` (a module or a name in a module) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports at run time, at any level (function-level
    imports included; imports only for type checkers left out)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _target(name) if name.startswith("object2brain") else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _crossings(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _layer(module) in sources
        for target in targets
        if _layer(target) in forbidden
    )


def test_the_graph_is_read() -> None:
    assert "object2brain.rsa.align" in GRAPH["object2brain.api.rsa"]
    assert "object2brain.options" in GRAPH["object2brain.cli"]


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_the_orchestration_layers_are_in_no_cycle() -> None:
    """Holds already (the whole-graph test above waits on the stage packages)."""
    upper = {"api", "cli", "pipeline", "report", "demo", "simulate", ""}
    assert [c for c in _cycles(GRAPH) if any(_layer(m) in upper for m in c)] == []


def test_stages_import_no_upper_layer() -> None:
    assert _crossings(STAGE_PACKAGES, UPPER_LAYERS) == []


def test_report_imports_no_stage() -> None:
    """The report reads result tables (their schemas in ``tables``), never a stage's code."""
    stages = (*(p for p in STAGE_PACKAGES if p != "data"), "simulate")
    assert _crossings(("report",), stages) == []
