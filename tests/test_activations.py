"""The ReLU family beyond ReLU (ReLU6, hardtanh(0, t), clamp at 0), other activations, stored constants.

- Every ReLU6 / hardtanh / clamp spelling canonicalizes to ``torch.clamp(x, 0.0, t)`` (or ``torch.relu`` without
  an upper bound), is a site like ReLU, and keeps its upper clamp through the rewrite and the native lowering.
- GELU, SiLU, Hardswish, ... are reported, never eligible, with the reason.
- A buffer read as data (Swin-V2's ``relative_coords_table``) pins its axes; BatchNorm statistics do not.
- A non-site reason names the producer's op kind (```conv` (conv2d)``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import exfx
from exfx.analysis.opsets import activation_ceiling, is_capped_relu, is_relu
from exfx.ci.graphdiff import graph_text
from exfx.passes import CanonicalizePass
from exfx.pruning import prune

from helpers import assert_enp_invariant
from models import DenseNetish, MobileNetV2ish, randomise_bn

NEVER = exfx.Config(threshold=-math.inf, samples=4)
PRUNING = exfx.Config(threshold=0.0, samples=4)

#: spelling -> the activation, applied to ``x`` (``module`` is the spelling's own module, when it has one)
CAPPED = {
    "nn.ReLU6": lambda x, m: m(x),
    "nn.ReLU6(inplace)": lambda x, m: m(x),
    "nn.Hardtanh(0, 6)": lambda x, m: m(x),
    "F.relu6": lambda x, m: F.relu6(x),
    "F.relu6(inplace)": lambda x, m: F.relu6(x, inplace=True),
    "F.hardtanh(x, 0, 6)": lambda x, m: F.hardtanh(x, 0.0, 6.0),
    "F.hardtanh_": lambda x, m: F.hardtanh_(x, min_val=0.0, max_val=6.0),
    "torch.clamp(x, 0, 6)": lambda x, m: torch.clamp(x, 0, 6),
    "torch.clamp(min=0, max=6)": lambda x, m: torch.clamp(x, min=0, max=6),
    "torch.clip": lambda x, m: torch.clip(x, 0.0, 6.0),
    "torch.clamp_": lambda x, m: torch.clamp_(x, 0, 6),
    "x.clamp(0, 6)": lambda x, m: x.clamp(0, 6),
    "x.clamp_(max=6, min=0)": lambda x, m: x.clamp_(max=6, min=0),
}
PLAIN = {
    "torch.clamp(min=0)": lambda x, m: torch.clamp(x, min=0),
    "x.clamp(0)": lambda x, m: x.clamp(0),
    "x.clamp_min(0)": lambda x, m: x.clamp_min(0),
    "x.clamp_min_(0.0)": lambda x, m: x.clamp_min_(0.0),
    "torch.clamp_min(x, 0)": lambda x, m: torch.clamp_min(x, 0),
    "torch.clamp(x, 0, inf)": lambda x, m: torch.clamp(x, 0.0, math.inf),
    "nn.ReLU": lambda x, m: m(x),
}
MODULES = {"nn.ReLU6": lambda: nn.ReLU6(), "nn.ReLU6(inplace)": lambda: nn.ReLU6(inplace=True),
           "nn.Hardtanh(0, 6)": lambda: nn.Hardtanh(0.0, 6.0), "nn.ReLU": lambda: nn.ReLU()}


class ActMLP(nn.Module):
    """8 -> 32 -> act -> 32 -> act -> 3; large weights so that pre-activations pass 6 (the upper clamp acts)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.act1 = MODULES.get(spelling, nn.Identity)()
        self.act2 = MODULES.get(spelling, nn.Identity)()
        with torch.no_grad():
            self.fc2.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = {**CAPPED, **PLAIN}[self.spelling]
        h = act(self.fc1(x) * 1.0, self.act1)  # `* 1.0`: in-place spellings must not write into a graph input
        return self.fc3(act(self.fc2(h), self.act2))


def _inputs(seed: int = 0, rows: int = 16) -> torch.Tensor:
    return 3.0 * torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed))


def _canonical(model: nn.Module, x: torch.Tensor, capture: str = "fx") -> torch.fx.GraphModule:
    return exfx.analyse(model, (x,), capture=capture).graph_module


# ---------------------------------------------------------------------------
# Canonicalize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", list(CAPPED))
def test_every_capped_spelling_becomes_one_clamp(spelling: str) -> None:
    model, x = ActMLP(spelling).eval(), _inputs()
    gm = _canonical(model, x)
    acts = [n for n in gm.graph.nodes if is_capped_relu(n)]
    assert [(n.target, n.args[1:], n.kwargs) for n in acts] == [(torch.clamp, (0.0, 6.0), {})] * 2
    assert not [n for n in gm.graph.nodes if is_relu(n)]
    assert [activation_ceiling(n) for n in acts] == [6.0, 6.0]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("spelling", list(PLAIN))
def test_clamp_at_zero_without_upper_bound_becomes_relu(spelling: str) -> None:
    model, x = ActMLP(spelling).eval(), _inputs()
    gm = _canonical(model, x)
    assert len([n for n in gm.graph.nodes if is_relu(n) and len(n.args) == 1 and not n.kwargs]) == 2
    assert not [n for n in gm.graph.nodes if n.target in (torch.clamp, "clamp", "clamp_min", torch.clamp_min)]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("spelling", ["nn.ReLU6", "F.relu6", "F.hardtanh(x, 0, 6)", "x.clamp_(max=6, min=0)"])
def test_dynamo_capture_canonicalizes_the_same(spelling: str) -> None:
    model, x = ActMLP(spelling).eval(), _inputs()
    gm = _canonical(model, x, capture="dynamo")
    assert [n.args[1:] for n in gm.graph.nodes if is_capped_relu(n)] == [(0.0, 6.0)] * 2
    fx_sites = [(s.name, s.eligible) for s in exfx.explain(model, (x,), NEVER).sites]
    assert [(s.name, s.eligible) for s in exfx.explain(model, (x,), NEVER, capture="dynamo").sites] == fx_sites


def test_canonicalize_is_idempotent_on_the_clamp_form() -> None:
    gm = _canonical(ActMLP("nn.ReLU6").eval(), _inputs())
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    assert not CanonicalizePass()(gm).modified
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before


class NotFamily(nn.Module):
    """Clamps that are not the ReLU family: another lower bound, a tensor bound, a hardtanh(-1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 3), nn.Hardtanh(-1.0, 1.0)
        self.register_buffer("lower", torch.zeros(16))
        self.register_buffer("upper", torch.full((16,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x)).clamp(-0.5, 0.5) + torch.clamp(self.fc1(x), self.lower, self.upper)
        return self.fc2(h)


def test_other_clamps_stay_element_wise_and_a_hardtanh_is_reported() -> None:
    model, x = NotFamily().eval(), _inputs()
    analysis = exfx.analyse(model, (x,))
    assert not [n for n in analysis.graph_module.graph.nodes if is_capped_relu(n) or is_relu(n)]
    assert [(s.name, s.eligible, s.reason) for s in analysis.sites] == [
        ("act", False, "not a site: activation `hardtanh` is not zero on a half-line")]
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(NEVER)(x), model(x))


# ---------------------------------------------------------------------------
# Sites: the same names as ReLU, exact under never-prune, the ENP invariant with the upper clamp
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["nn.ReLU6", "F.hardtanh_", "torch.clamp(x, 0, 6)", "x.clamp_min(0)"])
def test_family_sites_are_named_and_judged_like_relu(spelling: str) -> None:
    x = _inputs()
    relu_report = exfx.explain(ActMLP("nn.ReLU").eval(), (x,), NEVER)
    report = exfx.explain(ActMLP(spelling).eval(), (x,), NEVER)
    assert [(s.name, s.eligible, s.reason, s.signature) for s in report.sites] == [
        (s.name, s.eligible, s.reason, s.signature) for s in relu_report.sites]
    assert [s.name for s in report.eligible] == ["fc2"]
    assert str(report).splitlines()[0] == "ActMLP: 1 of 2 ReLUs are ENP sites"


@pytest.mark.parametrize("spelling", ["nn.ReLU6(inplace)", "F.relu6", "x.clamp(0, 6)", "torch.clamp(min=0)"])
def test_never_prune_is_exact_and_pruning_keeps_the_invariant(spelling: str) -> None:
    model, x = ActMLP(spelling).eval(), _inputs()
    analysis = exfx.analyse(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(NEVER)(x), model(x))
    records = assert_enp_invariant(analysis.compile(PRUNING), x)
    record = records["fc2"]
    assert record.pruned > 0 and record.active.any()
    if spelling != "torch.clamp(min=0)":
        assert record.ceiling == 6.0
        assert bool((record.pre[record.active] > 6.0).any())  # the upper clamp acts on kept neurons...
        assert float(record.post.max()) <= 6.0  # ...and is kept by the rewrite


@pytest.mark.parametrize("form", ["native", "dense"])
def test_native_lowering_keeps_the_upper_clamp(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXFX_FORCE_LOWERING", form)
    model, x = ActMLP("nn.ReLU6").eval(), _inputs()
    analysis = exfx.analyse(model, (x,))
    reference = analysis.compile(exfx.Config(threshold=0.0, samples=8))
    lowered = analysis.compile(exfx.Config(threshold=0.0, samples=8), lowering="native")
    assert lowered.meta["exfx_report"].site("fc2").lowering == form
    assert [n.args[1:] for n in lowered.graph.nodes if is_capped_relu(n)] == [(0.0, 6.0)] * 2
    with torch.no_grad():
        want = reference(x) if form == "native" else model(x)
        torch.testing.assert_close(lowered(x), want, rtol=1e-4, atol=1e-4)


def test_snp_folds_exact_duplicates_of_a_relu6_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU6(), nn.Linear(10, 4)).eval()
    with torch.no_grad():  # units 6..9 copy units 0..3: after ReLU6 they are exact duplicates
        model[0].weight[6:] = model[0].weight[:4]
        model[0].bias[6:] = model[0].bias[:4]
    data = [(3.0 * torch.randn(32, 6, generator=torch.Generator().manual_seed(i)), None) for i in range(3)]
    pruned, report = prune(model, (data[0][0][:2],), data, ratio=0.4)
    assert report.layer("0").units_after == 6
    with torch.no_grad():
        torch.testing.assert_close(pruned(data[0][0]), model(data[0][0]), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# MobileNet-V2-style: ReLU6 everywhere, a Hardsigmoid squeeze-excitation gate
# ---------------------------------------------------------------------------


def _mobilenet() -> tuple[nn.Module, torch.Tensor]:
    return MobileNetV2ish().eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_mobilenet_sites() -> None:
    model, x = _mobilenet()
    report = exfx.explain(model, (x,), NEVER)
    rows = {s.name: s for s in report.sites}
    expand = [f"blocks.{i}.expand.0" for i in range(3)]
    assert all(rows[name].eligible for name in [*expand, "head.0"]), str(report)
    assert all(rows[f"blocks.{i}.depthwise.0"].reason == "depthwise: fan-in 1" for i in range(3))
    # The squeeze-excitation gate no longer pins the channels around it: the SE's own ReLU is a site.
    assert rows["blocks.2.se.1"].eligible, rows["blocks.2.se.1"].reason
    gate = rows["blocks.2.se.4"]
    assert (gate.eligible, gate.activation, gate.reason) == (
        False, "hardsigmoid", "not a site: activation `hardsigmoid` is not zero on a half-line")
    assert str(report).splitlines()[0] == (
        "MobileNetV2ish: 5 of 9 ReLUs are ENP sites; 1 other activation is not a site (hardsigmoid)")
    # The graph-diff text lists the ReLU family only.
    assert "hardsigmoid" not in "".join(line for line in graph_text(exfx.compile(model, (x,), NEVER)).splitlines()
                                        if line.startswith("# site"))


def test_mobilenet_never_prune_invariant_and_flops() -> None:
    model, x = _mobilenet()
    analysis = exfx.analyse(model, (x,))
    never = analysis.compile(NEVER)
    with torch.no_grad():
        torch.testing.assert_close(never(x), model(x), rtol=1e-4, atol=1e-5)
    records = assert_enp_invariant(analysis.compile(PRUNING), x, rtol=1e-4, atol=1e-5)
    assert set(records) == {"blocks.0.expand.0", "blocks.1.expand.0", "blocks.2.expand.0", "blocks.2.se.1",
                            "head.0"}
    assert sum(r.pruned for r in records.values()) > 0
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = exfx.count_flops(never, x)
    assert flops.dense == counter.get_total_flops()
    assert flops.dense <= flops.executed  # never pruning: only the tests' overhead on top


# ---------------------------------------------------------------------------
# Other activations are reported, not sites
# ---------------------------------------------------------------------------


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32),
                                                  nn.Linear(32, 3))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(F.hardswish(F.silu(self.fc3(self.act(self.fc2(torch.relu(self.fc1(x))))))))


def test_gelu_silu_hardswish_are_reported_with_the_reason() -> None:
    report = exfx.explain(Smooth().eval(), (_inputs(),), NEVER)
    assert [(s.name, s.eligible, s.activation, s.reason) for s in report.sites] == [
        ("fc1", False, "relu", "contraction axis is a model input (`x`)"),
        ("act", False, "gelu", "not a site: activation `gelu` is not zero on a half-line"),
        ("silu", False, "silu", "not a site: activation `silu` is not zero on a half-line"),
        ("hardswish", False, "hardswish", "not a site: activation `hardswish` is not zero on a half-line"),
    ]
    assert str(report).splitlines()[0] == (
        "Smooth: 0 of 1 ReLUs are ENP sites; 3 other activations are not a site (gelu, silu, hardswish)")
    assert report.to_dict()["sites"][1]["activation"] == "gelu"


def test_a_model_with_no_activation_says_so() -> None:
    report = exfx.explain(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).eval(), (_inputs(),))
    assert report.sites == []
    assert "no ReLU-family activation found" in str(report).splitlines()[0]


# ---------------------------------------------------------------------------
# Stored constants
# ---------------------------------------------------------------------------


class CoordinateBias(nn.Module):
    """Swin-V2's continuous position bias: an MLP applied to a stored table of relative coordinates."""

    def __init__(self, size: int = 5, heads: int = 4) -> None:
        super().__init__()
        grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij"))
        self.register_buffer("relative_coords_table", grid.permute(1, 2, 0).reshape(size * size, 2))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, heads))
        self.fc1, self.fc2, self.out = nn.Linear(size * size, 32), nn.Linear(32, 32), nn.Linear(32, size * size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.cpb_mlp(self.relative_coords_table)  # [25, heads]
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x))))) @ bias


@pytest.mark.parametrize("capture", ["fx", "dynamo"])
def test_a_buffer_read_as_data_is_pinned_like_an_input(capture: str) -> None:
    model, x = CoordinateBias().eval(), torch.randn(3, 25)
    report = exfx.explain(model, (x,), exfx.Config(samples=2), capture=capture)
    site = report.site("cpb_mlp.0")
    assert not site.eligible
    assert site.reason == ("contraction axis is pinned: stored constant `relative_coords_table` (a buffer: fixed "
                           "data, like a model input)")
    assert report.site("fc2").structurally_eligible  # parameters are not pinned, whatever the capture


class PreActivationBlock(nn.Module):
    """A residual block whose BatchNorm follows a ReLU, so it cannot be folded: it stays, reading its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.norm, self.fc = nn.BatchNorm2d(16), nn.Linear(16, 4)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        return self.fc(torch.relu(self.conv2(self.norm(h)) + h).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "dynamo"])
@pytest.mark.parametrize("model_fn", [PreActivationBlock, DenseNetish])
def test_unfolded_batchnorm_statistics_do_not_pin_the_channels(capture: str, model_fn) -> None:
    model, x = model_fn().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    report = exfx.explain(model, (x,), NEVER, capture=capture)
    assert not any("stored constant" in s.reason for s in report.sites), str(report)
    reference = exfx.explain(model, (x,), NEVER, capture="fx")
    # ReLUs with a producer have its name whatever the capture (the others are named after their nodes).
    assert [(s.name, s.eligible) for s in report.sites if s.kind != "-"] == [
        (s.name, s.eligible) for s in reference.sites if s.kind != "-"]
    if model_fn is PreActivationBlock:
        assert [s.name for s in report.eligible] == ["conv2"]


# ---------------------------------------------------------------------------
# The reason names the producer's op kind
# ---------------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x).flip(1)).mean((2, 3))
        return torch.relu(self.fc(h).flip(1))


def test_the_reason_names_the_op_kind() -> None:
    report = exfx.explain(Scaled().eval(), (torch.randn(2, 3, 6, 6),))
    assert [s.reason for s in report.sites] == [
        "no linear/conv producer (`conv` (conv2d) is followed by `flip` (.flip()), which exfx does not carry "
        "partial sums through)",
        "no linear/conv producer (`fc` (linear) is followed by `flip_1` (.flip()), which exfx does not carry "
        "partial sums through)",
    ]
