"""ExchangeabilityPass: which ReLUs are ENP sites, and why not when they are not."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import exfx
from exfx.capture import capture
from exfx.meta import axis_groups, site_match
from exfx.passes import CanonicalizePass, ExchangeabilityPass, FoldBatchNormPass
from exfx.passes.canonicalize_pass import is_relu
from models import GCN, MLP, BasicBlock, FunctionalMLP, OPTBlockLM, ResNetish, VGGish, randomise_bn

CFG8 = exfx.Config(samples=8)


def analyse(model: nn.Module, *inputs: torch.Tensor, samples: int = 8) -> tuple[fx.GraphModule, ExchangeabilityPass]:
    gm = capture(model)
    for step in (CanonicalizePass(), FoldBatchNormPass()):
        ShapeProp(gm).propagate(*inputs)
        step(gm)
    ShapeProp(gm).propagate(*inputs)
    analysis = ExchangeabilityPass()
    result = analysis(gm)
    assert result.modified is False
    return gm, analysis


def verdicts(report: exfx.Report) -> dict[str, tuple[bool, str]]:
    return {s.name: (s.eligible, s.reason) for s in report.sites}


def gcn_inputs(nodes: int = 10, d_in: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    adj = (torch.rand(nodes, nodes) < 0.4).float() + torch.eye(nodes)
    return torch.randn(nodes, d_in), adj / adj.sum(1, keepdim=True)


# ---------------------------------------------------------------------------
# Reasons for not being a site
# ---------------------------------------------------------------------------


def test_first_layer_is_excluded_because_its_axis_is_a_model_input() -> None:
    report = exfx.explain(MLP().eval(), (torch.randn(4, 20),), CFG8)
    first = report.sites[0]
    assert first.name == "net.0" and not first.eligible
    assert first.reason.startswith("contraction axis is a model input")
    assert first.group is None
    assert [s.eligible for s in report.sites[1:]] == [True, True, True]


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw(F.relu(self.dw(F.relu(self.stem(x))))))


def test_depthwise_conv_has_fan_in_one() -> None:
    report = exfx.explain(Depthwise().eval(), (torch.randn(2, 3, 8, 8),), CFG8)
    assert verdicts(report)["dw"] == (False, "depthwise: fan-in 1")
    assert report.site("dw").fan_in == 1
    assert report.site("pw").eligible  # the pointwise conv after it is a normal site


class PoolThenRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)  # ReLU on the model input
        return F.relu(F.max_pool2d(self.conv(x), 2))  # ReLU right after a pool


def test_relu_without_linear_or_conv_producer() -> None:
    report = exfx.explain(PoolThenRelu().eval(), (torch.randn(2, 3, 8, 8),), CFG8)
    assert len(report.sites) == 2
    for site in report.sites:
        assert site.eligible is False
        assert site.reason.startswith("no linear/conv producer")
        assert site.kind == "-"


def test_fan_in_below_samples() -> None:
    model = MLP((20, 64, 24, 64, 10)).eval()
    report = exfx.explain(model, (torch.randn(4, 20),))  # default: 32 samples
    assert verdicts(report)["net.2"] == (False, "fan-in 24 < samples 32")
    assert report.site("net.2").structurally_eligible
    assert report.site("net.1").eligible


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(10, 40)
        self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 40)
        self.fc = nn.Linear(80, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        both = torch.cat([F.relu(self.a(h)), F.relu(self.b(h))], dim=1)
        return F.relu(self.fc(both))


def test_concat_contraction_samples_every_block() -> None:
    """A contraction over a concat is a site: its record carries the blocks (see tests/test_concat.py)."""
    analysis = exfx.analyse(Concat().eval(), (torch.randn(3, 10),))
    report = analysis.explain(CFG8)
    eligible, reason = verdicts(report)["fc"]
    assert eligible and not reason and analysis.site("fc").concat_blocks == (40, 40)
    assert report.site("a").eligible and report.site("b").eligible


class ReturnsHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 40), nn.Linear(40, 40), nn.Linear(40, 40)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x))
        g = F.relu(self.fc2(h))  # g's features are returned: pinned
        return F.relu(self.fc3(g)), g


def test_hidden_axis_returned_as_output_is_pinned() -> None:
    model = ReturnsHidden().eval()
    x = torch.randn(3, 10)
    report = exfx.explain(model, (x,), CFG8)
    eligible, reason = verdicts(report)["fc3"]
    assert not eligible and "model output" in reason
    assert report.site("fc2").eligible  # fc2 contracts h, which is not returned
    gm = exfx.compile(model, (x,), CFG8)
    for got, want in zip(gm(x), model(x)):
        assert got.shape == want.shape


# ---------------------------------------------------------------------------
# Sites in the paper's models
# ---------------------------------------------------------------------------


def test_resnet_sites_include_residual_relu_and_exclude_shortcuts() -> None:
    model = ResNetish().eval()
    report = exfx.explain(model, (torch.randn(2, 3, 16, 16),), CFG8)
    names = [s.name for s in report.sites]
    assert names == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                     "layer2.0.conv1", "layer2.0.conv2"]
    assert not any("shortcut" in s.name for s in report.sites)
    assert [s.eligible for s in report.sites] == [False] + [True] * 6
    # The second conv of each block feeds a ReLU after the residual add: the shortcut becomes a shift.
    analysis = exfx.analyse(model, (torch.randn(2, 3, 16, 16),))
    for name in ("layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"):
        assert len(analysis.site(name).shifts) == 1
    assert analysis.site("layer1.0.conv1").shifts == ()


class FlippedBlock(BasicBlock):
    """``shortcut(x) + out``: the operand order of the residual add must not change the site."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.shortcut(x) + out)


class FlippedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = FlippedBlock(16, 32, 2)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.relu(self.stem(x)))


def test_shortcut_conv_is_never_the_site_whatever_the_add_order() -> None:
    model = FlippedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    report = exfx.explain(model, (x,), CFG8)
    assert [s.name for s in report.sites] == ["stem", "block.conv1", "block.conv2"]
    assert report.site("block.conv2").eligible
    gm = exfx.compile(model, (x,), exfx.Config(samples=8, threshold=float("-inf")))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_vgg_sites_and_flattened_classifier() -> None:
    report = exfx.explain(VGGish().eval(), (torch.randn(2, 3, 16, 16),), CFG8)
    assert [(s.name, s.eligible) for s in report.sites] == [
        ("features.0", False), ("features.3", True), ("features.7", True), ("classifier.1", True)]
    classifier = exfx.analyse(VGGish().eval(), (torch.randn(2, 3, 16, 16),)).site("classifier.1")
    assert classifier.fan_in == 64 and classifier.n_units == 64  # 64 channels of 4x4 flattened
    assert "blocks of 16" in classifier.signature


def test_gcn_left_matmul_sites() -> None:
    analysis = exfx.analyse(GCN().eval(), gcn_inputs())
    assert [(s.name, s.eligible) for s in analysis.report.sites] == [
        ("weights.0", False), ("weights.1", True), ("weights.2", True)]
    for name in ("weights.1", "weights.2"):
        site = analysis.site(name)
        assert site.left and site.kind == "linear" and site.fan_in == 64
        assert "left-matmul" in site.signature
        assert len(site.shifts) == 1  # the bias added after adj @ (h W)


def test_opt_fc1_sites() -> None:
    report = exfx.explain(OPTBlockLM().eval(), (torch.randint(0, 50, (2, 7)),), CFG8)
    assert [(s.name, s.eligible) for s in report.sites] == [("blocks.0.fc1", True), ("blocks.1.fc1", True)]
    assert all(s.fan_in == 48 for s in report.sites)


def test_functional_mlp_sites_named_by_parameter() -> None:
    report = exfx.explain(FunctionalMLP().eval(), (torch.randn(4, 16),), CFG8)
    assert [(s.name, s.eligible) for s in report.sites] == [("w1", False), ("w2", True)]


def test_pre_activation_used_elsewhere_is_not_a_site() -> None:
    class Leak(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(10, 40), nn.Linear(40, 40)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pre = self.fc2(F.relu(self.fc1(x)))
            return F.relu(pre) + pre.sum()

    report = exfx.explain(Leak().eval(), (torch.randn(3, 10),), CFG8)
    eligible, reason = verdicts(report)["fc2"]
    assert not eligible and "also used" in reason


def test_unknown_op_pins_its_axes() -> None:
    class Sorts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(10, 40), nn.Linear(40, 40)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cumsum(F.relu(self.fc1(x)), dim=-1)  # not permutation-equivariant along features
            return F.relu(self.fc2(h))

    report = exfx.explain(Sorts().eval(), (torch.randn(3, 10),), CFG8)
    eligible, reason = verdicts(report)["fc2"]
    assert not eligible and "not known to be permutation-equivariant" in reason and "cumsum" in reason


# ---------------------------------------------------------------------------
# Labels and determinism
# ---------------------------------------------------------------------------


def test_groups_are_labelled_in_node_meta() -> None:
    gm, analysis = analyse(ResNetish().eval(), torch.randn(2, 3, 16, 16))
    for node in gm.graph.nodes:
        if "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape"):
            groups = axis_groups(node)
            assert len(groups) == len(node.meta["tensor_meta"].shape)
            assert all(g is None or g in analysis.groups.groups for g in groups)
    nodes = {n.name: n for n in gm.graph.nodes}
    relus = [n for n in gm.graph.nodes if is_relu(n)]
    assert [site_match(n) for n in relus] == analysis.sites
    for site in analysis.sites:
        if not site.eligible:
            continue
        x = nodes[site.input]
        assert axis_groups(x)[1] == site.group  # channel axis of the conv input
        assert f"{x.name}[1]" in analysis.groups.groups[site.group]
        # Batch and spatial axes are never exchangeable.
        assert axis_groups(x)[0] is None and axis_groups(x)[2:] == (None, None)
    # Every axis listed in a group carries that group's label.
    for group, axes in analysis.groups.groups.items():
        for axis in axes:
            name, index = axis[:-1].split("[")
            assert axis_groups(nodes[name])[int(index)] == group


def test_residual_stream_is_one_group() -> None:
    report = exfx.explain(ResNetish().eval(), (torch.randn(2, 3, 16, 16),), CFG8)
    # Both blocks of layer1 and the first conv of layer2 read the same residual stream.
    assert report.site("layer1.0.conv1").group == report.site("layer1.1.conv1").group == report.site(
        "layer2.0.conv1").group
    assert report.site("layer1.0.conv2").group != report.site("layer1.0.conv1").group


def test_pass_changes_no_node() -> None:
    model = VGGish().eval()
    x = torch.randn(2, 3, 16, 16)
    gm, _ = analyse(model, x)
    before = [(n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes]
    ExchangeabilityPass()(gm)
    assert [(n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes] == before
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_fn,inputs", [
    (ResNetish, lambda: (torch.randn(2, 3, 16, 16),)),
    (GCN, gcn_inputs),
    (OPTBlockLM, lambda: (torch.randint(0, 50, (2, 7)),)),
])
def test_explain_is_deterministic(model_fn, inputs) -> None:
    model = model_fn().eval()
    first = exfx.explain(model, inputs(), CFG8).to_dict()
    second = exfx.explain(model, inputs(), CFG8).to_dict()
    assert first == second
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert first["sites"] and first["groups"]


def test_report_table_and_dict() -> None:
    report = exfx.explain(MLP().eval(), (torch.randn(4, 20),), CFG8)
    text = str(report)
    assert text.splitlines()[0] == "MLP: 3 of 4 ReLUs are ENP sites"
    for site in report.sites:
        assert site.name in text
    data = report.to_dict()
    assert data["model"] == "MLP" and data["fingerprint"] == report.fingerprint
    assert [s["name"] for s in data["sites"]] == [s.name for s in report.sites]
    assert data["sites"][1]["params"]["samples"] == [8]
    with pytest.raises(KeyError, match="no site named"):
        report.site("nope")


class Tied(nn.Module):
    """One Linear applied twice: its rows and columns tie the three hidden axes together."""

    def __init__(self, return_last_hidden: bool) -> None:
        super().__init__()
        self.a, self.fc, self.out = nn.Linear(8, 40), nn.Linear(40, 40), nn.Linear(40, 2)
        self.return_last_hidden = return_last_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(F.relu(self.fc(F.relu(self.a(x))))))
        return h if self.return_last_hidden else self.out(h)


def test_tied_weights_tie_their_axes() -> None:
    x = torch.randn(3, 8)
    report = exfx.explain(Tied(False).eval(), (x,), CFG8)
    assert [(s.name, s.eligible) for s in report.sites] == [("a", False), ("fc", True), ("fc#2", True)]
    assert report.site("fc").group == report.site("fc#2").group
    # Returning the last hidden tensor pins its axis, hence fc's rows, hence every axis fc touches.
    report = exfx.explain(Tied(True).eval(), (x,), CFG8)
    for name in ("fc", "fc#2"):
        eligible, reason = verdicts(report)[name]
        assert not eligible and "model output" in reason
