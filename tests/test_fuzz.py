"""Property-based fuzzing over random architectures (tests/fuzz_models.py).

The CI profile runs 100 examples per property (the three slowest properties are marked ``slow``: the default
local run leaves them out, ``.ci/run`` runs them). The long profile runs 2,000:

    EXFX_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -m "slow or not slow"
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import exfx
from exfx.cost.model import MOMENT_FLOPS_PER_TERM, ZTEST_TEST_FLOPS

from fuzz_models import architectures, build
from helpers import assert_enp_invariant



def fuzz_settings(environ: Mapping[str, str]) -> settings:
    """The CI profile (100 derandomised examples), or ``EXFX_FUZZ_EXAMPLES`` random ones when set higher."""
    examples = int(environ.get("EXFX_FUZZ_EXAMPLES", "100"))
    return settings(max_examples=examples, deadline=None, derandomize=examples <= 100,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FUZZ = fuzz_settings(os.environ)

_schedules = st.sampled_from([(1,), (2,), (4,), (8,), (2, 4), (1, 3, 6), (16,)])


@st.composite
def site_params(draw: st.DrawFn) -> exfx.SiteParams:
    samples = draw(_schedules)
    if draw(st.booleans()) and samples[0] >= 2:
        return exfx.SiteParams(rule="ztest", alpha=draw(st.floats(0.0, 0.5)), samples=samples)
    threshold = draw(st.one_of(st.just(-math.inf), st.floats(-2.0, 1.0)))
    return exfx.SiteParams(rule="threshold", threshold=threshold, samples=samples)


def _random_plan(draw: st.DrawFn, report: exfx.Report) -> exfx.Plan:
    plan = exfx.Plan.from_report(report, exfx.Config(samples=1))
    sites = {}
    for site in report.sites:
        if site.structurally_eligible:
            params = draw(site_params())
            if params.samples[-1] <= (site.fan_in or 0):
                sites[site.name] = params
    return exfx.Plan(sites=sites, signatures=plan.signatures)


def _config(samples: tuple[int, ...]) -> exfx.Config:
    return exfx.Config(threshold=-math.inf, samples=samples)


@FUZZ
@given(spec=architectures(), samples=_schedules)
def test_never_prune_is_equivalent(spec, samples):
    model, x = build(spec)
    gm = exfx.compile(model, (x,), _config(samples))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # over 5 s at 100 examples; the other properties stay in the default run
@FUZZ
@given(spec=architectures(), data=st.data())
def test_enp_invariant_under_random_plans(spec, data):
    model, x = build(spec)
    report = exfx.explain(model, (x,), exfx.Config(samples=1))
    plan = _random_plan(data.draw, report)
    gm = exfx.compile(model, (x,), plan=plan)
    if any(s.eligible for s in gm.meta["exfx_report"].sites):
        assert_enp_invariant(gm, x, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # over 5 s at 100 examples; the other properties stay in the default run
@FUZZ
@given(spec=architectures(), data=st.data())
def test_executed_flops_at_most_dense_plus_test_overhead(spec, data):
    model, x = build(spec)
    report = exfx.explain(model, (x,), exfx.Config(samples=1))
    gm = exfx.compile(model, (x,), plan=_random_plan(data.draw, report))
    flops = exfx.count_flops(gm, x)
    overhead = 0
    for site in gm.meta["exfx_report"].eligible:
        figures = flops.sites[site.name]
        per_neuron = len(site.params.samples) * ZTEST_TEST_FLOPS + MOMENT_FLOPS_PER_TERM * site.params.samples[-1]
        overhead += per_neuron * figures.neurons
        assert figures.executed <= figures.dense + per_neuron * figures.neurons
    assert flops.executed <= flops.dense + overhead
    assert exfx.count_flops(model, x).executed == flops.dense


@FUZZ
@given(spec=architectures())
def test_explain_covers_every_relu(spec):
    model, x = build(spec)
    report = exfx.explain(model, (x,))
    traced = fx.symbolic_trace(model)
    relus = [n for n in traced.graph.nodes if _is_relu(traced, n)]
    assert len(report.sites) == len(relus)
    for site in report.sites:
        assert site.eligible or site.reason, site
    if report.sites:
        assert not report.sites[0].eligible  # its contraction axis (or its input) is the model input


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU-family spelling of tests/fuzz_models.py (ReLU6, hardtanh(0, 6) and clamps at 0 included)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh))
    if node.op == "call_method":
        return node.target in ("relu", "relu_", "clamp", "clamp_", "clamp_min")
    return node.op == "call_function" and node.target in (torch.relu, torch.relu_, torch.nn.functional.relu,
                                                          torch.nn.functional.relu6, torch.clamp)


@FUZZ
@given(spec=architectures(), data=st.data())
def test_plan_survives_json_round_trip(spec, data, tmp_path_factory):
    model, x = build(spec)
    report = exfx.explain(model, (x,), exfx.Config(samples=1))
    plan = _random_plan(data.draw, report)
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    plan.save(path)
    loaded = exfx.Plan.load(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()


@pytest.mark.slow  # over 5 s at 100 examples; the other properties stay in the default run
@FUZZ
@given(spec=architectures())
def test_capture_by_graph_module_gives_the_same_result(spec):
    model, x = build(spec)
    config = exfx.Config(threshold=0.0, samples=1)
    direct = exfx.compile(model, (x,), config)
    pretraced = exfx.compile(fx.symbolic_trace(model), (x,), config)
    with torch.no_grad():
        assert torch.equal(direct(x), pretraced(x))
    assert [s.to_dict() for s in direct.meta["exfx_report"].sites] == [
        s.to_dict() for s in pretraced.meta["exfx_report"].sites]


def test_long_profile_is_selected_by_environment():
    """`EXFX_FUZZ_EXAMPLES=2000` (with `-m "slow or not slow"`) runs 2,000 random examples per property; CI runs 100
    derandomised ones, so a CI failure always reproduces."""
    long = fuzz_settings({"EXFX_FUZZ_EXAMPLES": "2000"})
    assert long.max_examples == 2000 and not long.derandomize
    ci = fuzz_settings({})
    assert ci.max_examples == 100 and ci.derandomize
