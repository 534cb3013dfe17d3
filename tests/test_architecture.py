"""The package's shape: no import cycles, no import from a lower layer up to an entry point, no private name
imported across modules, no module shadowed.

The import graph is read from the source with ``ast`` (module-level and function-level imports alike), so a
cycle or an upward import hidden in a function body is found too.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable
from pathlib import Path

import networkx as nx
import pytest

import exfx

ROOT = Path(exfx.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, tree: ast.Module) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every exfx import in ``tree``."""
    package = name if tree_is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("exfx")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.startswith("exfx"):
                found += [(module, alias.name) for alias in node.names]
    return found


def tree_is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()


def _target(module: str, imported: str | None, modules: Iterable[str]) -> str:
    """The module an import reads: ``from exfx import ops`` reads ``exfx.ops``; ``from exfx import analyse``,
    ``exfx``."""
    return f"{module}.{imported}" if imported and f"{module}.{imported}" in modules else module


def _import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, tree in modules.items():
        for module, imported in _imports(name, tree):
            target = _target(module, imported, modules)
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


#: The entry points: what a user calls or runs, ``exfx`` itself (its re-exports) included.
ENTRY_POINTS = ("exfx", "exfx.__main__", "exfx.api", "exfx.cli", "exfx.demo", "exfx.dynamo_backend", "exfx.pruning")
#: The layers under the entry points (``exfx.<layer>`` and everything in it), which never import one. ``tune/``
#: is not among them: calibration and search take an :class:`exfx.Analysis` and sit beside the entry points.
LOWER_LAYERS = ("passes", "analysis", "ops", "cost", "snp", "capture", "ci")


def _dynamic_imports(tree: ast.Module) -> list[str]:
    """``importlib.import_module("exfx...")`` and ``__import__("exfx...")`` with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and node.args[0].value.startswith("exfx"):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "import_module") \
                    or (isinstance(func, ast.Name) and func.id in ("import_module", "__import__")):
                found.append(node.args[0].value)
    return found


def _entry_points_imported(name: str, tree: ast.Module, modules: Iterable[str]) -> list[str]:
    targets = [_target(module, imported, modules) for module, imported in _imports(name, tree)]
    return sorted({target for target in targets + _dynamic_imports(tree) if target in ENTRY_POINTS})


def test_no_lower_layer_imports_an_entry_point() -> None:
    """``passes/``, ``analysis/``, ``ops/``, ``cost/``, ``snp/``, ``capture/`` and ``ci/`` never import the entry
    points: the arrows run down only (``snp_pass.py`` used to import ``exfx.api`` for ``prune``)."""
    modules = _modules()
    missing = [entry for entry in ENTRY_POINTS if entry not in modules]
    assert not missing, f"entry points renamed or gone (update ENTRY_POINTS): {missing}"
    layers = [layer for layer in LOWER_LAYERS if f"exfx.{layer}" in modules]
    assert layers == list(LOWER_LAYERS), f"layers renamed or gone (update LOWER_LAYERS): {layers}"
    upward = [f"{name} imports {entry}" for name, tree in modules.items()
              if name.split(".")[1:2] and name.split(".")[1] in LOWER_LAYERS
              for entry in _entry_points_imported(name, tree, modules)]
    assert not upward, upward


@pytest.mark.parametrize("name, source, expected", [
    ("exfx.passes.snp_pass", "from exfx.api import analyse", ["exfx.api"]),
    ("exfx.passes.snp_pass", "import exfx.cli as cli", ["exfx.cli"]),
    ("exfx.passes.snp_pass", "from exfx import analyse", ["exfx"]),
    ("exfx.passes.snp_pass", "import exfx", ["exfx"]),
    ("exfx.passes.snp_pass", "from .. import demo", ["exfx.demo"]),
    ("exfx.analysis", "from ..dynamo_backend import backend", ["exfx.dynamo_backend"]),
    ("exfx.cost.flops", "def f():\n    from exfx.pruning import prune", ["exfx.pruning"]),
    ("exfx.ops.enp", "import importlib\nimportlib.import_module('exfx.api')", ["exfx.api"]),
    ("exfx.cost.flops", "from exfx import ops\nimport exfx.passes.attributes\nfrom ..snp import report", []),
])
def test_the_entry_point_check_sees_every_kind_of_import(name: str, source: str, expected: list[str]) -> None:
    assert _entry_points_imported(name, ast.parse(source), _modules()) == expected


def test_the_import_graph_has_no_cycle() -> None:
    graph = _import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_a_private_name_from_another() -> None:
    private = [f"{name} imports {module}.{imported}" for name, tree in _modules().items()
               for module, imported in _imports(name, tree)
               if imported and imported.startswith("_") and not imported.startswith("__") and module != name]
    assert not private, private


def test_no_module_attribute_is_shadowed_by_a_function_of_the_same_name() -> None:
    """``exfx.calibrate`` used to be the function and hide the module of the same name, and so did ``exfx.backend``."""
    shadowed = []
    for info in pkgutil.walk_packages(exfx.__path__, "exfx."):
        if info.name.endswith("__main__"):  # importing it runs the command line
            continue
        parent_name, _, leaf = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        module = importlib.import_module(info.name)
        if getattr(parent, leaf, module) is not module:
            shadowed.append(f"{parent_name}.{leaf} is {getattr(parent, leaf)!r}, not the module {info.name}")
    assert not shadowed, shadowed


@pytest.mark.parametrize("old", ["exfx.calibrate", "exfx.backend", "exfx.flops", "exfx.graphdiff", "exfx.spec",
                                 "exfx.pareto", "exfx.dynamo_capture", "exfx.ops.enp_ops"])
def test_no_stand_in_module_under_a_pre_release_path(old: str) -> None:
    """exfx was never released: no old module path is kept alive (``exfx.calibrate``/``exfx.backend`` are functions)."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


@pytest.mark.parametrize("package, name", [(exfx, "flops"), (exfx, "graphdiff"), (exfx, "spec"), (exfx, "pareto"),
                                           (exfx, "dynamo_capture"), (exfx.ops, "ZTEST_TEST_FLOPS")])
def test_no_module_getattr_serves_a_moved_name(package: object, name: str) -> None:
    assert not hasattr(package, "__getattr__")
    with pytest.raises(AttributeError):
        getattr(package, name)


def test_passes_take_only_their_current_arguments() -> None:
    import torch

    from exfx.passes import EnpPass, ExchangeabilityPass

    with pytest.raises(TypeError, match="samples"):
        ExchangeabilityPass(samples=8)  # type: ignore[call-arg]
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU())
    report = exfx.analyse(model.eval(), (torch.randn(2, 4),)).explain(exfx.Config(samples=8))
    with pytest.raises(TypeError):  # exfx 0.1's EnpPass(report.sites): the report's rows are no pass argument
        EnpPass(report.sites)  # type: ignore[arg-type]
