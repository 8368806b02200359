"""The package order, enforced: launch -> trainer -> {arch, data_pipeline}.

Every module of the four packages is parsed with `ast`; every import counts, including the ones
inside functions (a lazy import is still a dependency) and `importlib.import_module("...")` with a
literal name. `arch` and `data_pipeline` never import upward nor each other, with one stated
exception: `data_pipeline` may import `arch.registry`, the dependency-free leaf holding the
Registry and the error types (UserError, ConfigError...) that every package reports with. And the
modules' import graph at module level has no cycles, so no import order can find a module half
initialised.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("arch", "trainer", "data_pipeline", "launch")
# What each package may import from the others (itself always).
MAY_IMPORT = {
    "launch": {"trainer", "arch", "data_pipeline"},
    "trainer": {"arch", "data_pipeline"},
    "arch": set(),
    "data_pipeline": set(),
}
# Single modules a package may import although their package is not in MAY_IMPORT: the shared
# leaf, placed in arch because arch's plugins are its main users (see arch/registry.py).
SHARED_LEAVES = {"data_pipeline": {"arch.registry"}}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages under ``root``."""
    found = {}
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = file
    return found


def _absolute(module: str, file: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Statements run on import: not function or class bodies, not `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if _is_type_checking(node):
            yield from _module_level(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(node, field, None) or [])
        for handler in getattr(node, "handlers", None) or []:
            yield from _module_level(handler.body)


def imports(module: str, file: Path, known: dict[str, Path], anywhere: bool) -> Iterator[str]:
    """The modules ``module`` imports (``from pkg import sub`` names the submodule ``pkg.sub``
    when it is one); ``anywhere``: inside functions too, else only what runs on import."""
    tree = ast.parse(file.read_text(), str(file))
    nodes = ast.walk(tree) if anywhere else _module_level(tree.body)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, file, node)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            yield from subs or [base]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def order_violations(root: Path) -> list[str]:
    """'module imports target' for every import against the package order."""
    known = modules(root)
    bad = []
    for module, file in known.items():
        package = module.split(".")[0]
        for target in sorted(set(imports(module, file, known, anywhere=True))):
            other = target.split(".")[0]
            if other not in PACKAGES or other == package or other in MAY_IMPORT[package]:
                continue
            if target in SHARED_LEAVES.get(package, set()):
                continue
            bad.append(f"{module} imports {target} ({package} may not import {other})")
    return bad


def import_cycles(root: Path, anywhere: bool) -> list[list[str]]:
    """The strongly connected components (> 1 module) of the import graph (Tarjan)."""
    known = modules(root)
    graph = {
        m: sorted({t for t in imports(m, f, known, anywhere) if t in known and t != m})
        for m, f in known.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_import_follows_the_package_order():
    bad = order_violations(ROOT)
    assert not bad, "imports against launch -> trainer -> {arch, data_pipeline}:\n" + "\n".join(bad)


def test_no_import_cycle_at_module_level():
    cycles = import_cycles(ROOT, anywhere=False)
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_across_packages():
    """Lazy (in-function) imports may form cycles inside a package, never across packages."""
    across = [
        c for c in import_cycles(ROOT, anywhere=True) if len({m.split(".")[0] for m in c}) > 1
    ]
    assert not across, "import cycles across packages: " + "; ".join(
        " <-> ".join(c) for c in across
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A miniature checkout that follows the rules."""
    files = {
        "arch/__init__.py": "",
        "arch/registry.py": "import importlib\n",
        "arch/model.py": "from arch.registry import Registry\n",
        "data_pipeline/__init__.py": "from arch.registry import UserError\n",
        "trainer/__init__.py": "from arch import model\nimport data_pipeline\n",
        "trainer/loop.py": "from . import checkpoint\n",
        "trainer/checkpoint.py": "from arch.model import build_model\n",
        "launch/__init__.py": "",
        "launch/cli.py": "from trainer.loop import Trainer\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert order_violations(tmp_path) == []
    assert import_cycles(tmp_path, anywhere=True) == []
    return tmp_path


@pytest.mark.parametrize(
    "module, text, named",
    [
        ("arch/model.py", "def f():\n    from trainer.checkpoint import x\n", "trainer.checkpoint"),
        ("arch/model.py", "import launch.cli\n", "launch.cli"),
        ("arch/model.py", "import data_pipeline\n", "data_pipeline"),
        ("data_pipeline/__init__.py", "from arch.model import HybridLM\n", "arch.model"),
        ("data_pipeline/__init__.py", "from arch import registry, model\n", "arch.model"),
        ("trainer/loop.py", "import importlib\nimportlib.import_module('launch.cli')\n", "launch"),
        ("arch/model.py", "from ..trainer import loop\n", "trainer.loop"),
    ],
)
def test_the_checker_names_the_module_and_the_import(tree, module, text, named):
    (tree / module).write_text(text)
    bad = order_violations(tree)
    assert len(bad) == 1 and named in bad[0], bad
    assert bad[0].startswith(module.removesuffix(".py").removesuffix("/__init__").replace("/", "."))


def test_the_checker_finds_cycles(tree):
    (tree / "arch/registry.py").write_text("from arch import model\n")
    assert import_cycles(tree, anywhere=False) == [["arch.model", "arch.registry"]]
    (tree / "arch/registry.py").write_text("def f():\n    import trainer.checkpoint\n")
    assert import_cycles(tree, anywhere=False) == []  # lazy: not a module-level cycle ...
    assert import_cycles(tree, anywhere=True) == [  # ... but one across packages
        ["arch.model", "arch.registry", "trainer.checkpoint"]
    ]
    (tree / "arch/registry.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from arch import model\n"
    )
    assert import_cycles(tree, anywhere=False) == []
