"""Graph text, diffs and golden checks (exfx.ci.graphdiff, exfx.testing)."""

from __future__ import annotations

import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import exfx
from exfx import examples
from exfx.ci import graphdiff
from exfx.testing import assert_graph_matches

from specs import mlp, mlp_widened

TESTS = Path(__file__).parent
GOLDEN = TESTS / "golden"


def _text(factory, config=None) -> str:
    model, inputs = factory()
    return graphdiff.graph_text(exfx.compile(model, inputs, config))


def test_text_is_deterministic_within_a_process():
    assert _text(mlp) == _text(mlp)


@pytest.mark.slow  # two fresh interpreters import torch and exfx (about 5 s)
def test_text_is_deterministic_across_processes():
    code = "import exfx, specs; from exfx.ci.graphdiff import graph_text; m, i = specs.mlp(); " \
           "print(graph_text(exfx.compile(m, i)), end='')"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    outputs = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout for _ in range(2)}
    assert outputs == {_text(mlp)}


def test_set_arguments_render_in_one_order():
    """A set iterates in an order that depends on its history and, for strings, on the process's hash seed."""
    def text(values: set) -> str:
        graph = fx.Graph()
        graph.output(graph.call_function(operator.contains, (values, graph.placeholder("x"))))
        return graphdiff.graph_text(fx.GraphModule(torch.nn.Module(), graph))

    first, second = set(), set()
    for value in (8, 16):
        first.add(value)
    for value in (16, 8):
        second.add(value)
    assert first == second and list(first) != list(second)
    assert text(first) == text(second) and "contains({16, 8}, %x)" in text(first)  # sorted as text


def test_text_has_sites_ops_and_params_but_no_addresses_or_paths():
    text = _text(mlp, exfx.Config(rule="ztest", alpha=0.1, samples=(8, 16)))
    assert "# site 2: linear 64->64; group g0; ztest alpha=0.1; samples 8,16" in text
    assert "exfx.partial_sum.default" in text and "exfx.early_exit.default" in text
    assert "'ztest', 0.1" in text
    assert "site 0: linear 16->64; not rewritten: contraction axis is a model input" in text
    assert not re.search(r"0x[0-9a-f]{6,}", text)
    assert "/" not in text.replace("->", "")
    assert "Traceback" not in text


def test_infinite_threshold_renders_stably():
    text = _text(mlp, exfx.Config(threshold=float("-inf")))
    assert "'threshold', -inf" in text and "threshold T=-inf" in text


def test_check_matches_and_reports_a_widened_site(tmp_path):
    golden = tmp_path / "mlp.txt"
    assert graphdiff.check(_text(mlp), golden, update=True).updated
    assert graphdiff.check(_text(mlp), golden).ok
    result = graphdiff.check(_text(mlp_widened), golden)
    assert not result.ok
    assert "site 2: linear 64->64" in result.diff and "linear 64->96" in result.diff
    assert result.diff.splitlines()[0].startswith("site 2:")


def test_missing_golden_file_fails_with_advice(tmp_path):
    result = graphdiff.check(_text(mlp), tmp_path / "none.txt")
    assert not result.ok and "--update" in result.diff


def test_structural_check_ignores_node_names_but_not_structure(tmp_path):
    text = _text(mlp)
    renamed = re.sub(r"\brelu_1\b", "activation_b", text)
    assert renamed != text
    golden = tmp_path / "g.txt"
    golden.write_text(renamed)
    assert not graphdiff.check(text, golden).ok
    assert graphdiff.check(text, golden, structural=True).ok
    assert not graphdiff.check(_text(mlp_widened), golden, structural=True).ok
    assert not graphdiff.check(_text(mlp, exfx.Config(samples=(8, 16))), golden, structural=True).ok


class _Renamed(torch.nn.Module):
    """specs.mlp's network with its modules named, not numbered."""

    def __init__(self) -> None:
        super().__init__()
        model, _ = mlp()
        self.encoder, self.hidden, self.head = model[0], model[2], model[4]
        self.flat = torch.nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.encoder(self.flat(x))))))


def test_structural_check_ignores_module_names(tmp_path):
    """Site names are arguments of the exfx ops and leaf modules are named in call_module targets: renaming a
    module failed the structural check that the docstring says it passes."""
    _, inputs = mlp()
    named = graphdiff.graph_text(exfx.compile(_Renamed().eval(), inputs))
    assert "'hidden'" in named and "flat<Flatten>" in named
    golden = tmp_path / "g.txt"
    golden.write_text(graphdiff.graph_text(exfx.compile(_Renamed().eval(), inputs))
                      .replace("hidden", "fc").replace("flat", "stem"))
    assert not graphdiff.check(named, golden).ok
    assert graphdiff.check(named, golden, structural=True).ok
    golden.write_text(_text(mlp_widened))
    assert not graphdiff.check(named, golden, structural=True).ok


def _small_cnn_with_pool_ceil_mode(ceil_mode: bool) -> str:
    from exfx.examples import small_cnn

    model, inputs = small_cnn()
    model.features[6].ceil_mode = ceil_mode  # the first MaxPool2d, a leaf module; same shapes either way
    return graphdiff.graph_text(exfx.compile(model, inputs))


def test_a_leaf_modules_hyperparameters_are_in_the_text_and_the_structure(tmp_path):
    """Format 1 printed a call_module node's type only: a changed pooling mode passed the golden check."""
    text = _small_cnn_with_pool_ceil_mode(False)
    assert "features.6<MaxPool2d>(%relu_1)  # kernel_size=2, stride=2, padding=0" in text
    golden = tmp_path / "g.txt"
    golden.write_text(text)
    changed = _small_cnn_with_pool_ceil_mode(True)
    assert not graphdiff.check(changed, golden).ok
    assert not graphdiff.check(changed, golden, structural=True).ok
    assert graphdiff.check(text, golden, structural=True).ok


def test_a_golden_file_in_an_older_format_says_so(tmp_path):
    text = _text(mlp)
    golden = tmp_path / "g.txt"
    golden.write_text(text.replace(f"format {graphdiff.FORMAT_VERSION}", "format 1", 1))
    result = graphdiff.check(text, golden)
    assert not result.ok
    assert result.diff.startswith(f"{golden} is in graph-text format 1, this exfx writes format "
                                  f"{graphdiff.FORMAT_VERSION}")
    golden.write_text(text.replace("relu_1", "relu_b"))
    assert "graph-text format" not in graphdiff.check(text, golden).diff


def test_structural_parser_refuses_lines_it_cannot_read():
    text = _text(mlp)
    with pytest.raises(ValueError, match="line 4 is not exfx graph text"):
        graphdiff.structural_graph("\n".join(text.splitlines()[:3] + ["x = placeholder x("] + text.splitlines()[3:]))


def test_assert_graph_matches_and_update_env(tmp_path, monkeypatch):
    golden = tmp_path / "g.txt"
    monkeypatch.setenv("EXFX_UPDATE_GOLDEN", "1")
    assert_graph_matches("specs:mlp", golden)
    monkeypatch.delenv("EXFX_UPDATE_GOLDEN")
    assert_graph_matches("specs:mlp", golden)
    model, inputs = mlp()
    assert_graph_matches(exfx.compile(model, inputs), golden)
    with pytest.raises(AssertionError, match="linear 64->96"):
        assert_graph_matches("specs:mlp_widened", golden)


@pytest.mark.parametrize("name", ["small_cnn", "mlp", "resnet_block_net"])
def test_project_golden_files(name):
    """The project's own CI guard: the example models' rewritten graphs are pinned."""
    assert_graph_matches(f"exfx.examples:{name}", GOLDEN / f"{name}.txt")


def test_compiled_graph_text_round_trips_through_structural_parser():
    text = _text(mlp)
    graph = graphdiff.structural_graph(text)
    model, inputs = mlp()
    gm = exfx.compile(model, inputs)
    assert graph.number_of_nodes() == len(gm.graph.nodes)
    assert torch.allclose(gm(*inputs), gm(*inputs))


def test_native_golden_file(monkeypatch):
    """The native lowering's graph, pinned with its choices forced (EXFX_FORCE_LOWERING=native): what the timing
    model picks on a machine is not pinned, the form each site is lowered to is. The text carries each native
    op's arguments, the dense weight and ``max_rows`` (-1: native at every size) included."""
    monkeypatch.setenv("EXFX_FORCE_LOWERING", "native")
    model, inputs = examples.mlp()
    gm = exfx.compile(model, inputs, lowering="native")
    assert_graph_matches(gm, GOLDEN / "mlp_native.txt")
