"""Message passing between a linear and its ReLU (PyG's ``GCNConv``): partial sums carried through it.

``GCNConv`` computes ``propagate(x W) + b``: gather the source rows, scale them by the edge weight, scatter-add
them into the targets. That is one matrix acting on rows, so ``propagate(x W) == propagate(x) W`` and the site
runs ENP on ``propagate(x)`` with ``W``. Checked here: PyG's ``GCN`` model, hand-written spellings of the
propagation (hypothesis picks the spelling, the sizes and where the biases go), refusals with their reasons, FLOP
counts against ``FlopCounterMode``, and the benchmark GCN written with ``GCNConv``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import exfx

from helpers import assert_enp_invariant

NEVER = exfx.Config(threshold=-math.inf, samples=4)
PRUNING = exfx.Config(threshold=0.0, samples=4)


def _edges(nodes: int, edges: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(0, nodes, (edges,), generator=generator)
    dst = torch.randint(0, nodes, (edges,), generator=generator)
    return src, dst, torch.rand(edges, generator=generator) + 0.1


class Propagated(nn.Module):
    """``relu(propagate(lin(relu(embed(x)))) [+ bias])``, ``propagate`` spelled one of several ways."""

    SPELLINGS = ("scatter_add", "index_add", "getitem", "scatter_expand", "dense")

    def __init__(self, spelling: str, d_in: int = 5, hidden: int = 12, out: int = 10, bias_before: bool = False,
                 bias_after: bool = True) -> None:
        super().__init__()
        self.spelling = spelling
        self.embed = nn.Linear(d_in, hidden)
        self.lin = nn.Linear(hidden, out, bias=bias_before)
        self.bias = nn.Parameter(torch.randn(out)) if bias_after else None
        self.head = nn.Linear(out, 3)

    def propagate(self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "dense":  # A @ h with A built from the edges (the existing left-matmul form)
            adj = x.new_zeros(x.size(0), x.size(0)).index_put((dst, src), weight, accumulate=True)
            return adj @ h
        if self.spelling == "getitem":
            messages = h[src] * weight.unsqueeze(-1)
        else:
            messages = h.index_select(0, src) * weight.view(-1, 1)
        if self.spelling == "index_add":
            return torch.zeros_like(h).index_add(0, dst, messages)
        if self.spelling == "scatter_expand":
            index = dst.view(-1, 1).expand(-1, h.size(1))
            return h.new_zeros(h.shape).scatter_add(0, index, messages)
        index = dst.view(-1, 1).expand_as(messages)
        return h.new_zeros(h.size(0), h.size(1)).scatter_add(0, index, messages)

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = self.propagate(self.lin(torch.relu(self.embed(x))), src, dst, weight, x)
        if self.bias is not None:
            h = h + self.bias
        return self.head(torch.relu(h))


def _inputs(nodes: int = 9, edges: int = 30, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return (torch.randn(nodes, 5, generator=torch.Generator().manual_seed(seed)), *_edges(nodes, edges, seed))


def _dense_flops(model: nn.Module, *inputs: object) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


@settings(max_examples=12, deadline=None)
@given(spelling=st.sampled_from(Propagated.SPELLINGS), out=st.sampled_from([4, 10, 17]),
       bias_before=st.booleans(), bias_after=st.booleans(), seed=st.integers(0, 3))
def test_propagated_linear_is_a_site_and_exact(spelling, out, bias_before, bias_after, seed):
    torch.manual_seed(seed)
    model = Propagated(spelling, out=out, bias_before=bias_before, bias_after=bias_after).eval()
    inputs = _inputs(seed=seed)
    analysis = exfx.analyse(model, inputs)
    site = analysis.site("lin")
    assert site.eligible, site.reason
    assert bool(site.propagation) == (spelling != "dense") and bool(site.left) == (spelling == "dense")
    never = analysis.compile(NEVER)
    for other in (inputs, _inputs(nodes=14, edges=50, seed=seed + 10)):  # other node and edge counts too
        with torch.no_grad():
            torch.testing.assert_close(never(*other), model(*other), rtol=1e-4, atol=1e-5)
    records = assert_enp_invariant(analysis.compile(PRUNING), *inputs, rtol=1e-4, atol=1e-5)
    assert set(records) == {"lin"}


def test_the_propagated_input_has_the_input_columns_and_flops_count_what_runs():
    model = Propagated("scatter_add", hidden=12, out=10, bias_before=True).eval()
    inputs = _inputs()
    analysis = exfx.analyse(model, inputs)
    assert analysis.site("lin").signature == "linear 12->10 propagates 12 input columns, not 10 output ones"
    never = analysis.compile(NEVER)
    flops = exfx.count_flops(never, *inputs)
    assert flops.dense == _dense_flops(model, *inputs)  # gather, scale and scatter count no FLOPs, as before
    assert flops.executed >= flops.dense  # never prunes, and pays for the tests
    pruning = analysis.compile(PRUNING)
    assert exfx.count_flops(pruning, *inputs).executed < flops.dense
    # The linear is gone: ENP runs on the propagated input, and the message passing only once.
    linears = [n for n in never.graph.nodes if n.target is torch.nn.functional.linear]
    assert [n.args[1].target for n in linears] == ["embed.weight", "head.weight"]
    assert sum(n.target == "scatter_add" for n in never.graph.nodes) == 2  # x's columns, and the bias column


@pytest.mark.parametrize("spelling", Propagated.SPELLINGS)
def test_flops_count_the_propagation_that_runs(spelling):
    model = Propagated(spelling, hidden=12, out=7, bias_before=True).eval()
    inputs = _inputs()
    flops = exfx.count_flops(exfx.compile(model, inputs, NEVER), *inputs)
    nodes = inputs[0].shape[0]
    # A left matmul now multiplies x's 12 columns, not 7 (FlopCounterMode counts it); gather and scatter count 0.
    moved = 2 * nodes * nodes * (12 - 7) if spelling == "dense" else 0
    assert flops.dense == _dense_flops(model, *inputs) + moved


class Refused(nn.Module):
    """Chains that are not feature-linear, each with the reason exfx gives."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(5, 12)
        self.lin = nn.Linear(12, 10, bias=False)
        self.scale = nn.Parameter(torch.rand(10))

    def forward(self, x, src, dst, weight):
        h = self.lin(torch.relu(self.embed(x)))
        if self.kind == "feature_scale":  # a per-feature scale: does not commute with W
            out = h.index_select(0, src) * self.scale
        elif self.kind == "feature_gather":  # picks feature columns
            out = h.index_select(1, torch.arange(9, -1, -1))
        elif self.kind == "amax":  # a max is not linear
            index = dst.view(-1, 1).expand(-1, 10)
            out = x.new_zeros(x.size(0), 10).scatter_reduce(0, index, h.index_select(0, src), "amax")
        elif self.kind == "feature_mask":  # a mask over every entry flattens rows and features together
            out = h[x[:, :1].expand(-1, 10) > 0]
        elif self.kind == "used_twice":  # the linear's output also feeds the head
            out = h.index_select(0, src) * weight.view(-1, 1)
            return torch.relu(out).sum() + h.sum()
        else:  # squares the messages
            messages = h.index_select(0, src)
            out = messages * messages
        return torch.relu(out)


@pytest.mark.parametrize("kind, reason", [
    ("feature_scale", "which is not one number per row"),
    ("feature_gather", "selects along the feature axis"),
    ("feature_mask", "indexes the feature axis"),
    ("amax", "reduces with 'amax'; only a sum is linear"),
    ("used_twice", "outside the pre-activation"),
    ("square", "multiplies two values computed from the producer"),
])
def test_chains_that_mix_features_are_refused_with_the_reason(kind, reason):
    model = Refused(kind).eval()
    inputs = _inputs()
    report = exfx.explain(model, inputs)
    (site,) = [s for s in report.sites if not s.name.startswith("embed")]
    assert not site.eligible and reason in site.reason and "message passing after `lin` (linear)" in site.reason
    with torch.no_grad():  # still compiles, left dense
        torch.testing.assert_close(exfx.compile(model, inputs, NEVER)(*inputs), model(*inputs))


@pytest.mark.slow  # Dynamo captures PyG's GCNConv, as in test_third_party's slow cases; .ci/run runs it
def test_pyg_gcn_relus_are_sites():
    pytest.importorskip("torch_geometric")
    from models import build

    model, inputs = build("GCN (PyTorch Geometric)")
    analysis = exfx.analyse(model, inputs)
    first, second = analysis.report.sites
    assert first.name == "body.convs.0.lin" and "model input" in first.reason  # contracts over the raw features
    assert second.name == "body.convs.1.lin" and second.eligible, second.reason
    assert analysis.site("body.convs.1.lin").propagation
    never = analysis.compile(exfx.Config(threshold=-math.inf, samples=16))
    with torch.no_grad():
        torch.testing.assert_close(never(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    flops = exfx.count_flops(never, *inputs)
    assert flops.dense == _dense_flops(model, *inputs)
    pruning = analysis.compile(exfx.Config(threshold=0.0, samples=16))
    records = assert_enp_invariant(pruning, *inputs, rtol=1e-4, atol=1e-5)
    assert records["body.convs.1.lin"].pruned > 0
    assert exfx.count_flops(pruning, *inputs).executed < flops.dense


@pytest.mark.slow  # Dynamo captures PyG's GCNConv, as in test_third_party's slow cases; .ci/run runs it
def test_benchmark_gcn_spelled_with_gcnconv_is_the_same_function_with_a_site_per_layer():
    pytest.importorskip("torch_geometric")
    from exfx.examples import GCN, GCNConvGCN
    from models import randomise_bn
    from test_benchmark_models import _graphs

    torch.manual_seed(0)
    gcn = GCN(hidden=32, layers=3, aggregation="gather")
    randomise_bn(gcn)
    gcn.eval()
    spelled = GCNConvGCN.from_gcn(gcn)
    inputs = _graphs([9, 11], seed=2)
    with torch.no_grad():
        torch.testing.assert_close(spelled(*inputs), gcn(*inputs), rtol=1e-4, atol=1e-5)
    analysis = exfx.analyse(spelled, inputs)
    assert sorted(s.name for s in analysis.report.sites if s.eligible) == [f"convs.{i}.lin" for i in range(3)]
    never = analysis.compile(exfx.Config(threshold=-math.inf, samples=16))
    with torch.no_grad():
        torch.testing.assert_close(never(*inputs), gcn(*inputs), rtol=1e-4, atol=1e-5)
    assert exfx.count_flops(never, *inputs).dense == _dense_flops(gcn, *inputs)
    assert_enp_invariant(analysis.compile(exfx.Config(threshold=0.0, samples=16)), *inputs, rtol=1e-4, atol=1e-5)
