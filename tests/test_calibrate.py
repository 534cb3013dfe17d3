"""Calibration (exfx.calibrate): budgets hold on the calibration data, few evaluations, determinism."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import exfx
from exfx.tune.calibration import DEFAULT_SCHEDULES
from exfx.tune.evaluation import evaluate, oracle, tunable_sites
from exfx.tune.instrument import PROJECTION_STREAM, batch_generator, instrument, record_gains
from exfx.tune.pricing import allocation_path, candidates

from models import VGGish

CLASSES, DIM = 10, 32


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(-1) == targets).float().mean().item()


@pytest.fixture(scope="module")
def task():
    """A small MLP trained on Gaussian clusters, and a held-out split in batches."""
    generator = torch.Generator().manual_seed(1)
    centers = torch.randn(CLASSES, DIM, generator=generator) * 2

    def sample(n):
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        return centers[y] + torch.randn(n, DIM, generator=generator) * 2.5, y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                          nn.Linear(96, CLASSES))
    x, y = sample(4000)
    optimiser = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(8):
        for i in range(0, len(x), 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    xv, yv = sample(1500)
    data = [(xv[i:i + 250], yv[i:i + 250]) for i in range(0, len(xv), 250)]
    return model, (xv[:4],), data


@pytest.mark.parametrize("budget", [0.001, 0.01])
def test_budget_holds_on_the_calibration_data(task, budget):
    model, example, data = task
    plan = exfx.calibrate(model, example, data, _accuracy, budget, max_evals=8)
    meta = plan.meta["calibration"]
    baseline = evaluate(model, data, _accuracy)
    achieved = evaluate(exfx.compile(model, example, plan=plan), data, _accuracy)
    assert baseline.score - achieved.score <= budget + 1e-9
    assert meta["score"] == pytest.approx(achieved.score)
    assert meta["reduction"] == pytest.approx(achieved.reduction)
    assert achieved.reduction > 0.05
    assert meta["evals"] <= 8 + 1 and meta["seconds"] > 0


def test_allocation_path_runs_from_conservative_to_aggressive(task):
    """Along the path, every step is a distinct allocation whose predicted savings and damage do not go down."""
    model, example, data = task
    analysis = exfx.analyse(model, example)
    checkpoints = {s.name: (8, 16, 32, 64) for s in tunable_sites(analysis, DEFAULT_SCHEDULES)}
    samples = instrument(analysis, data, checkpoints, 20_000, 0, False)
    options = {name: candidates(sample, DEFAULT_SCHEDULES, (0.01, 0.1, 0.3)) for name, sample in samples.items()}
    path = allocation_path(options, 1e9)
    assert len(path) > 3
    priced = {name: {c.params: c for c in opts} for name, opts in options.items()}
    totals = [(sum(priced[n][p].saved for n, p in alloc.items()), sum(priced[n][p].damage for n, p in alloc.items()))
              for _, alloc in path]
    lams = [lam for lam, _ in path]
    assert lams == sorted(lams, reverse=True)
    assert all(a != b for (_, a), (_, b) in zip(path, path[1:]))
    assert all(later[0] >= earlier[0] - 1e-6 and later[1] >= earlier[1] - 1e-9
               for earlier, later in zip(totals, totals[1:]))
    assert all(any(p.enabled for p in alloc.values()) for _, alloc in path)


def test_gains_are_the_gradient_of_the_projected_outputs():
    """For out = W4 relu(z) + b4 after site "2", the gain of its neuron j on example n is (r_n . W4[:, j])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 5)).eval()
    data = [(torch.randn(10, 8), torch.zeros(10, dtype=torch.long)) for _ in range(2)]
    example = (data[0][0][:2],)
    analysis = exfx.analyse(model, example)
    samples = instrument(analysis, data, {"2": (16,)}, 10_000, 0, False)
    record_gains(analysis, data, samples, seed=0, progress=False)
    for index, _ in enumerate(data):
        generator = batch_generator(0, index, PROJECTION_STREAM)  # the projection's generator: seed 0, this batch
        expected = torch.randn(10, 5, generator=generator) @ model[4].weight.detach()
        picked = samples["2"].picks[index]
        torch.testing.assert_close(samples["2"].gains[index], expected.reshape(-1)[picked].double())
    assert all(p.grad is None for p in model.parameters())


def test_binary_search_needs_about_log2_path_evaluations(task):
    model, example, data = task
    plan = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=30)
    # 401 grid prices give at most 401 allocations: a binary search needs at most ceil(log2(402)) = 9 of them
    assert plan.meta["calibration"]["evals"] <= 1 + 9


def test_looser_budget_saves_at_least_as_much(task):
    model, example, data = task
    tight = exfx.calibrate(model, example, data, _accuracy, 0.0, max_evals=8)
    loose = exfx.calibrate(model, example, data, _accuracy, 0.05, max_evals=8)
    assert loose.meta["calibration"]["reduction"] >= tight.meta["calibration"]["reduction"] - 1e-9


@pytest.mark.slow  # three calibrations, one per budget, to compare with (about 10 s)
def test_several_budgets_at_once_give_calibrates_plans_for_fewer_evaluations(task):
    model, example, data = task
    budgets = (0.0, 0.01, 0.05)
    together = exfx.calibrate_budgets(model, example, data, _accuracy, budgets, max_evals=8, confidence=0.9)
    alone = {b: exfx.calibrate(model, example, data, _accuracy, b, max_evals=8, confidence=0.9) for b in budgets}
    assert list(together) == list(budgets)
    for budget in budgets:
        mine, theirs = together[budget].meta["calibration"], alone[budget].meta["calibration"]
        assert together[budget].sites == alone[budget].sites
        assert mine["budget"] == budget and mine["budgets"] == list(budgets)
        assert (mine["score"], mine["reduction"]) == (theirs["score"], theirs["reduction"])
    # One baseline for all, and a plan on the path is evaluated once however many searches visit it. Every
    # search starts at the path's middle plan, so sharing saves at least two evaluations per extra budget.
    alone_evals = sum(p.meta["calibration"]["evals"] for p in alone.values())
    assert together[0.01].meta["calibration"]["evals"] <= alone_evals - 2 * (len(budgets) - 1)


@pytest.mark.parametrize("budgets", [0.01, (), "0.01", np.array(0.01)])
def test_calibrate_budgets_wants_a_sequence(task, budgets):
    model, example, data = task
    with pytest.raises(ValueError, match="non-empty sequence"):
        exfx.calibrate_budgets(model, example, data, _accuracy, budgets)


@pytest.mark.parametrize("make", [lambda: (b for b in (0.0, 0.05)), lambda: np.array([0.0, 0.05])])
def test_calibrate_budgets_takes_a_generator_or_an_array(task, make):
    """A generator was used up before the results were zipped with it ({} came back); an array failed."""
    model, example, data = task
    plans = exfx.calibrate_budgets(model, example, data, _accuracy, make(), max_evals=3)
    assert list(plans) == [0.0, 0.05]


def test_alphas_may_be_an_array(task):
    model, example, data = task
    plan = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=2, alphas=np.array([0.01, 0.05]))
    same = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=2, alphas=(0.01, 0.05))
    assert plan.sites == same.sites and 2 <= plan.meta["calibration"]["evals"] <= 3  # the baseline + max_evals
    assert all(p.alpha in (0.01, 0.05) for p in plan.sites.values() if p.enabled and p.rule == "ztest")


def test_capture_options_reach_every_compile(task, caplog):
    """calibrate took no capture options: a model whose input is a hidden activation had its first site
    left out of the plan, and compiling the plan with hidden_inputs then failed with a plan mismatch."""
    model, example, data = task
    capture = exfx.CaptureOptions(hidden_inputs=["input"])  # nn.Sequential's argument: a hidden activation
    with caplog.at_level(logging.WARNING, logger="exfx.tune"):
        plan = exfx.calibrate(model, example, data, _accuracy, 0.05, max_evals=3, capture_options=capture)
    assert "no output gradients" not in caplog.text  # the gains pass analysed the model with the same options
    assert "0" in plan.sites and "0" not in exfx.calibrate(model, example, data, _accuracy, 0.05, max_evals=3).sites
    exfx.compile(model, example, plan=plan, capture_options=capture)
    exfx.compile(model, example, plan=plan, hidden_inputs=["input"])  # the same options, as separate keywords
    searched = exfx.random_search(model, example, data, _accuracy, 0.05, evals=2,
                                  capture_options={"hidden_inputs": ["input"]})  # a dict of the fields too
    assert "0" in searched.sites
    with pytest.raises(ValueError, match="capture options"):
        exfx.calibrate(model, example, data, _accuracy, 0.05, capture_options={"hidden_input": ["input"]})
    with pytest.raises(ValueError, match="captured already"):
        exfx.calibrate(exfx.analyse(model, example), None, data, _accuracy, 0.05, capture_options=capture)


def test_options_object_and_keywords_are_one_calibration(task):
    """calibrate(options=CalibrationOptions(...)) is calibrate(**the same fields); keywords override the object."""
    model, example, data = task
    options = exfx.CalibrationOptions(max_evals=3, seed=2, alphas=(0.01, 0.05), progress=False)
    by_object = exfx.calibrate(model, example, data, _accuracy, 0.01, options=options)
    by_keywords = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=3, seed=2, alphas=(0.01, 0.05),
                                 progress=False)
    assert by_object.sites == by_keywords.sites
    budgets = exfx.calibrate_budgets(model, example, data, _accuracy, (0.01,), options=exfx.CalibrationOptions(),
                                     max_evals=3, seed=2, alphas=(0.01, 0.05), progress=False)
    assert budgets[0.01].sites == by_object.sites
    assert exfx.CalibrationOptions.from_kwargs(options, seed=5) == exfx.CalibrationOptions(
        max_evals=3, seed=5, alphas=(0.01, 0.05), progress=False)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"tracing": {}}, TypeError, "unexpected keyword argument.*'tracing'.*capture_options"),
    ({"options": {"seed": 1}}, TypeError, "options must be an exfx.CalibrationOptions"),
    ({"max_neurons": 0}, ValueError, "max_neurons"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"confidence": 1.0}, ValueError, "confidence"),
    ({"sensitivity": "hessian"}, ValueError, "sensitivity"),
    ({"config": "threshold"}, TypeError, "config must be an exfx.Config"),
    ({"capture_options": ["input"]}, TypeError, "capture_options must be"),
    ({"schedules": (8, 16)}, ValueError, "schedules must be a sequence of checkpoint schedules"),
])
def test_bad_options_fail_before_any_pass(kwargs, error, message):
    """The options check themselves when built: no model, data or metric is touched."""
    with pytest.raises(error, match=message):
        exfx.calibrate(None, None, None, None, 0.01, **kwargs)
    with pytest.raises(error, match=message):
        exfx.calibrate_budgets(None, None, None, None, (0.01,), **kwargs)


def test_deterministic_under_seed(task):
    model, example, data = task
    first = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=6, seed=3)
    second = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=6, seed=3)
    assert first.sites == second.sites


def test_data_may_be_a_generator(task):
    """data is read once into a list, so a one-shot generator gives the same plan as the list."""
    model, example, data = task
    from_list = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=3, confidence=0.9)
    from_generator = exfx.calibrate(model, example, (batch for batch in data), _accuracy, 0.01, max_evals=3,
                                    confidence=0.9)
    assert from_generator.sites == from_list.sites
    assert from_generator.meta["calibration"]["evals"] == from_list.meta["calibration"]["evals"]


def test_plan_round_trips_and_fits_the_model(task, tmp_path):
    model, example, data = task
    plan = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=4)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = exfx.Plan.load(path)
    assert loaded.sites == plan.sites
    x = data[0][0]
    torch.testing.assert_close(exfx.compile(model, example, plan=loaded)(x), exfx.compile(model, example, plan=plan)(x))


def test_random_search_baseline_uses_its_evaluations(task):
    model, example, data = task
    plan = exfx.random_search(model, example, data, _accuracy, 0.01, evals=12, seed=0)
    meta = plan.meta["calibration"]
    assert meta["evals"] == 13
    achieved = evaluate(exfx.compile(model, example, plan=plan), data, _accuracy)
    assert evaluate(model, data, _accuracy).score - achieved.score <= 0.01 + 1e-9


def test_conv_model_calibrates():
    torch.manual_seed(0)
    model = VGGish(width=16).eval()
    x = torch.randn(24, 3, 16, 16)
    labels = model(x).argmax(-1)
    data = [(x[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    plan = exfx.calibrate(model, (x[:2],), data, _accuracy, 0.05, schedules=((16,), (8, 16)), max_evals=5)
    assert set(plan.sites) <= {"features.3", "features.7", "classifier.1"}
    assert plan.meta["calibration"]["baseline"] - plan.meta["calibration"]["score"] <= 0.05 + 1e-9


@pytest.mark.parametrize("search", ["calibrate", "random_search"])
def test_a_site_no_schedule_fits_is_disabled_not_left_to_the_default(search):
    """Site "2" (fan-in 48) fits no schedule of 64: the plan left it out, and exfx.compile then pruned it
    with the default Config (threshold 0), a setting the search never measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(200, 32)
    data = [(x[i:i + 100], model(x[i:i + 100]).argmax(-1)) for i in range(0, 200, 100)]
    if search == "calibrate":
        with pytest.warns(exfx.ExfxWarning, match="no site of Sequential can be tuned"):
            plan = exfx.calibrate(model, (x[:2],), data, _accuracy, 0.0, schedules=((64,),), max_evals=3)
    else:
        plan = exfx.random_search(model, (x[:2],), data, _accuracy, 0.0, schedules=((64,),), evals=2)
    assert plan.sites == {"2": exfx.SiteParams(enabled=False)}
    compiled = exfx.compile(model, (x[:2],), plan=plan)
    assert not compiled.meta["exfx_report"].eligible
    assert evaluate(compiled, data, _accuracy).score == plan.meta["calibration"]["score"] == 1.0


@pytest.mark.parametrize("rule", ["threshold", "ztest"])
def test_config_restricts_the_search_to_its_rule_and_schedule(task, rule):
    model, example, data = task
    plan = exfx.calibrate(model, example, data, _accuracy, 0.03, exfx.Config(rule=rule, samples=(8, 16)), max_evals=9)
    enabled = [p for p in plan.sites.values() if p.enabled]
    assert enabled and all(p.rule == rule and p.samples == (8, 16) for p in enabled)


def test_model_without_sites_gives_an_empty_plan():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    data = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))]
    with pytest.warns(exfx.ExfxWarning, match="Sequential has no activation, so no site to tune"):
        plan = exfx.calibrate(model, (torch.randn(2, 4),), data, _accuracy)
    assert plan.sites == {} and plan.meta["calibration"]["evals"] == 1


def test_no_site_to_tune_warns_with_each_activations_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(40, 32)
    data = [(x, model(x).argmax(-1))]
    with pytest.warns(exfx.ExfxWarning, match=r"(?s)no site of Sequential can be tuned.*"
                                              r"  0: contraction axis is a model input \(`\w+`\)\n"
                                              r"  2: fan-in 48 < 64, the last checkpoint of the shortest schedule"):
        plans = exfx.calibrate_budgets(model, (x[:2],), data, _accuracy, (0.0, 0.01), schedules=((64,),))
    assert all(p.sites == {"2": exfx.SiteParams(enabled=False)} for p in plans.values())


@pytest.mark.parametrize("kwargs, error, message", [
    ({"budget": -0.1}, ValueError, "budget"),
    ({"budget": 1.5}, ValueError, "budget"),
    ({"budget": 5}, ValueError, r"^budget must be an absolute metric drop in \[0, 1\) \(0\.01 = 1 point, "
                                r"0\.001 = 0\.1 point\), got 5$"),
    ({"budget": float("nan")}, ValueError, "budget"),
    ({"budget": True}, ValueError, "budget"),
    ({"schedules": ()}, ValueError, "schedules"),
    ({"schedules": ((32, 16),)}, ValueError, "increasing"),
    ({"max_evals": 1}, ValueError, "max_evals"),
    ({"schedules": ((1, 8),)}, ValueError, "start at 2"),
    ({"config": exfx.Config(rule="threshold", samples=(1, 8))}, ValueError, "start at 2"),
    ({"alphas": (0.05, 0.7)}, ValueError, "alphas"),
    ({"alphas": ()}, ValueError, "alphas"),
    ({"alphas": np.array([0.05, 0.7])}, ValueError, "alphas"),
    ({"config": exfx.Config(samples=8), "schedules": ((8,),)}, ValueError, "not both"),
])
def test_bad_arguments(task, kwargs, error, message):
    model, example, data = task
    with pytest.raises(error, match=message):
        exfx.calibrate(model, example, data, _accuracy, **kwargs)


@pytest.mark.parametrize("data, message", [([], "empty"), ([torch.randn(3, DIM)], "pairs")])
def test_bad_data(task, data, message):
    model, example, _ = task
    with pytest.raises(exfx.ExfxError, match=message):
        exfx.calibrate(model, example, data, _accuracy)


def test_oracle_bound_skips_exactly_the_non_positive_neurons(task):
    model, example, data = task
    bound = oracle(model, example, data, _accuracy, samples=32)
    baseline = evaluate(model, data, _accuracy)
    assert bound.score == baseline.score and bound.dense == baseline.dense
    # By hand: each non-positive pre-activation of the two sites (96 units, stop at 32) skips 64 multiply-adds.
    net = list(model)
    skipped = 0
    with torch.no_grad():
        for x, _ in data:
            h1 = torch.relu(net[0](x))
            z2 = net[2](h1)
            z3 = net[4](torch.relu(z2))
            skipped += int((z2 <= 0).sum() + (z3 <= 0).sum()) * (96 - 32) * 2
    assert bound.executed == baseline.dense - skipped
    assert 0 < bound.reduction < 1


class _DictOutput(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        return {"logits": logits, "norm": logits.norm(dim=-1)}


class _TupleOutput(_DictOutput):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().forward(x)
        return out["logits"], out["norm"]


@pytest.mark.parametrize("form", ["dict outputs", "tuple outputs", "list targets", "numpy targets"])
def test_outputs_and_targets_of_every_batch_are_combined(task, form):
    """A dict output reached the metric as a list of per-batch dicts; list targets were treated as a structure."""
    model, example, data = task
    if form == "dict outputs":
        model = _DictOutput(model).eval()
        metric = lambda out, y: _accuracy(out["logits"], y)  # noqa: E731
    elif form == "tuple outputs":
        model = _TupleOutput(model).eval()
        metric = lambda out, y: _accuracy(out[0], y)  # noqa: E731
    elif form == "list targets":
        data = [(x, y.tolist()) for x, y in data]
        metric = lambda out, y: _accuracy(out, torch.tensor(y))  # noqa: E731
    else:
        data = [(x, y.numpy()) for x, y in data]
        metric = lambda out, y: _accuracy(out, torch.from_numpy(y))  # noqa: E731
    baseline = evaluate(model, data, metric)
    assert baseline.score == pytest.approx(evaluate(task[0], task[2], _accuracy).score)
    plan = exfx.calibrate(model, example, data, metric, 0.02, max_evals=3, confidence=0.9)
    assert plan.meta["calibration"]["baseline"] - plan.meta["calibration"]["score"] <= 0.02 + 1e-9


def test_numpy_budget_and_metric(task, tmp_path):
    """An np.float32 budget was refused, and would not have gone into the plan's JSON."""
    model, example, data = task
    metric = lambda out, y: np.float32(_accuracy(out, y))  # noqa: E731
    plan = exfx.calibrate(model, example, data, metric, np.float32(0.01), max_evals=3)
    meta = plan.meta["calibration"]
    assert type(meta["budget"]) is float and type(meta["score"]) is float and type(meta["baseline"]) is float
    plan.save(tmp_path / "plan.json")
    assert exfx.Plan.load(tmp_path / "plan.json").meta["calibration"]["budget"] == pytest.approx(0.01)


class _Untraceable(nn.Module):
    """torch.fx cannot trace `x.dim()` into a Python int, so exfx captures it with Dynamo, whose module
    returns the dict's tensors as a tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() == 2:
            x = x * 1.0
        return {"logits": self.model(x)}


def test_metric_sees_the_compiled_module_outputs_for_the_baseline_too(task):
    """The baseline ran the original model (a dict) and the trials the compiled one (a tuple): no metric
    could read both, so calibrating a Dynamo-captured model that returns a dict failed."""
    model, example, data = task
    wrapped = _Untraceable(model).eval()
    metric = lambda out, y: _accuracy(out[0], y)  # noqa: E731
    for plan in (exfx.calibrate(wrapped, example, data, metric, 0.01, max_evals=3),
                 exfx.random_search(wrapped, example, data, metric, 0.01, evals=2)):
        meta = plan.meta["calibration"]
        assert meta["baseline"] == pytest.approx(evaluate(model, data, _accuracy).score)
        assert meta["baseline"] - meta["score"] <= 0.01 + 1e-9


def test_instrumentation_leaves_the_sites_it_does_not_search_dense():
    """The instrumented pass gave a site outside the search the default Config, pruning it: the sites after
    it were measured on activations no trial would see."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                        nn.Linear(96, 10)).eval()
    x = torch.randn(200, 32)
    data = [(x[i:i + 100], None) for i in range(0, 200, 100)]
    analysis = exfx.analyse(net, (x[:2],))
    sites = tunable_sites(analysis, ((64,),))
    assert [s.name for s in sites] == ["4"] and set(analysis.signatures) == {"2", "4"}  # "2" (fan-in 48): not searched
    samples = instrument(analysis, data, {"4": (64,)}, 500, 0, False)
    recorded = torch.cat(samples["4"].pre)
    with torch.no_grad():
        dense = net[:5](x).reshape(-1).double()
    assert torch.isclose(recorded[:, None], dense[None, :], rtol=0, atol=1e-5).any(1).all()


def test_the_recorded_sample_holds_no_more_memory_than_its_own_values(task):
    """Each batch's neuron indices were a slice of a permutation of all the site's neurons, which kept the whole
    permutation alive: about 20 GB over 10,000 images of ResNet-18."""
    model, example, data = task
    analysis = exfx.analyse(model, example)
    samples = instrument(analysis, data, {s.name: (8,) for s in tunable_sites(analysis, ((8,),))}, 600, 0, False)
    recorded = [t for sample in samples.values()
                for t in [*sample.picks, *sample.pre, *(v for rules in sample.checkpoints.values()
                                                        for values in rules.values() for v in values)]]
    assert recorded and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in recorded)


def test_plan_records_each_sites_measured_keep_ratio(task):
    """Calibration writes what it measured: each enabled site's share of neurons kept, over the data it saw."""
    model, example, data = task
    plan = exfx.calibrate(model, example, data, _accuracy, 0.01, max_evals=8)
    enabled = {name for name, params in plan.sites.items() if params.enabled}
    assert enabled and set(plan.keep) == enabled
    compiled = exfx.compile(model, example, plan=plan)
    neurons, pruned = {}, {}
    for inputs, _ in data:
        for name, site in exfx.count_flops(compiled, inputs).sites.items():
            neurons[name] = neurons.get(name, 0) + site.neurons
            pruned[name] = pruned.get(name, 0) + site.pruned
    for name in enabled:
        assert plan.keep[name] == pytest.approx(1 - pruned[name] / neurons[name])
    assert exfx.Plan.from_json(plan.to_json()).keep == plan.keep
