"""CanonicalizePass: one spelling per ReLU, linear and conv; eval-mode identities removed; output unchanged."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import exfx
from exfx.passes import CanonicalizePass
from exfx.passes.canonicalize_pass import is_producer, is_relu
from models import MLP, FunctionalMLP, VGGish


def canonicalize(model: nn.Module, *inputs: torch.Tensor) -> tuple[fx.GraphModule, torch.Tensor, bool]:
    """Trace, propagate shapes and canonicalize; also return the traced graph's output before the pass."""
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        before = gm(*[i.clone() for i in inputs])
        ShapeProp(gm).propagate(*[i.clone() for i in inputs])
    result = CanonicalizePass()(gm)
    return gm, before, result.modified


def calls(gm: fx.GraphModule, op: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == op]


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


# ---------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------

SPELLINGS = {
    "nn.ReLU": lambda m, t: m.relu_module(t),
    "nn.ReLU(inplace)": lambda m, t: m.relu_inplace_module(t),
    "F.relu": lambda m, t: F.relu(t),
    "F.relu(inplace)": lambda m, t: F.relu(t, inplace=True),
    "F.relu_": lambda m, t: F.relu_(t),
    "torch.relu": lambda m, t: torch.relu(t),
    "torch.relu_": lambda m, t: torch.relu_(t),
    "Tensor.relu": lambda m, t: t.relu(),
    "Tensor.relu_": lambda m, t: t.relu_(),
}
INPLACE = {"nn.ReLU(inplace)", "F.relu(inplace)", "F.relu_", "torch.relu_", "Tensor.relu_"}


class OneRelu(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.relu_module, self.relu_inplace_module = nn.ReLU(), nn.ReLU(inplace=True)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SPELLINGS[self.spelling](self, self.fc(x)) * 2


class ReluResultIgnored(OneRelu):
    """The in-place ReLU's return value is dropped; the mutated input is what is used later."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        before = h.sum(-1, keepdim=True)  # read before the in-place ReLU: sees negative values
        SPELLINGS[self.spelling](self, h)
        return h + before


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_relu_spelling_becomes_torch_relu(spelling: str) -> None:
    x = torch.randn(4, 6)
    model = OneRelu(spelling).eval()
    gm, before, modified = canonicalize(model, x)
    relus = [n for n in gm.graph.nodes if is_relu(n)]
    assert len(relus) == 1
    assert relus[0].args == (relus[0].args[0],) and not relus[0].kwargs
    assert not any(t in ("relu", "relu_") or t in (F.relu, torch.relu_, F.relu_) for t in targets(gm))
    assert not any(isinstance(gm.get_submodule(str(n.target)), nn.ReLU) for n in calls(gm, "call_module"))
    assert modified  # at least the Linear was rewritten
    torch.testing.assert_close(gm(x), before)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("spelling", sorted(INPLACE))
def test_inplace_relu_semantics_preserved_when_input_used_later(spelling: str) -> None:
    x = torch.randn(5, 6)
    model = ReluResultIgnored(spelling).eval()
    gm, before, _ = canonicalize(model, x)
    assert not any(n.target in ("relu_",) or n.target in (torch.relu_, F.relu_) for n in gm.graph.nodes)
    expected = model(x.clone())
    torch.testing.assert_close(before, expected)
    torch.testing.assert_close(gm(x), expected)
    # Sanity: the in-place semantics matter here (an out-of-place reading would differ).
    h = model.fc(x)
    assert not torch.allclose(h + h.sum(-1, keepdim=True), expected)


def test_mlp_with_every_spelling() -> None:
    x = torch.randn(3, 20)
    model = MLP().eval()
    gm, before, modified = canonicalize(model, x)
    assert modified
    assert sum(is_relu(n) for n in gm.graph.nodes) == 4
    assert [n.meta["exfx_name"] for n in gm.graph.nodes if is_producer(n)] == [f"net.{i}" for i in range(5)]
    torch.testing.assert_close(gm(x), model(x))


def test_canonical_relu_is_left_alone() -> None:
    gm, _, modified = canonicalize(OneRelu("torch.relu").eval(), torch.randn(2, 6))
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # the Linear was rewritten ...
    gm2 = fx.symbolic_trace(lambda t: torch.relu(t))
    ShapeProp(gm2).propagate(torch.randn(2, 3))
    assert CanonicalizePass()(gm2).modified is False  # ... but a bare torch.relu needs nothing


# ---------------------------------------------------------------------------
# Other in-place ops: out-of-place, later users redirected, never dropped
# ---------------------------------------------------------------------------


class InplaceOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 40), nn.Linear(40, 40)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.add_(1.0)  # result ignored: only the mutation matters
        h = F.relu(h)
        g = self.b(h)
        g.mul_(2.0)
        g += 0.5
        self.act(g)
        torch.sigmoid_(g)
        return F.relu(g)


def test_inplace_ops_are_not_dropped() -> None:
    x = torch.randn(3, 8)
    model = InplaceOps().eval()
    gm, before, _ = canonicalize(model, x)
    expected = model(x)
    torch.testing.assert_close(before, expected)
    torch.testing.assert_close(gm(x), expected)
    inplace = [n for n in gm.graph.nodes if n.op == "call_method" and str(n.target).endswith("_")]
    assert not inplace
    assert not any(n.target in (operator.iadd, torch.sigmoid_) for n in gm.graph.nodes)
    # The compiler as a whole, with and without pruning, also sees the mutations.
    never = exfx.compile(model, (x,), exfx.Config(threshold=float("-inf"), samples=16))
    torch.testing.assert_close(never(x), expected)


def test_inplace_op_on_a_view_whose_base_is_read_later_is_refused() -> None:
    class ViewMutation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h[:, :3].mul_(0.0)
            return h.relu()

    with pytest.raises(exfx.UnsupportedModelError, match="mul_"):
        exfx.compile(ViewMutation().eval(), (torch.randn(2, 4),))


# ---------------------------------------------------------------------------
# Linear and conv
# ---------------------------------------------------------------------------


class Producers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 9)
        self.lin_nb = nn.Linear(9, 7, bias=False)
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding="same", dilation=2)
        self.c2v = nn.Conv2d(8, 4, (3, 1), padding="valid", bias=False, groups=2)
        self.w = nn.Parameter(torch.randn(5, 4, 3))
        self.b = nn.Parameter(torch.randn(5))
        self.w2 = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.m = nn.Parameter(torch.randn(7, 3))

    def forward(self, v: torch.Tensor, s: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.lin_nb(self.lin(v)) @ self.m
        b = F.conv1d(s, self.w, self.b, 1, "same")
        c = self.c2v(self.c2(img))
        d = F.conv2d(c, self.w2, padding=(1, 2), stride=(2, 1))
        e = F.linear(v, self.lin.weight)
        return a, b, self.c1(s), c, d, e


def test_linear_and_conv_become_functional_with_get_attr_weights() -> None:
    inputs = (torch.randn(2, 12), torch.randn(2, 4, 9), torch.randn(2, 3, 10, 10))
    model = Producers().eval()
    gm, before, _ = canonicalize(model, *inputs)
    assert not calls(gm, "call_module")
    producers = [n for n in gm.graph.nodes if is_producer(n)]
    kinds = [(n.target, n.meta["exfx_name"]) for n in producers]
    assert kinds == [(F.linear, "lin"), (F.linear, "lin_nb"), (F.linear, "m"), (F.conv1d, "w"),
                     (F.conv2d, "c2"), (F.conv2d, "c2v"), (F.conv2d, "w2"), (F.linear, "lin"),
                     (F.conv1d, "c1")]
    for node in producers:
        assert len(node.args) == 3
        weight, bias = node.args[1], node.args[2]
        assert isinstance(weight, fx.Node)
        assert weight.op == "get_attr" or (weight.op == "call_method" and weight.target == "t")
        assert bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")
        if node.target is not F.linear:
            assert set(node.kwargs) == {"stride", "padding", "dilation", "groups"}
            assert all(isinstance(node.kwargs[k], list) for k in ("stride", "padding", "dilation"))
    by_name = {n.meta["exfx_name"]: n for n in producers}
    assert by_name["c2"].kwargs["padding"] == [2, 2]  # 'same' with dilation 2 and a 3x3 kernel
    assert by_name["c2v"].kwargs == {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 2}
    assert by_name["w"].kwargs["padding"] == [1]
    assert by_name["w2"].kwargs == {"stride": [2, 1], "padding": [1, 2], "dilation": [1, 1], "groups": 1}
    assert by_name["lin_nb"].args[2] is None
    assert by_name["m"].args[1].target == "t"
    for got, want in zip(gm(*inputs), model(*inputs)):
        torch.testing.assert_close(got, want)
    for got, want in zip(gm(*inputs), before):
        torch.testing.assert_close(got, want)


def test_functional_mlp_names_come_from_parameters() -> None:
    x = torch.randn(3, 16)
    model = FunctionalMLP().eval()
    gm, _, _ = canonicalize(model, x)
    assert [n.meta["exfx_name"] for n in gm.graph.nodes if is_producer(n)] == ["w1", "w2", "w3"]
    torch.testing.assert_close(gm(x), model(x))


class EvenSame(nn.Module):
    """'same' padding with an even kernel pads asymmetrically: no explicit symmetric form exists."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 40, 3, padding=1)
        self.w = nn.Parameter(torch.randn(40, 40, 2, 2) * 0.1)
        self.mod = nn.Conv2d(40, 40, 2, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(F.conv2d(h, self.w, None, 1, "same"))
        return F.relu(self.mod(h))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_asymmetric_same_padding_is_left_alone_and_not_a_producer() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = EvenSame().eval()
    gm, _, _ = canonicalize(model, x)
    convs = [n for n in gm.graph.nodes if n.target is F.conv2d]
    assert [is_producer(n) for n in convs] == [True, False]
    assert any(n.op == "call_module" and n.target == "mod" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
    # The compiler leaves both alone (no producer it can rewrite) and stays exact.
    report = exfx.explain(model, (x,), exfx.Config(samples=8))
    assert [s.eligible for s in report.sites] == [False, False, False]
    compiled = exfx.compile(model, (x,), exfx.Config(samples=8))
    torch.testing.assert_close(compiled(x), model(x))


def test_padding_mode_other_than_zeros_is_left_as_a_module() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")).eval()
    x = torch.randn(1, 3, 6, 6)
    gm, _, _ = canonicalize(model, x)
    assert [n.target for n in calls(gm, "call_module")] == ["0"]
    torch.testing.assert_close(gm(x), model(x))


# ---------------------------------------------------------------------------
# Eval-mode identities
# ---------------------------------------------------------------------------


class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.drop, self.drop2, self.ident = nn.Dropout(0.5), nn.Dropout1d(0.3), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc(x))
        h = F.dropout(h, 0.2, training=self.training)
        h = self.ident(h)
        return self.drop2(h.unsqueeze(-1)).squeeze(-1)


def test_eval_dropout_and_identity_are_removed() -> None:
    x = torch.randn(4, 5)
    model = Dropouts().eval()
    gm, _, _ = canonicalize(model, x)
    assert not calls(gm, "call_module")
    assert F.dropout not in targets(gm)
    torch.testing.assert_close(gm(x), model(x))


def test_training_dropout_call_is_kept() -> None:
    """``F.dropout(x)`` defaults to training=True: it is real dropout even in eval mode, so it stays."""
    gm = fx.symbolic_trace(lambda t: F.dropout(t, 0.5))
    ShapeProp(gm).propagate(torch.randn(3))
    CanonicalizePass()(gm)
    assert F.dropout in targets(gm)


@pytest.mark.parametrize("model_fn,shape", [(VGGish, (2, 3, 16, 16)), (MLP, (4, 20))])
def test_output_unchanged_on_example_models(model_fn, shape) -> None:
    x = torch.randn(*shape)
    model = model_fn().eval()
    gm, before, _ = canonicalize(model, x)
    torch.testing.assert_close(gm(x), before)
    torch.testing.assert_close(gm(x), model(x))
    gm.graph.lint()


def test_inplace_op_without_out_of_place_twin_is_refused() -> None:
    class Zeroes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h.zero_()
            return h.relu()

    with pytest.raises(exfx.UnsupportedModelError, match=r"zero_.*out of place"):
        exfx.explain(Zeroes().eval(), (torch.randn(2, 4),))


def test_augmented_assignment_keeps_graph_module_semantics() -> None:
    """``operator.iadd`` (Dynamo-style graphs spell ``+=`` so) is emitted as ``a += b`` in the GraphModule's
    code: a tensor is mutated and a Python number is rebound, so later readers see the new value either way."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    n = graph.call_method("size", (x, 0))
    n_plus = graph.call_function(operator.iadd, (n, 1))
    numbers = graph.call_function(operator.add, (n, n_plus))  # `size += 1` rebound n: 2 (n + 1)
    x_plus = graph.call_function(operator.iadd, (x, 1.0))
    tensors = graph.call_function(operator.mul, (x, 2.0))  # x was mutated: 2 (x + 1)
    graph.output((numbers, tensors, x_plus))
    gm = fx.GraphModule(nn.Module(), graph)
    inp = torch.randn(3, 4)
    expected = gm(inp.clone())
    assert expected[0] == 8
    torch.testing.assert_close(expected[1], 2 * (inp + 1))
    ShapeProp(gm).propagate(inp.clone())
    CanonicalizePass()(gm)
    assert operator.iadd not in [n.target for n in gm.graph.nodes]
    got = gm(inp)
    assert got[0] == 8
    torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2])
