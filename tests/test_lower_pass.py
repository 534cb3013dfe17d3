"""The lowering pass (``compile(..., lowering="native")``): same outputs and masks as the reference ops, or dense.

Kernel choices are forced with ``EXFX_FORCE_LOWERING`` (so no test depends on
timings); the timing model itself is tested with synthetic candidates. The native
extension is built (or loaded from the torch extensions cache) once per session, as
in ``test_native.py``; the fallback runs in a subprocess with ``EXFX_NO_NATIVE=1``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import exfx
from exfx.cost.model import FORCE_LOWERING_ENV, LatencyModel, TimingCache
from exfx.meta import lowering
from exfx.ops import native

from models import MLP, OPTBlockLM, VGGish

OPS = torch.ops.exfx
BATCHES = (1, 2, 7, 64)
HERE = Path(__file__).resolve().parent


class ResidualFFN(nn.Module):
    """``relu(h + fc2(relu(fc1(ln(h)))))``: a site with a residual shift (fc2) after an OPT-style FFN (fc1)."""

    def __init__(self, d_in: int = 24, d: int = 64, hidden: int = 160, classes: int = 7) -> None:
        super().__init__()
        self.emb, self.ln = nn.Linear(d_in, d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.emb(x))
        h = torch.relu(h + self.fc2(torch.relu(self.fc1(self.ln(h)))))
        return self.head(h)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forced native choices and a private timing cache: no test depends on timings or on ~/.cache."""
    monkeypatch.setenv("EXFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(FORCE_LOWERING_ENV, "native")


def _model(name: str) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP().eval(), lambda b: torch.randn(b, 20)
    if name == "opt":
        return OPTBlockLM(d=48, ffn=160).eval(), lambda b: torch.randint(0, 50, (b, 5))
    return ResidualFFN().eval(), lambda b: torch.randn(b, 24)


class _Masks(fx.Interpreter):
    """Runs a compiled module and keeps each site's keep mask (reference ``early_exit`` or ``enp_linear``)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.masks: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n.target is OPS.early_exit.default:
            self.masks[str(n.args[-1])] = out
        elif n.target is OPS.enp_linear.default:
            self.masks[n.name.removesuffix("_enp_linear")] = out[1]
        return out


def _run(gm: fx.GraphModule, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    recorder = _Masks(gm)
    with torch.no_grad():
        out = recorder.run(x)
    return out, recorder.masks


def _slug(name: str) -> str:
    return name.replace(".", "_")


@pytest.mark.parametrize("name", ["mlp", "opt", "residual"])
def test_lowered_model_equals_the_reference_at_every_batch(built: bool, name: str) -> None:
    model, make = _model(name)
    analysis = exfx.analyse(model, (make(3),))
    config = exfx.Config(samples=16, threshold=-0.01)
    reference, lowered = analysis.compile(config), analysis.compile(config, lowering="native")
    targets = {n.target for n in lowered.graph.nodes}
    assert OPS.enp_linear.default in targets and OPS.partial_sum.default not in targets
    sites = [s.name for s in lowered.meta["exfx_report"].eligible]
    assert sites and all(lowered.meta["exfx_report"].site(s).lowering == "native" for s in sites)
    for batch in BATCHES:
        x = make(batch)
        out_ref, masks_ref = _run(reference, x)
        out_low, masks_low = _run(lowered, x)
        torch.testing.assert_close(out_low, out_ref, rtol=1e-4, atol=1e-5)
        assert sorted(masks_ref) == sorted(sites)
        for site in sites:
            assert torch.equal(masks_low[_slug(site)], masks_ref[site]), f"{site} at batch {batch}"
        torch.testing.assert_close(lowered(x), out_ref, rtol=1e-4, atol=1e-5)  # through CompiledModule too


def test_consumers_become_sparse_input_and_residual_sites_are_lowered(built: bool) -> None:
    model, make = _model("residual")
    lowered = exfx.compile(model, (make(4),), exfx.Config(samples=16), lowering="native")
    nodes = {n.name: n for n in lowered.graph.nodes}
    fused = nodes["fc2_enp_linear"]
    assert fused.args[4] is not None, "the residual shift goes into the kernel"
    assert lowering(nodes["head_sparse_input"]).form == "sparse_input"
    assert lowering(nodes["head_sparse_input"]).input_site == "fc2"
    assert isinstance(lowered.get_buffer("exfx_fc1_head"), torch.Tensor)
    report = lowered.meta["exfx_report"]
    assert "consumer head: sparse_input" in report.site("fc2").lowering_reason
    assert "lowering" in str(report).splitlines()[1]


def test_never_prune_lowered_model_equals_the_original(built: bool) -> None:
    for name in ("mlp", "opt", "residual"):
        model, make = _model(name)
        lowered = exfx.compile(model, (make(2),), exfx.Config(samples=16, threshold=-math.inf), lowering="native")
        assert any(n.target is OPS.enp_linear.default for n in lowered.graph.nodes)
        for batch in (1, 7):
            x = make(batch)
            with torch.no_grad():
                torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)


def test_conv_and_multi_checkpoint_sites_become_dense_with_the_reason(built: bool) -> None:
    torch.manual_seed(0)
    model, x = VGGish(width=16).eval(), torch.randn(2, 3, 16, 16)
    analysis = exfx.analyse(model, (x,))
    lowered = analysis.compile(exfx.Config(samples=16, threshold=-0.05), lowering="native")
    report = lowered.meta["exfx_report"]
    conv = report.site("features.7")
    assert (conv.lowering, conv.lowering_reason) == ("dense", "conv2d sites have no native kernel yet")
    assert report.site("classifier.1").lowering == "native"  # a flattened-unit site: 64 channels of 16 features
    assert "conv2d sites have no native kernel yet" in str(report)
    targets = {n.target for n in lowered.graph.nodes}
    assert OPS.partial_sum.default not in targets and OPS.complete.default not in targets
    # The conv sites run the analysed graph's dense producers: the same as disabling them in a plan.
    config = exfx.Config(samples=16, threshold=-0.05)
    plan = exfx.Plan.from_report(analysis.explain(config), config)
    for site in report.eligible:
        if site.kind != "linear":
            assert site.lowering == "dense"
            plan = plan.with_site(site.name, enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), analysis.compile(plan)(x), rtol=1e-4, atol=1e-5)

    multi = analysis.compile(exfx.Config(samples=(8, 16), threshold=-0.05), lowering="native")
    row = multi.meta["exfx_report"].site("classifier.1")
    assert row.lowering == "dense" and "2 checkpoints" in row.lowering_reason
    assert not any(str(n.target).startswith("exfx.") for n in multi.graph.nodes)


def test_forced_dense_is_the_original_model(built: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_LOWERING_ENV, "dense")
    model, make = _model("residual")
    lowered = exfx.compile(model, (make(3),), exfx.Config(samples=16), lowering="native")
    assert not any(str(n.target).startswith("exfx.") for n in lowered.graph.nodes)
    assert {s.lowering for s in lowered.meta["exfx_report"].eligible} == {"dense"}
    x = make(5)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-6)


def test_reference_lowering_is_unchanged_and_bad_values_are_refused() -> None:
    model, make = _model("mlp")
    analysis = exfx.analyse(model, (make(2),))
    report = analysis.compile(exfx.Config(samples=16)).meta["exfx_report"]
    assert all(s.lowering == "" for s in report.sites) and "lowering" not in str(report)
    assert "lowering" not in json.dumps(report.to_dict())
    with pytest.raises(ValueError, match="lowering must be one of"):
        analysis.compile(exfx.Config(samples=16), lowering="fast")
    explained = exfx.explain(model, (make(2),), exfx.Config(samples=16), lowering="native")
    assert {s.lowering for s in explained.eligible} == {"native"}


def test_fallback_gives_identical_outputs_and_masks(built: bool, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, warnings, torch, exfx
        sys.path.insert(0, {str(HERE)!r})
        from test_lower_pass import _model, _run
        from exfx.ops import native
        torch.set_num_threads(1)
        model, make = _model("opt")
        lowered = exfx.compile(model, (make(3),), exfx.Config(samples=16, threshold=-0.01), lowering="native")
        torch.manual_seed(1)
        x = make(7)
        out, masks = _run(lowered, x)
        torch.save({{"native": native.native_available(), "x": x, "out": out, "masks": masks}}, sys.argv[1])
    """)
    env = {**os.environ, "EXFX_NO_NATIVE": "1", FORCE_LOWERING_ENV: "native"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fallback.pt")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    fallback = torch.load(tmp_path / "fallback.pt")
    assert fallback["native"] is False
    model, make = _model("opt")
    lowered = exfx.compile(model, (make(3),), exfx.Config(samples=16, threshold=-0.01), lowering="native")
    out, masks = _run(lowered, fallback["x"])
    torch.testing.assert_close(out, fallback["out"], rtol=1e-4, atol=1e-5)
    assert masks.keys() == fallback["masks"].keys()
    for site, mask in masks.items():
        assert torch.equal(mask, fallback["masks"][site]), site


def test_count_flops_follows_the_masks_and_keeps_sparse_savings_apart(built: bool) -> None:
    model, make = _model("residual")
    analysis = exfx.analyse(model, (make(3),))
    config = exfx.Config(samples=16, threshold=-0.01)
    reference, lowered = analysis.compile(config), analysis.compile(config, lowering="native")
    x = make(7)
    ref, low = exfx.count_flops(reference, x), exfx.count_flops(lowered, x)
    assert {k: v.to_dict() for k, v in low.sites.items()} == {k: v.to_dict() for k, v in ref.sites.items()}
    assert low.dense == ref.dense
    assert list(low.consumers) == ["head"] and low.consumers["head"].executed < low.consumers["head"].dense
    assert low.enp_reduction == pytest.approx(ref.reduction)
    assert low.reduction > ref.reduction
    assert "consumers" in low.to_dict() and "consumers" not in ref.to_dict()


def test_torch_export_keeps_the_native_ops(built: bool) -> None:
    model, make = _model("residual")
    lowered = exfx.compile(model, (make(3),), exfx.Config(samples=16, threshold=-0.01), lowering="native")
    x = make(3)
    program = torch.export.export(lowered, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"exfx.enp_linear.default", "exfx.sparse_input_linear.default"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), lowered(x))


def test_planned_keep_ratio_prices_the_site(built: bool) -> None:
    model, make = _model("mlp")
    analysis = exfx.analyse(model, (make(4),))
    plan = exfx.Plan.from_report(analysis.explain(exfx.Config(samples=16)), exfx.Config(samples=16))
    plan = exfx.Plan(sites=plan.sites, signatures=plan.signatures, keep={"net.2": 0.25})
    assert exfx.Plan.from_json(plan.to_json()).keep == {"net.2": 0.25}
    lowered = analysis.compile(plan, lowering="native")
    records = [lowering(n) for n in lowered.graph.nodes if lowering(n) is not None]
    keeps = {r.site: r.keep for r in records if r.form == "native"}
    assert keeps["net.2"] == 0.25 and keeps["net.1"] != 0.25


def test_latency_model_measures_once_then_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_LOWERING_ENV)
    cache = TimingCache(tmp_path / "t.json")
    calls = {"dense": 0, "native": 0}

    def slow() -> None:
        calls["dense"] += 1
        time.sleep(0.004)

    def fast() -> None:
        calls["native"] += 1

    choice = LatencyModel(cache, repeats=3).choose("toy|rows=1", {"dense": slow, "native": fast})
    assert choice.form == "native" and not choice.forced and choice.ms("dense") >= 4.0
    assert calls == {"dense": 4, "native": 4}
    again = LatencyModel(cache, repeats=3).choose("toy|rows=1", {"dense": slow, "native": fast})
    assert again == choice and calls == {"dense": 4, "native": 4}, "the second choice reads the cache"
    never = LatencyModel(cache, repeats=3).choose("toy|rows=2", {"dense": fast, "native": slow})
    assert never.form == "dense"
    assert LatencyModel(False, force="dense").choose("x", {"dense": slow, "native": fast}).form == "dense"
    assert calls["dense"] == 8


class GatedFFN(nn.Module):
    """``down(relu(gate(x)) * up(x))``: the ReLU-gated FFN of ReluLLaMA / ProSparse, after an embedding."""

    def __init__(self, d: int = 48, hidden: int = 160) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, d)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.down(torch.relu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("threshold", [-math.inf, 0.0])
def test_gated_ffn_lowers_the_gate_and_reads_the_product_sparsely(built: bool, threshold: float) -> None:
    """The gate runs the early-exit kernel; ``down`` skips the product's zeros: equal to the reference ops,
    and to the model at never-prune."""
    torch.manual_seed(0)
    model = GatedFFN().eval()
    tokens = torch.randint(0, 40, (3, 5))
    config = exfx.Config(samples=16, threshold=threshold)
    lowered = exfx.compile(model, (tokens,), config, lowering="native")
    targets = [n.target for n in lowered.graph.nodes]
    assert OPS.enp_linear.default in targets and OPS.sparse_input_linear.default in targets
    sparse = next(n for n in lowered.graph.nodes if n.target is OPS.sparse_input_linear.default)
    assert sparse.args[0].target in (operator.mul, torch.mul)
    reference = exfx.compile(model, (tokens,), config, lowering="reference")
    for batch in (1, 4):
        x = torch.randint(0, 40, (batch, 5))
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), reference(x), rtol=1e-4, atol=1e-5)
            if threshold == -math.inf:
                torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
