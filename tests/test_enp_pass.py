"""EnpPass through ``exfx.compile``: never-prune equivalence and the ENP invariant at every site.

The invariant: after a site's ReLU every value is either the dense value computed from the same layer
input (up to float reassociation) or exactly 0. :func:`helpers.assert_enp_invariant` checks it at every
site against an oracle built from plain ``F.linear``/``F.conv*d``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import exfx
from exfx.meta import rewrite_role, site_of
from helpers import assert_enp_invariant, enp_nodes, record_sites, site_relus
from models import GCN, MLP, FunctionalMLP, OPTBlockLM, ResNetish, VGGish

NEVER = {"threshold": exfx.Config(threshold=float("-inf"), samples=8),
         "ztest": exfx.Config(rule="ztest", alpha=0.0, samples=8)}
TOL = dict(rtol=1e-5, atol=1e-5)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv1d(4, 24, 3, padding=1), nn.Conv1d(24, 32, 5, stride=2), nn.Conv1d(
            32, 16, 3, dilation=2, padding=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.head(h.mean(-1))


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.g = nn.Conv2d(32, 48, 3, padding=1, groups=2)  # 16 input channels per group
        self.g4 = nn.Conv2d(48, 48, 3, stride=2, groups=4, bias=False)  # 12 per group
        self.head = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.g4(F.relu(self.g(F.relu(self.stem(x))))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 40), nn.Linear(40, 40)
        self.out1, self.out2 = nn.Linear(40, 3), nn.Linear(40, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.out1(h), self.out2(h)


def _gcn_inputs(nodes: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    adj = (torch.rand(nodes, nodes) < 0.3).float() + torch.eye(nodes)
    return torch.randn(nodes, 8), adj / adj.sum(1, keepdim=True)


# name -> (model factory, inputs factory(batch), sites eligible at 8 samples)
MODELS = {
    "MLP": (MLP, lambda b=6: (torch.randn(b, 20),), 3),
    "FunctionalMLP": (FunctionalMLP, lambda b=6: (torch.randn(b, 16),), 1),
    "VGGish": (VGGish, lambda b=2: (torch.randn(b, 3, 16, 16),), 3),
    "ResNetish": (ResNetish, lambda b=2: (torch.randn(b, 3, 16, 16),), 6),
    "GCN": (GCN, lambda b=12: _gcn_inputs(b), 2),
    "OPTBlockLM": (OPTBlockLM, lambda b=2: (torch.randint(0, 50, (b, 7)),), 2),
    "Conv1dNet": (Conv1dNet, lambda b=3: (torch.randn(b, 4, 17),), 2),
    "GroupedNet": (GroupedNet, lambda b=2: (torch.randn(b, 3, 9, 9),), 2),
    "TwoOutputs": (TwoOutputs, lambda b=5: (torch.randn(b, 12),), 1),
}


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def assert_same_outputs(got, want, **tol) -> None:
    got, want = _outputs(got), _outputs(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **(tol or TOL))


# ---------------------------------------------------------------------------
# Never-prune equivalence
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", sorted(NEVER))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_never_prune_is_equivalent(name: str, rule: str) -> None:
    make, inputs, n_sites = MODELS[name]
    model = make().eval()
    x = inputs()
    gm = exfx.compile(model, x, NEVER[rule])
    report = gm.meta["exfx_report"]
    assert len(report.eligible) == n_sites
    assert len([n for n in enp_nodes(gm) if n.target is torch.ops.exfx.complete.default]) == n_sites
    with torch.no_grad():
        assert_same_outputs(gm(*x), model(*x))
    records = record_sites(gm, *x)
    assert set(records) == {s.name for s in report.eligible}
    assert all(bool(r.active.all()) for r in records.values())


@pytest.mark.parametrize("name", ["MLP", "VGGish", "GCN", "OPTBlockLM", "GroupedNet"])
def test_other_batch_sizes(name: str) -> None:
    make, inputs, _ = MODELS[name]
    model = make().eval()
    gm = exfx.compile(model, inputs(), NEVER["threshold"])
    pruning = exfx.compile(model, inputs(), exfx.Config(samples=8))
    for batch in (1, 3, 9):
        x = inputs(batch)
        with torch.no_grad():
            assert_same_outputs(gm(*x), model(*x))
        assert_enp_invariant(pruning, *x)


# ---------------------------------------------------------------------------
# The ENP invariant when pruning
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_invariant_threshold_zero(name: str) -> None:
    make, inputs, n_sites = MODELS[name]
    gm = exfx.compile(make().eval(), inputs(), exfx.Config(threshold=0.0, samples=8))
    records = assert_enp_invariant(gm, *inputs())
    assert len(records) == n_sites
    assert sum(r.pruned for r in records.values()) > 0, "threshold 0 should prune something"


@pytest.mark.parametrize("name", ["MLP", "VGGish", "ResNetish", "GCN", "OPTBlockLM", "Conv1dNet", "GroupedNet"])
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_invariant_ztest(name: str, alpha: float) -> None:
    make, inputs, _ = MODELS[name]
    gm = exfx.compile(make().eval(), inputs(), exfx.Config(rule="ztest", alpha=alpha, samples=8))
    records = assert_enp_invariant(gm, *inputs())
    if alpha == 0.5:
        assert sum(r.pruned for r in records.values()) > 0


@pytest.mark.parametrize("name", ["MLP", "ResNetish", "GCN", "OPTBlockLM"])
def test_invariant_random_per_site_thresholds(name: str) -> None:
    make, inputs, _ = MODELS[name]
    model = make().eval()
    config = exfx.Config(samples=8)
    plan = exfx.Plan.from_report(exfx.explain(model, inputs(), config), config)
    generator = torch.Generator().manual_seed(11)
    for site in sorted(plan.sites):
        plan = plan.with_site(site, threshold=float(torch.empty(1).uniform_(-1.0, 0.5, generator=generator)))
    gm = exfx.compile(model, inputs(), config, plan)
    assert {s.name: s.params.threshold for s in gm.meta["exfx_report"].eligible} == {
        k: v.threshold for k, v in plan.sites.items()}
    assert_enp_invariant(gm, *inputs())


@pytest.mark.parametrize("rule,param", [("threshold", 0.0), ("ztest", 0.3)])
def test_schedule_of_checkpoints(rule: str, param: float) -> None:
    model = MLP().eval()
    x = torch.randn(16, 20)
    kwargs = {"threshold": param} if rule == "threshold" else {"alpha": param}
    gm = exfx.compile(model, (x,), exfx.Config(rule=rule, samples=(8, 16, 32), **kwargs))
    report = gm.meta["exfx_report"]
    assert [s.samples for s in report.eligible] == [(8, 16, 32)] * 3
    for site in report.eligible:
        roles = [rewrite_role(n).role for n in enp_nodes(gm) if site_of(n) == site.name]
        assert roles == ["partial_sum_1", "early_exit_1", "partial_sum_2", "early_exit_2", "partial_sum_3",
                         "early_exit_3", "complete"]
    records = assert_enp_invariant(gm, x)
    assert sum(r.pruned for r in records.values()) > 0
    # More checkpoints can only prune more than the last one alone would (masks are sticky).
    single = exfx.compile(model, (x,), exfx.Config(rule=rule, samples=32, **kwargs))
    single_records = record_sites(single, x)
    scheduled, last_only = records["net.1"].active, single_records["net.1"].active  # same input in both
    assert bool((last_only | ~scheduled).all())  # kept by the schedule => kept by its last checkpoint
    assert int((~scheduled).sum()) > int((~last_only).sum())


def test_nan_input_propagates_like_the_original() -> None:
    model = MLP().eval()
    x = torch.randn(4, 20)
    x[2, 5] = math.nan
    gm = exfx.compile(model, (torch.randn(4, 20),), exfx.Config(samples=8))
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert bool(torch.isnan(got[2]).all())


def test_pruned_site_output_is_exactly_zero_after_relu() -> None:
    model = MLP().eval()
    x = torch.randn(8, 20)
    gm = exfx.compile(model, (x,), exfx.Config(threshold=0.5, samples=8))  # aggressive
    records = record_sites(gm, x)
    for record in records.values():
        assert record.pruned > 0
        assert bool((record.post[~record.active] == 0).all())
        assert not bool(torch.signbit(record.post[~record.active]).any())  # +0.0, not -0.0


# ---------------------------------------------------------------------------
# Graph shape of the rewrite
# ---------------------------------------------------------------------------


def test_rewrite_names_are_derived_from_the_site_and_stable() -> None:
    model = ResNetish().eval()
    x = torch.randn(2, 3, 16, 16)
    first = exfx.compile(model, (x,), exfx.Config(samples=(4, 8)))
    second = exfx.compile(model, (x,), exfx.Config(samples=(4, 8)))
    assert first.code == second.code
    names = [n.name for n in enp_nodes(first)]
    assert "layer1_0_conv2_partial_sum_1" in names and "layer2_0_conv2_complete" in names
    for node in enp_nodes(first):
        assert node.name.startswith(site_of(node).replace(".", "_"))
    relus = site_relus(first)
    for site in first.meta["exfx_report"].eligible:
        assert relus[site.name].args[0].target is torch.ops.exfx.complete.default
    first.graph.lint()


def test_original_chain_is_removed() -> None:
    model = ResNetish().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8))
    convs = [n for n in gm.graph.nodes if n.target is F.conv2d]
    # Only the stem and the 1x1 shortcut conv remain as dense convs.
    assert len(convs) == 2
    assert not any(n.op == "call_module" for n in gm.graph.nodes)


def test_no_site_leaves_graph_without_exfx_ops() -> None:
    model = MLP((20, 16, 10)).eval()  # the only ReLU reads the model input
    x = torch.randn(3, 20)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8))
    assert not enp_nodes(gm)
    torch.testing.assert_close(gm(x), model(x))


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------


class RandomMLP(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class RandomCNN(nn.Module):
    def __init__(self, dims: int, c_in: int, c1: int, c2: int, kernel: int, stride: int, groups: int,
                 bias: bool) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = conv(c_in, c1, 3, padding=1)
        self.conv = conv(c1, c2, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
        self.conv2 = conv(c2, c2, 1)
        self.head = nn.Linear(c2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv(F.relu(self.stem(x))))))
        return self.head(h.flatten(2).mean(-1))


schedules = st.sampled_from([(1,), (2,), (4,), (2, 4), (1, 3, 6), (8,), (4, 8)])
thresholds = st.one_of(st.just(0.0), st.floats(-2.0, 1.0), st.just(float("-inf")))
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _config(rule: str, threshold: float, alpha: float, samples: tuple[int, ...]) -> exfx.Config:
    if rule == "ztest" and samples[0] < 2:
        samples = tuple(s + 1 for s in samples)
    return exfx.Config(rule=rule, threshold=threshold, alpha=alpha, samples=samples)


def _check_property(model: nn.Module, x: torch.Tensor, config: exfx.Config) -> None:
    never = exfx.compile(model, (x,), exfx.Config(threshold=float("-inf"), samples=config.samples))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(never(x), want, **TOL)
    gm = exfx.compile(model, (x,), config)
    event(f"ENP sites: {'yes' if gm.meta['exfx_report'].eligible else 'none'}")
    if gm.meta["exfx_report"].eligible:
        records = assert_enp_invariant(gm, x)
        event(f"pruned: {'yes' if any(r.pruned for r in records.values()) else 'no'}")
    else:
        assert not enp_nodes(gm)
        torch.testing.assert_close(gm(x), want, **TOL)


@PROPERTY
@given(widths=st.lists(st.integers(2, 48), min_size=2, max_size=4), d_in=st.integers(1, 12),
       batch=st.integers(1, 5), samples=schedules, rule=st.sampled_from(["threshold", "ztest"]),
       threshold=thresholds, alpha=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_property_random_mlp(widths, d_in, batch, samples, rule, threshold, alpha, seed) -> None:
    torch.manual_seed(seed)
    model = RandomMLP([d_in, *widths, 3]).eval()
    _check_property(model, torch.randn(batch, d_in), _config(rule, threshold, alpha, samples))


@PROPERTY
@given(dims=st.sampled_from([1, 2]), c1=st.sampled_from([4, 6, 8, 12, 16]), c2=st.sampled_from([4, 8, 12]),
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), grouped=st.booleans(),
       bias=st.booleans(), size=st.integers(3, 8), batch=st.integers(1, 3), samples=schedules,
       rule=st.sampled_from(["threshold", "ztest"]), threshold=thresholds, alpha=st.floats(0.0, 0.5),
       seed=st.integers(0, 2**16))
def test_property_random_cnn(dims, c1, c2, kernel, stride, grouped, bias, size, batch, samples, rule, threshold,
                             alpha, seed) -> None:
    torch.manual_seed(seed)
    groups = 2 if grouped and c1 % 2 == 0 and c2 % 2 == 0 else 1
    model = RandomCNN(dims, 3, c1, c2, kernel, stride, groups, bias).eval()
    shape = (batch, 3, size) if dims == 1 else (batch, 3, size, size + 1)
    _check_property(model, torch.randn(*shape), _config(rule, threshold, alpha, samples))
