"""The package's shape: no import cycles, no private name imported across modules, no module shadowed.

The import graph is read from the source with ``ast`` (module-level and function-level imports alike), so a
cycle hidden in a function body is found too.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
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


def _import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, tree in modules.items():
        for module, imported in _imports(name, tree):
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in modules else module
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


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


@pytest.mark.parametrize("old, new", [("flops", "exfx.cost.flops"), ("graphdiff", "exfx.ci.graphdiff"),
                                      ("pareto", "exfx.tune.pareto")])
def test_moved_modules_still_resolve_with_a_warning(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(exfx, old) is importlib.import_module(new)


def test_moved_cost_constants_still_resolve_with_a_warning() -> None:
    from exfx.cost.model import ZTEST_TEST_FLOPS

    with pytest.warns(DeprecationWarning, match="exfx.cost.model"):
        assert exfx.ops.ZTEST_TEST_FLOPS == ZTEST_TEST_FLOPS


@pytest.mark.parametrize("statement, new", [
    ("from exfx.calibrate import evaluate", "exfx.tune.evaluation"),
    ("from exfx.calibrate import DEFAULT_SCHEDULES", "exfx.tune.calibration"),
    ("from exfx.flops import count_flops", "exfx.cost.flops"),
    ("from exfx.backend import exfx_backend", "exfx.dynamo_backend"),
    ("from exfx.ops.enp_ops import MOMENT_FLOPS_PER_TERM", "exfx.cost.model"),
])
def test_old_import_paths_still_work_with_a_warning(statement: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=new):
        exec(statement, {})


def test_deprecated_pass_arguments_still_work_with_a_warning() -> None:
    import torch

    from exfx.passes import EnpPass, ExchangeabilityPass

    with pytest.warns(DeprecationWarning, match="decided per plan"):
        ExchangeabilityPass(samples=8)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU())
    analysis = exfx.analyse(model.eval(), (torch.randn(2, 4),))
    report = analysis.explain(exfx.Config(samples=8))
    with pytest.warns(DeprecationWarning, match="SiteParams"):
        assert EnpPass(report.sites).params == {"2": exfx.Config(samples=8).site_params}
