"""The layering of docs/ARCHITECTURE.md, checked on the package's own imports (read with ``ast``).

core < sources, backbone < learn < outputs < tasks < cli, ui. A module imports only its own layer or
lower ones; sources and backbone know nothing of each other; only ``sources/qupath/project.py`` imports
paquo, only ``cli.py`` and ``ui.py`` import rich (and only ``cli.py`` typer); there is no import cycle.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pdseg_qupath"
LAYERS = {"core": 0, "sources": 1, "backbone": 1, "learn": 2, "outputs": 3, "tasks": 4, "cli": 5, "ui": 5}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=None)
def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (absolute names), with ``from X import name`` resolved to
    ``X.name`` when that is a module of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module(path)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".") if is_pkg else here.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names if _exists(f"{mod}.{a.name}")]
    return out


def _exists(module: str) -> bool:
    if not module.startswith("pdseg_qupath."):
        return False
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: sorted({i for i in _imports(p) if i in MODULES and i != m}) for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _upward(module: str, imported: list[str]) -> list[str]:
    """What ``module`` imports from a higher layer, or from the sibling of sources/backbone."""
    mine = _layer(module)
    bad = [i for i in imported if _layer(i) is not None and mine is not None and _layer(i) > mine]
    sibling = {"sources": "backbone", "backbone": "sources"}.get(module.split(".")[1] if "." in module else "")
    return bad + [i for i in imported if sibling and i.split(".")[1:2] == [sibling]]


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, []):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_package_has_the_layers():
    assert {m.split(".")[1] for m in MODULES if "." in m} >= set(LAYERS)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_a_module_imports_only_its_layer_or_lower(module):
    bad = _upward(module, GRAPH[module])
    assert not bad, f"{module} imports {bad}, which lie above it (or beside it)"


def test_lower_layers_use_only_the_version_from_the_package_face():
    for module, path in MODULES.items():
        if module == "pdseg_qupath":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "pdseg_qupath" and not node.level:
                names = {a.name for a in node.names}
                allowed = {"__version__", "ui"} if module == "pdseg_qupath.cli" else {"__version__"}
                assert names <= allowed, f"{module} imports {names} from the package face"


def _third_party(module: str) -> set[str]:
    return {i.split(".")[0] for i in _imports(MODULES[module])}


def test_only_the_project_adapter_imports_paquo():
    assert sorted(m for m in MODULES if "paquo" in _third_party(m)) == ["pdseg_qupath.sources.qupath.project"]


def test_only_cli_and_ui_import_rich_and_typer():
    rich_users = {m for m in MODULES if "rich" in _third_party(m)}
    assert "pdseg_qupath.ui" in rich_users and rich_users <= {"pdseg_qupath.cli", "pdseg_qupath.ui"}
    assert sorted(m for m in MODULES if "typer" in _third_party(m)) == ["pdseg_qupath.cli"]


def test_no_import_cycles():
    assert _cycle(GRAPH) is None, "import cycle: " + " -> ".join(_cycle(GRAPH) or [])


def test_the_rules_catch_what_they_are_meant_to(tmp_path):
    """Planted faults are seen: a lazy upward import, a sibling import, a cycle (no vacuous passes)."""
    lazy = tmp_path / "x.py"
    lazy.write_text("def f():\n    from pdseg_qupath.tasks.train import train\n")
    assert _upward("pdseg_qupath.core.x", [m for m in _imports_of_text(lazy) if m in MODULES]) == \
        ["pdseg_qupath.tasks.train"]
    assert _upward("pdseg_qupath.sources.base", ["pdseg_qupath.backbone.model"]) == ["pdseg_qupath.backbone.model"]
    assert _upward("pdseg_qupath.learn.fit", ["pdseg_qupath.core.metrics", "pdseg_qupath.learn.head"]) == []
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def _imports_of_text(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return out
