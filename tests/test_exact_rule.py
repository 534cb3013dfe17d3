"""The lossless ``exact`` rule: the sign analysis, the ``exfx::exact_exit`` op, the rewrite, plans, cost and lowering.

Oracles never use the op under test: dense pre-activations come from plain ``F.linear`` / ``F.conv*d``
(tests/helpers.py), and the model's own eager output is the reference for the compiled one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import exfx
from exfx.cost.model import EXACT_TEST_FLOPS, op_arguments
from exfx.errors import PlanError
from exfx.ops.exact import exact_blocks, positive_block_norms
from exfx.passes.annotate_pass import EXACT_LOWERING_REASON

from fuzz_models import architectures, build
from helpers import SiteRecorder, assert_enp_invariant, dense_preactivation
from models import GCN, MLP, OPTBlockLM, ResNetish, VGGish

OPS = torch.ops.exfx
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def late_checkpoints(fan_in: int) -> tuple[int, ...]:
    """Half-way and 7/8 of the fan-in: where the bound can prove something."""
    return tuple(sorted({max(1, fan_in // 2), max(1, fan_in - max(1, fan_in // 8))}))


def exact_plan(analysis: exfx.Analysis, combined: bool = False, threshold: float = 0.0) -> exfx.Plan:
    """``rule="exact"`` (or a threshold rule at a quarter of the fan-in plus exact late) at every site where the
    analysis offers it; the other sites disabled."""
    sites = {}
    for site in analysis.sites:
        if not site.eligible:
            continue
        late = late_checkpoints(site.fan_in or 1)
        if not site.exact_available:
            sites[site.name] = exfx.SiteParams(enabled=False)
        elif combined:
            early = max(1, (site.fan_in or 1) // 4)
            sites[site.name] = exfx.SiteParams(rule="threshold", threshold=threshold, samples=(early,), exact=True,
                                               exact_samples=tuple(k for k in late if k > early) or (early,))
        else:
            sites[site.name] = exfx.SiteParams(rule="exact", samples=late)
    return exfx.Plan(sites=sites, signatures=analysis.signatures)


class ExactRecorder(SiteRecorder):
    """Also records, per site, the neurons each ``exact_exit`` pruned (active before it, not after)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.proven: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> object:
        result = super().run_node(n)
        if n.op == "call_function" and n.target is OPS.exact_exit.default:
            a = op_arguments(n.target, *self.fetch_args_kwargs_from_env(n))
            before = a["active"] if a["active"] is not None else torch.ones_like(result)
            pruned = before & ~result
            self.proven[a["site"]] = self.proven.get(a["site"], torch.zeros_like(pruned)) | pruned
        return result


def check_lossless(gm: torch.fx.GraphModule, model: nn.Module, *inputs: torch.Tensor, statistical: bool) -> int:
    """Outputs equal the dense model's (exact alone), or the ENP invariant holds (combined); every neuron the
    proof pruned is truly negative. Returns how many neurons the proof pruned."""
    with torch.no_grad():
        recorder = ExactRecorder(gm)
        out = recorder.run(*inputs)
        if not statistical:
            torch.testing.assert_close(out, model(*inputs), rtol=RTOL, atol=ATOL)
    if statistical and recorder.records:
        assert_enp_invariant(gm, *inputs, rtol=RTOL, atol=ATOL)
    pruned = 0
    for site, proven in recorder.proven.items():
        dense = recorder.records[site].dense
        assert bool((dense[proven] < 0).all()), f"site {site}: the exact rule pruned a non-negative neuron"
        pruned += int(proven.sum())
    return pruned


def benchmark_models() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    from exfx.examples import GCN as BenchmarkGCN, ResNet18, VGG11

    torch.manual_seed(0)
    nodes = 12
    edges = torch.randint(0, nodes, (2, 40))
    graph = (torch.randn(nodes, 3), edges, torch.tensor([0] * 7 + [1] * 5))
    return [
        ("vgg11", VGG11(in_channels=1, width=4).eval(), (torch.randn(2, 1, 32, 32),)),
        ("resnet18", ResNet18(in_channels=1, width=4).eval(), (torch.randn(2, 1, 32, 32),)),
        ("gcn", BenchmarkGCN(hidden=16, layers=2, aggregation="gather").eval(), graph),
        ("opt-style", OPTBlockLM().eval(), (torch.randint(0, 50, (2, 8)),)),
        ("vggish", VGGish().eval(), (torch.randn(2, 3, 16, 16),)),
        ("resnetish", ResNetish().eval(), (torch.randn(2, 3, 16, 16),)),
        ("mlp", MLP().eval(), (torch.randn(4, 20),)),
        ("tests-gcn", GCN().eval(), (torch.randn(10, 8), torch.rand(10, 10))),
    ]


MODELS = benchmark_models()


# ---------------------------------------------------------------------------
# Lossless on every benchmark architecture
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("combined", [False, True], ids=["exact", "threshold+exact"])
@pytest.mark.parametrize("name, model, inputs", MODELS, ids=[m[0] for m in MODELS])
def test_lossless_on_benchmark_architectures(name, model, inputs, combined) -> None:
    analysis = exfx.analyse(model, inputs)
    gm = analysis.compile(exact_plan(analysis, combined))
    check_lossless(gm, model, *inputs, statistical=combined)
    for site in analysis.sites:
        assert site.exact_available or not site.eligible or site.exact_reason, site


def test_sites_after_relu_and_pools_are_proven() -> None:
    from exfx.examples import ResNet18, VGG11

    for name, model in (("vgg11", VGG11), ("resnet18", ResNet18)):
        analysis = exfx.analyse(model(in_channels=1, width=4).eval(), (torch.randn(2, 1, 32, 32),))
        eligible = [s for s in analysis.sites if s.eligible]
        assert eligible and all(s.exact_available and not s.exact_reason for s in eligible), name


def test_prunes_a_positive_share_with_strongly_negative_biases() -> None:
    model = MLP((20, 64, 64, 48, 10)).eval()
    with torch.no_grad():
        for layer in model.net:
            layer.bias.fill_(-3.0)
    x = torch.randn(16, 20)
    analysis = exfx.analyse(model, (x,))
    gm = analysis.compile(exact_plan(analysis))
    assert check_lossless(gm, model, x, statistical=False) > 0
    flops = exfx.count_flops(gm, x)
    assert sum(s.pruned for s in flops.sites.values()) > 0
    assert flops.executed < flops.dense


def test_config_exact_combines_with_threshold_and_prunes_more() -> None:
    model = MLP((20, 64, 64, 48, 10)).eval()
    with torch.no_grad():
        for layer in model.net:
            layer.bias.sub_(1.0)
    x = torch.randn(16, 20)
    analysis = exfx.analyse(model, (x,))
    alone = analysis.compile(exfx.Config(threshold=-math.inf, samples=8))
    both = analysis.compile(exfx.Config(threshold=-math.inf, samples=8, exact=True, exact_samples=(40,)))
    assert sum(s.pruned for s in exfx.count_flops(alone, x).sites.values()) == 0
    assert check_lossless(both, model, x, statistical=False) > 0
    assert sum(s.pruned for s in exfx.count_flops(both, x).sites.values()) > 0


# ---------------------------------------------------------------------------
# Hypothesis: random ops and random architectures, non-negative inputs
# ---------------------------------------------------------------------------


@st.composite
def exact_cases(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["linear", "flattened", "conv1d", "conv2d", "grouped"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    batch = draw(st.integers(1, 3))
    out = draw(st.integers(1, 9))
    geo: dict = dict(stride=[], padding=[], dilation=[], groups=1)
    if kind in ("linear", "flattened"):
        n = draw(st.integers(2, 40))
        unit = draw(st.integers(2, 5)) if kind == "flattened" else 1
        x = torch.randn(batch, n * unit, generator=g)
        w = torch.randn(out, n * unit, generator=g)
    else:
        groups = draw(st.integers(2, 3)) if kind == "grouped" else 1
        n = draw(st.integers(2, 12))
        dims = 1 if kind == "conv1d" else 2
        kernel = draw(st.sampled_from([1, 2, 3]))
        size = draw(st.integers(kernel, 7))
        geo = dict(stride=[draw(st.integers(1, 2))] * dims, padding=[draw(st.integers(0, 2))] * dims,
                   dilation=[draw(st.integers(1, 2))] * dims, groups=groups)
        if (size + 2 * geo["padding"][0] - geo["dilation"][0] * (kernel - 1) - 1) < 0:
            geo["dilation"] = [1] * dims
        x = torch.randn(batch, n * groups, *([size] * dims), generator=g)
        w = torch.randn(out * groups, n, *([kernel] * dims), generator=g)
    x = torch.relu(x) * draw(st.floats(0.1, 10.0))  # non-negative, with exact zeros
    scale = draw(st.floats(0.1, 3.0))
    bias = torch.randn(w.shape[0], generator=g) * scale - draw(st.floats(0.0, 6.0)) if draw(st.booleans()) else None
    checkpoints = sorted(draw(st.sets(st.integers(1, n), min_size=1, max_size=3)))
    return dict(kind=kind, x=x, w=w * scale, b=bias, n=n, geo=geo, checkpoints=tuple(checkpoints),
                residual=draw(st.booleans()), seed=seed)


def run_exact_chain(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rewrite's chain, called op by op: pre-activation, dense pre-activation, neurons the proof pruned."""
    x, w, b, n, geo = case["x"], case["w"], case["b"], case["n"], case["geo"]
    dense = dense_preactivation(x, w, b, None, **geo)
    residual = None
    if case["residual"]:
        residual = torch.randn(dense.shape, generator=torch.Generator().manual_seed(case["seed"] + 1))
        dense = dense + residual
    args = (n, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    starts = exact_blocks(n, case["checkpoints"])
    norms = positive_block_norms(w, n, starts)
    state, active, done = None, None, 0
    for k in case["checkpoints"]:
        state = OPS.partial_sum(x, w, state, active, done, k, *args, False, "s")
        active = OPS.exact_exit(state, x, w, norms, b, residual, active, k, n, list(starts), *args[1:], "s")
        done = k
    pre = OPS.complete(x, w, state, b, residual, active, done, *args, "s")
    return pre, dense, ~active


@settings(max_examples=150, deadline=None)
@given(case=exact_cases())
def test_fuzz_ops_equal_dense(case) -> None:
    pre, dense, pruned = run_exact_chain(case)
    assert bool((dense[pruned] < 0).all())
    # Reassociation error grows with the sum of the terms' magnitudes, not with the (cancelled) result.
    magnitude = dense_preactivation(case["x"].abs(), case["w"].abs(), None, None, **case["geo"]).abs().max()
    torch.testing.assert_close(torch.relu(pre), torch.relu(dense), rtol=RTOL, atol=max(ATOL, 1e-6 * float(magnitude)))


@settings(max_examples=40, deadline=None)
@given(spec=architectures(), shift=st.floats(0.0, 4.0), data=st.data())
def test_fuzz_models_equal_dense(spec, shift, data) -> None:
    model, x = build(spec)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.sub_(shift)
    analysis = exfx.analyse(model, (x,))
    sites = {}
    for site in analysis.sites:
        if site.eligible:
            ks = sorted(data.draw(st.sets(st.integers(1, site.fan_in or 1), min_size=1, max_size=3)))
            sites[site.name] = exfx.SiteParams(rule="exact", samples=tuple(ks)) if site.exact_available else (
                exfx.SiteParams(enabled=False))
    gm = analysis.compile(exfx.Plan(sites=sites, signatures=analysis.signatures))
    check_lossless(gm, model, x, statistical=False)


def test_nan_is_never_pruned() -> None:
    x = torch.relu(torch.randn(3, 16))
    x[0, 15] = math.nan
    w = torch.randn(4, 16)
    b = torch.full((4,), -100.0)
    starts = exact_blocks(16, (8,))
    state = OPS.partial_sum(x, w, None, None, 0, 8, 16, [], [], [], 1, False, "s")
    keep = OPS.exact_exit(state, x, w, positive_block_norms(w, 16, starts), b, None, None, 8, 16, list(starts), [], [],
                          [], 1, "s")
    assert bool(keep[0].all()) and not bool(keep[1:].any())


# ---------------------------------------------------------------------------
# The analysis: refusal reasons, plans and configs
# ---------------------------------------------------------------------------


class Shifted(nn.Module):
    """fc2 reads ``relu(fc1(x)) - 0.5``: its input can be negative. fc3 reads fc2's ReLU: fine."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)) - 0.5
        h = torch.relu(self.fc2(h))
        return self.out(torch.relu(self.fc3(h)))


def test_refusal_reason_names_the_op() -> None:
    analysis = exfx.analyse(Shifted().eval(), (torch.randn(4, 8),))
    fc2, fc3 = analysis.site("fc2"), analysis.site("fc3")
    assert fc2.eligible and not fc2.exact_available
    assert "not provably non-negative" in fc2.exact_reason and "`sub`" in fc2.exact_reason
    assert fc3.exact_available and fc3.exact_reason == ""
    text = str(analysis.explain())
    assert "exact unavailable: input" in text and "`sub`" in text
    assert analysis.explain().site("fc2").to_dict()["exact_available"] is False
    opt = exfx.analyse(OPTBlockLM().eval(), (torch.randint(0, 50, (2, 8)),)).site("blocks.0.fc1")
    assert not opt.exact_available and "LayerNorm" in opt.exact_reason
    gcn = exfx.analyse(GCN().eval(), (torch.randn(10, 8), torch.rand(10, 10))).site("weights.1")
    assert not gcn.exact_available and "`adj` (model input)" in gcn.exact_reason


def test_plan_asking_for_exact_where_refused_raises() -> None:
    analysis = exfx.analyse(Shifted().eval(), (torch.randn(4, 8),))
    plan = exfx.Plan(sites={"fc2": exfx.SiteParams(rule="exact", samples=16),
                            "fc3": exfx.SiteParams(rule="exact", samples=16)}, signatures=analysis.signatures)
    with pytest.raises(PlanError, match=r"fc2.*not provably non-negative"):
        analysis.compile(plan)
    with pytest.raises(PlanError, match="fc2"):
        analysis.compile(plan.with_site("fc2", rule="threshold", exact=True))
    analysis.compile(plan.with_site("fc2", enabled=False))  # fine once it is off


def test_config_applies_exact_only_where_available() -> None:
    model, x = Shifted().eval(), torch.randn(4, 8)
    analysis = exfx.analyse(model, (x,))
    gm = analysis.compile(exfx.Config(threshold=-math.inf, samples=8, exact=True))
    sites = {n.meta["exfx_role"].site for n in gm.graph.nodes if n.target is OPS.exact_exit.default}
    assert sites == {"fc3"}
    report = analysis.explain(exfx.Config(rule="exact", samples=16))
    assert not report.site("fc2").eligible and "rule 'exact' is unavailable here" in report.site("fc2").reason
    assert report.site("fc3").eligible and report.site("fc3").params.rule == "exact"
    plan = exfx.Plan.from_report(analysis.explain(), exfx.Config(threshold=0.0, samples=8, exact=True))
    assert not plan.sites["fc2"].exact and plan.sites["fc3"].exact
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(exfx.Config(rule="exact", samples=16))(x), model(x))


def test_config_fields_validate_and_round_trip(tmp_path) -> None:
    assert exfx.Config().exact is False and exfx.Config().exact_samples == ()
    assert exfx.SiteParams(rule="exact").exact is True and exfx.SiteParams(rule="exact").param == 0.0
    with pytest.raises(ValueError, match="exact must be a bool"):
        exfx.Config(exact="yes")
    with pytest.raises(ValueError, match="exact_samples"):
        exfx.SiteParams(exact_samples=(8,))
    with pytest.raises(ValueError, match="strictly increasing"):
        exfx.SiteParams(exact=True, exact_samples=(8, 4))
    with pytest.raises(ValueError, match="rule must be one of"):
        exfx.Config(rule="exactly")
    params = exfx.SiteParams(rule="ztest", alpha=0.1, samples=(8, 16), exact=True, exact_samples=(30,))
    assert params.checkpoints == (8, 16, 30) and params.exact_checkpoints == (30,)
    assert exfx.SiteParams(rule="exact", samples=(4,), exact_samples=(9,)).exact_checkpoints == (4, 9)
    assert exfx.SiteParams(samples=(8,)).to_dict().keys() == {"rule", "threshold", "alpha", "samples", "enabled"}
    plan = exfx.Plan(sites={"a": params, "b": exfx.SiteParams(rule="exact", samples=5)})
    plan.save(tmp_path / "plan.json")
    assert exfx.Plan.load(tmp_path / "plan.json") == plan
    config = exfx.Config(rule="exact", samples=(4, 8), exact_samples=12)
    assert exfx.Config.from_dict(config.to_dict()) == config
    with pytest.raises(PlanError, match="exact must be a bool"):
        exfx.Plan.from_dict({**plan.to_dict(), "sites": {"a": {"exact": 1}}})


def test_checkpoints_beyond_the_fan_in_are_refused() -> None:
    analysis = exfx.analyse(Shifted().eval(), (torch.randn(4, 8),))
    plan = exfx.Plan(sites={"fc2": exfx.SiteParams(enabled=False),
                            "fc3": exfx.SiteParams(samples=8, exact=True, exact_samples=40)},
                     signatures=analysis.signatures)
    with pytest.raises(PlanError, match="exceed its fan-in 32"):
        analysis.compile(plan)


# ---------------------------------------------------------------------------
# The op: opcheck, blocks, cost, lowering
# ---------------------------------------------------------------------------


def _op_samples() -> list[tuple]:
    g = torch.Generator().manual_seed(3)
    samples = []
    x, w = torch.relu(torch.randn(3, 24, generator=g)), torch.randn(5, 24, generator=g)
    starts = exact_blocks(24, (8, 16))
    state = OPS.partial_sum(x, w, None, None, 0, 8, 24, [], [], [], 1, False, "s")
    norms = positive_block_norms(w, 24, starts)
    samples.append((state, x, w, norms, torch.randn(5, generator=g), None, None, 8, 24, list(starts), [], [], [], 1,
                    "s"))
    samples.append((state, x, w, norms, None, torch.randn(3, 5, generator=g), state[0] > 0, 16, 24, list(starts),
                    [], [], [], 1, "s"))
    xc, wc = torch.relu(torch.randn(2, 12, 6, 5, generator=g)), torch.randn(6, 4, 3, 3, generator=g)
    starts = exact_blocks(4, (2,))
    state = OPS.partial_sum(xc, wc, None, None, 0, 2, 4, [1, 2], [1, 0], [2, 1], 3, False, "c")
    samples.append((state, xc, wc, positive_block_norms(wc, 4, starts), torch.randn(6, generator=g), None, None, 2,
                    4, list(starts), [1, 2], [1, 0], [2, 1], 3, "c"))
    x1, w1 = torch.relu(torch.randn(2, 10, 9, generator=g)), torch.randn(4, 10, 3, generator=g)
    starts = exact_blocks(10, (5,))
    state = OPS.partial_sum(x1, w1, None, None, 0, 5, 10, [2], [1], [1], 1, False, "d")
    samples.append((state, x1, w1, positive_block_norms(w1, 10, starts), None, None, None, 5, 10, list(starts), [2],
                    [1], [1], 1, "d"))
    return samples


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index) -> None:
    torch.library.opcheck(OPS.exact_exit.default, _op_samples()[index])


def test_blocks_start_at_every_checkpoint() -> None:
    assert exact_blocks(64, (16, 32), blocks=4) == (16, 32, 42, 53)
    assert exact_blocks(16, (16,)) == ()
    for n, checkpoints in ((256, (8, 240)), (9, (1, 2, 3)), (100, (99,))):
        starts = exact_blocks(n, checkpoints)
        assert set(k for k in checkpoints if k < n) <= set(starts)
        assert list(starts) == sorted(set(starts)) and starts[-1] < n


def test_flops_price_the_bound_as_overhead() -> None:
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[2].bias.fill_(100.0)  # nothing is pruned: the figures are the bound's overhead alone
    x = torch.randn(4, 10)
    gm = exfx.compile(model, (x,), exfx.Config(rule="exact", samples=8))
    site = exfx.count_flops(gm, x).sites["2"]
    blocks = len(exact_blocks(16, (8,)))
    norms = 4 * (2 * (16 - 8) + blocks)  # a square and an add per input of the unsampled units, a root per block
    tested = 4 * 8
    assert site.pruned == 0 and site.dense == 2 * 16 * tested
    assert site.executed == site.dense + norms + tested * (2 * blocks + EXACT_TEST_FLOPS)


def test_native_lowering_keeps_exact_sites_on_the_reference_ops(monkeypatch) -> None:
    monkeypatch.setenv("EXFX_FORCE_LOWERING", "native")
    model, x = MLP().eval(), torch.randn(4, 20)
    gm = exfx.compile(model, (x,), exfx.Config(rule="exact", samples=(8, 16)), lowering="native")
    report = gm.meta["exfx_report"]
    assert all(s.lowering == "reference" and s.lowering_reason.startswith(EXACT_LOWERING_REASON)
               for s in report.eligible)
    assert any(n.target is OPS.exact_exit.default for n in gm.graph.nodes)
    explained = exfx.explain(model, (x,), exfx.Config(rule="exact", samples=(8, 16)), lowering="native")
    assert all(s.lowering == "reference" for s in explained.eligible)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=RTOL, atol=ATOL)


def test_norm_buffer_is_registered_once_per_site_with_a_deterministic_name() -> None:
    model, x = VGGish().eval(), torch.randn(2, 3, 16, 16)
    gm = exfx.compile(model, (x,), exfx.Config(rule="exact", samples=(8, 12)))
    names = sorted(name for name, _ in gm.named_buffers() if name.endswith("_positive_norms"))
    assert names == ["exfx_classifier_1_positive_norms", "exfx_features_3_positive_norms",
                     "exfx_features_7_positive_norms"]
    w = dict(model.named_parameters())["classifier.1.weight"]
    expected = positive_block_norms(w, 64, exact_blocks(64, (8, 12)))
    torch.testing.assert_close(gm.get_buffer("exfx_classifier_1_positive_norms"), expected)
