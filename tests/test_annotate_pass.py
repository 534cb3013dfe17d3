"""The annotate step: one typed decision per site, made in one place, that every pass and the report read."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import exfx
from exfx.errors import ExfxError, PlanError
from exfx.meta import SiteDecision, site_decision, site_match
from exfx.passes import AnnotatePass, EnpPass
from exfx.passes.annotate_pass import EXACT_LOWERING_REASON, NATIVE_INTENT_REASON, decide_sites
from exfx.passes.pipeline import compile_passes

from models import MLP, VGGish


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(4, 20)


def _annotated(analysis: exfx.Analysis, decisions: dict[str, SiteDecision]) -> torch.fx.GraphModule:
    gm = torch.fx.GraphModule(analysis.graph_module, analysis.graph_module.graph.__deepcopy__({}))
    AnnotatePass(decisions)(gm)
    return gm


def test_every_site_node_carries_its_decision_and_the_report_reads_it() -> None:
    model, x = _mlp()
    analysis = exfx.analyse(model, (x,))
    decisions = analysis.decide(None, exfx.Config(samples=16))
    gm = _annotated(analysis, decisions)
    on_graph = {site_match(n).name: site_decision(n) for n in gm.graph.nodes if site_match(n) is not None}
    assert on_graph == decisions
    report = analysis.explain(exfx.Config(samples=16))
    for row in report.sites:
        record = decisions[row.name]
        assert (row.eligible, row.reason, row.params, row.exact_available) == (
            record.eligible, record.reason, record.params, record.exact_available)


def test_a_config_longer_than_the_fan_in_leaves_the_site_dense_and_a_plan_is_refused() -> None:
    model, x = _mlp()
    analysis = exfx.analyse(model, (x,))
    narrow = next(s for s in analysis.sites if s.eligible and s.fan_in == 48)
    decisions = analysis.decide(None, exfx.Config(samples=64))
    assert not decisions[narrow.name].eligible
    assert decisions[narrow.name].reason == "fan-in 48 < samples 64"
    plan = exfx.Plan.from_report(analysis.explain(exfx.Config(samples=16)), exfx.Config(samples=16))
    plan = plan.with_site(narrow.name, samples=64)
    for action in (lambda: analysis.compile(plan), lambda: analysis.explain(plan=plan)):
        with pytest.raises(PlanError, match=rf"plan site '{narrow.name}': samples \(64,\) exceed its fan-in 48"):
            action()


def test_lowering_intent_is_decided_with_the_site() -> None:
    torch.manual_seed(0)
    model = VGGish(width=8).eval()
    analysis = exfx.analyse(model, (torch.randn(2, 3, 16, 16),))
    native = analysis.decide(None, exfx.Config(samples=8), "native")
    kinds = {s.name: s.kind for s in analysis.sites}
    for name, record in native.items():
        if not record.eligible:
            assert record.lowering == ""
        elif kinds[name] == "conv2d":
            assert (record.lowering, record.lowering_reason) == ("dense", "conv2d sites have no native kernel yet")
        else:
            assert (record.lowering, record.lowering_reason) == ("native", NATIVE_INTENT_REASON)
    exact = analysis.decide(None, exfx.Config(rule="exact"), "native")
    assert all(r.lowering == "reference" and r.lowering_reason == EXACT_LOWERING_REASON
               for r in exact.values() if r.eligible)
    reference = analysis.decide(None, exfx.Config(samples=8))
    assert {r.lowering for r in reference.values() if r.eligible} == {"reference"}


def test_a_tampered_decision_is_caught_by_validate() -> None:
    model, x = _mlp()
    analysis = exfx.analyse(model, (x,))
    decisions = analysis.decide(None, exfx.Config(samples=16))
    name = next(n for n, r in decisions.items() if r.eligible)
    fan_in = analysis.site(name).fan_in
    decisions[name] = replace(decisions[name], params=exfx.SiteParams(samples=fan_in + 1))
    with pytest.raises(ExfxError, match=rf"site '{name}'.*exceed the fan-in"):
        _annotated(analysis, decisions)


def test_rewrites_refuse_a_graph_nobody_annotated() -> None:
    model, x = _mlp()
    analysis = exfx.analyse(model, (x,))
    gm = torch.fx.GraphModule(analysis.graph_module, analysis.graph_module.graph.__deepcopy__({}))
    with pytest.raises(PlanError, match="carry no decision; run exfx.passes.AnnotatePass"):
        EnpPass()(gm)


def test_the_pass_order_is_stated_once() -> None:
    model, x = _mlp()
    analysis = exfx.analyse(model, (x,))
    decisions = analysis.decide(None, exfx.Config())
    names = [type(p).__name__ for p in compile_passes(decisions, None, "native", (x,))]
    assert names == ["AnnotatePass", "DominancePass", "EnpPass", "LowerPass"]
    assert [type(p).__name__ for p in compile_passes(decisions, None, "reference", (x,))][-1] == "EnpPass"


def test_keep_ratios_of_a_plan_reach_the_decision_and_bad_ones_are_refused() -> None:
    model, x = _mlp()
    analysis = exfx.analyse(model, (x,))
    plan = exfx.Plan.from_report(analysis.explain(exfx.Config(samples=16)), exfx.Config(samples=16))
    name = next(iter(plan.sites))
    plan = exfx.Plan(sites=plan.sites, signatures=plan.signatures, keep={name: 0.4})
    decisions = decide_sites(analysis.sites, plan, exfx.Config(), "native")
    assert decisions[name].keep == 0.4
    assert all(r.keep is None for n, r in decisions.items() if n != name)
    with pytest.raises(PlanError, match="plan field 'keep' site 'x'"):
        exfx.Plan(keep={"x": 1.5})


@settings(max_examples=25, deadline=None)
@given(samples=st.integers(1, 80), threshold=st.floats(-2.0, 1.0), exact=st.booleans())
def test_decisions_are_consistent_for_any_config(samples: int, threshold: float, exact: bool) -> None:
    """Whatever the config, every decision validates, and a site is eligible exactly when its schedule fits."""
    model, x = _mlp()
    analysis = _ANALYSIS.setdefault("mlp", exfx.analyse(model, (x,)))
    config = exfx.Config(samples=samples, threshold=threshold, exact=exact)
    decisions = analysis.decide(None, config, "native")
    _annotated(analysis, decisions)  # validates
    for site in analysis.sites:
        record = decisions[site.name]
        assert record.eligible == (site.eligible and (site.fan_in or 0) >= samples)
        if record.params is not None and record.params.exact:
            assert site.exact_available


_ANALYSIS: dict[str, exfx.Analysis] = {}
