"""Dominance prediction for prediction heads: ``Analysis.compile(..., dominance=exfx.DominanceParams(...))``.

The contract: a kept class's logit equals the dense logit (up to float reassociation), a dropped one is ``-inf``,
every row keeps at least one class, and the argmax equals the dense argmax whenever the true argmax is kept.
``alpha = 0`` keeps every class. The head's contraction axis must be exchangeable, and bad flag values are
refused naming the field.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import exfx
from exfx.analysis.heads import head_input_rms, match_head
from exfx.cost.flops import run_counting
from exfx.cost.model import DOMINANCE_TEST_FLOPS, dominance_sample_flops
from exfx.ops.dominance import dominance_linear
from exfx.passes.dominance_pass import outlier_units, unit_order

NEVER = exfx.Config(threshold=-math.inf)
TOL = dict(rtol=1e-5, atol=1e-5)


class HeadMLP(nn.Module):
    """features -> hidden ReLU -> LayerNorm -> head (the LM shape: the head reads a normalised hidden state)."""

    def __init__(self, features: int = 12, hidden: int = 48, classes: int = 300, norm: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(F.relu(self.fc(x))))


class SoftmaxHead(HeadMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=-1)


class ConcatHead(nn.Module):
    """Two ReLU branches concatenated before the head: its contraction axis holds two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(10, 24), nn.Linear(10, 8), nn.Linear(32, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=-1))


class InputHead(nn.Module):
    """The model input feeds the head directly: its contraction axis is pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class SharedLogits(HeadMLP):
    """The logits are also used for something else: a dropped class would leak -inf into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits - logits.mean(-1, keepdim=True)


class FlattenedMapHead(nn.Module):
    """conv -> ReLU -> flatten -> head: the head contracts channels of H*W features each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).flatten(1))


def _dominant_model() -> HeadMLP:
    """One class wins by a wide margin on every input: its head row is aligned with the (ReLU, no norm) hidden."""
    model = HeadMLP(hidden=64, classes=200, norm=False)
    with torch.no_grad():
        model.fc.bias.fill_(1.0)
        model.head.weight[7] = 0.5
    return model.eval()


def _check_contract(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Kept logits exact, dropped ones -inf, at least one kept per row; returns the keep mask."""
    kept = torch.isfinite(out)
    assert torch.equal(out[~kept], torch.full_like(out[~kept], -math.inf))
    torch.testing.assert_close(out[kept], dense[kept], **TOL)
    assert kept.reshape(-1, out.shape[-1]).any(-1).all()
    winners = dense.argmax(-1, keepdim=True)
    winner_kept = kept.gather(-1, winners).squeeze(-1)
    assert torch.equal(out.argmax(-1)[winner_kept], dense.argmax(-1)[winner_kept])
    return kept


@pytest.mark.parametrize("params", [exfx.DominanceParams(samples=16, alpha=0.01),
                                    exfx.DominanceParams(samples=(8, 24), alpha=0.05),
                                    exfx.DominanceParams(samples=(4, 40), alpha=0.2, always_sampled=(5, 0, 17)),
                                    exfx.DominanceParams(samples=(8, 24), alpha=0.05, variance="pooled"),
                                    exfx.DominanceParams(samples=12, alpha=0.3, always_sampled=(3,),
                                                         variance="pooled")])
def test_kept_classes_exact_and_dropped_minus_inf(params: exfx.DominanceParams) -> None:
    model = HeadMLP().eval()
    x = torch.randn(6, 5, 12)  # a (batch, position) prefix, as an LM's hidden states
    gm = exfx.analyse(model, (x,)).compile(NEVER, dominance=params)
    with torch.no_grad():
        _check_contract(gm(x), model(x))


def test_wide_bounds_keep_every_class() -> None:
    model = HeadMLP().eval()
    x = torch.randn(16, 12)
    analysis = exfx.analyse(model, (x,))
    with torch.no_grad():
        dense = model(x)
        for alpha in (0.0, 1e-100):
            out = analysis.compile(NEVER, dominance=exfx.DominanceParams(samples=8, alpha=alpha))(x)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, dense, **TOL)


def test_argmax_equals_dense_when_one_class_dominates() -> None:
    model = _dominant_model()
    x = torch.randn(64, 12)
    gm = exfx.analyse(model, (x,)).compile(NEVER, dominance=exfx.DominanceParams(samples=16, alpha=1e-3))
    with torch.no_grad():
        out, dense = gm(x), model(x)
    kept = _check_contract(out, dense)
    assert torch.equal(out.argmax(-1), dense.argmax(-1))
    assert (dense.argmax(-1) == 7).all()
    assert kept.sum() < 0.2 * kept.numel()  # the dominance is visible: most classes are dropped


def test_flops_follow_the_kept_classes() -> None:
    model = _dominant_model()
    x = torch.randn(32, 12)
    samples, units = 16, 64
    gm = exfx.analyse(model, (x,)).compile(NEVER, dominance=exfx.DominanceParams(samples=samples, alpha=1e-3))
    out, report = run_counting(gm, x)
    head = report.sites["head"]
    kept = int(torch.isfinite(out).sum())
    tested = out.numel()
    expected = tested * (dominance_sample_flops(samples) + DOMINANCE_TEST_FLOPS) + 2 * (units - samples) * kept
    assert head.executed == expected
    assert head.dense == 2 * units * tested
    assert head.pruned == tested - kept
    assert report.dense - report.executed == head.dense - head.executed


def _split(x: torch.Tensor, weight: torch.Tensor, always: tuple[int, ...], first: int,
           pooled: bool) -> tuple[torch.Tensor, ...]:
    """``x`` in sample order and the weight split as the dominance pass stores it."""
    order = torch.tensor(unit_order(x.shape[-1], always))
    xs, ws = x.index_select(-1, order), weight.index_select(1, order)
    f = len(always)
    head = ws[:, :f + first].t().contiguous()
    squares = (ws[:, f:] ** 2).mean(1) if pooled else head[f:] ** 2
    return xs, head, squares, ws[:, f + first:].contiguous()


def test_flops_of_a_schedule_follow_each_checkpoint() -> None:
    torch.manual_seed(1)
    x, weight = torch.randn(5, 32), torch.randn(50, 32)
    xs, head, squares, rest = _split(x, weight, (), 8, pooled=False)
    with FlopCounterMode(display=False) as counter:
        out, tested = dominance_linear(xs, head, squares, rest, None, [8, 24], 0, 0.1, "h")
    kept = int(torch.isfinite(out).sum())
    assert tested[0] == 5 * 50 and tested[-1] == kept and tested[1] <= tested[0]
    expected = (int(tested[0]) * (dominance_sample_flops(8) + DOMINANCE_TEST_FLOPS)
                + int(tested[1]) * (dominance_sample_flops(16) + DOMINANCE_TEST_FLOPS) + 2 * 8 * kept)
    assert counter.get_total_flops() == expected
    _check_contract(out, x @ weight.t())


def test_flops_of_the_pooled_variance() -> None:
    model = _dominant_model()
    x = torch.randn(32, 12)
    samples, units = 16, 64
    params = exfx.DominanceParams(samples=samples, alpha=1e-3, variance="pooled")
    gm = exfx.analyse(model, (x,)).compile(NEVER, dominance=params)
    out, report = run_counting(gm, x)
    kept, tested = int(torch.isfinite(out).sum()), out.numel()
    expected = (tested * (2 * samples + 1 + DOMINANCE_TEST_FLOPS) + 2 * units * x.shape[0]
                + 2 * (units - samples) * kept)
    assert report.sites["head"].executed == expected
    assert dominance_sample_flops(samples, pooled=True) < dominance_sample_flops(samples)
    _check_contract(out, model(x).detach())


def test_softmax_after_the_head_and_concat_blocks() -> None:
    x = torch.randn(10, 12)
    model = SoftmaxHead().eval()
    gm = exfx.analyse(model, (x,)).compile(NEVER, dominance=exfx.DominanceParams(samples=(8, 16), alpha=0.01))
    with torch.no_grad():
        out, probabilities = gm(x), model(x)
    kept = out > 0  # a dropped class has probability exactly 0; the kept ones share all of it
    torch.testing.assert_close(out.sum(-1), torch.ones(10))
    winner_kept = kept.gather(-1, probabilities.argmax(-1, keepdim=True)).squeeze(-1)
    assert winner_kept.any()
    assert torch.equal(out.argmax(-1)[winner_kept], probabilities.argmax(-1)[winner_kept])
    concat = ConcatHead().eval()
    x = torch.randn(10, 10)
    analysis = exfx.analyse(concat, (x,))
    assert match_head(analysis.graph_module, analysis.groups).blocks == (24, 8)
    gm = analysis.compile(NEVER, dominance=exfx.DominanceParams(samples=8, alpha=0.05))
    with torch.no_grad():
        _check_contract(gm(x), concat(x))


@pytest.mark.parametrize("model, inputs, words", [
    (InputHead(), (torch.randn(4, 16),), ("not exchangeable", "model input")),
    (SharedLogits(), (torch.randn(4, 12),), ("not from a linear head",)),
    (FlattenedMapHead(), (torch.randn(2, 3, 4, 4),), ("16 features each", "pool")),
])
def test_refuses_a_head_it_may_not_rewrite(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                                           words: tuple[str, ...]) -> None:
    analysis = exfx.analyse(model.eval(), inputs)
    with pytest.raises(exfx.UnsupportedModelError, match="dominance prediction") as info:
        analysis.compile(NEVER, dominance=exfx.DominanceParams(samples=4))
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("fields, field", [
    ({"samples": 1}, "dominance.samples"), ({"samples": (8, 4)}, "dominance.samples"),
    ({"samples": 0}, "dominance.samples"), ({"alpha": -0.1}, "dominance.alpha"), ({"alpha": 0.7}, "dominance.alpha"),
    ({"alpha": float("nan")}, "dominance.alpha"), ({"alpha": "0.1"}, "dominance.alpha"),
    ({"always_sampled": (1, 1)}, "dominance.always_sampled"), ({"always_sampled": (-2,)}, "dominance.always_sampled"),
    ({"always_sampled": "3"}, "dominance.always_sampled"), ({"variance": "exact"}, "dominance.variance"),
])
def test_bad_flag_values_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        exfx.DominanceParams(**fields)


def test_params_that_do_not_fit_the_head_name_the_field() -> None:
    model, x = HeadMLP().eval(), torch.randn(4, 12)
    analysis = exfx.analyse(model, (x,))
    with pytest.raises(exfx.PlanError, match=r"dominance\.samples"):
        analysis.compile(NEVER, dominance=exfx.DominanceParams(samples=49))
    with pytest.raises(exfx.PlanError, match=r"dominance\.samples"):
        analysis.compile(NEVER, dominance=exfx.DominanceParams(samples=48, always_sampled=(1,)))
    with pytest.raises(exfx.PlanError, match=r"dominance\.always_sampled"):
        analysis.compile(NEVER, dominance=exfx.DominanceParams(samples=8, always_sampled=(48,)))
    with pytest.raises(TypeError, match="DominanceParams"):
        exfx.compile(model, (x,), NEVER, dominance={"samples": 8})


def test_params_round_trip_through_a_dict() -> None:
    params = exfx.DominanceParams(samples=(8, 32), alpha=1e-3, always_sampled=(4, 2), variance="pooled")
    assert exfx.DominanceParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="unknown dominance field"):
        exfx.DominanceParams.from_dict({"samples": 8, "k": 3})


def test_outliers_are_found_from_calibration_data() -> None:
    model = HeadMLP(norm=False).eval()
    with torch.no_grad():
        model.fc.weight[[3, 11]] *= 40.0  # two hidden units of outsized magnitude
    analysis = exfx.analyse(model, (torch.randn(4, 12),))
    head = match_head(analysis.graph_module, analysis.groups)
    rms = head_input_rms(analysis.graph_module, head, [(torch.randn(32, 12),) for _ in range(2)])
    assert rms.shape == (48,)
    assert set(outlier_units(rms, factor=6.0)) == {3, 11}
    assert outlier_units(rms, factor=6.0, limit=1) in ((3,), (11,))
    params = exfx.DominanceParams(samples=8, alpha=0.01, always_sampled=outlier_units(rms))
    x = torch.randn(20, 12)
    with torch.no_grad():
        _check_contract(analysis.compile(NEVER, dominance=params)(x), model(x))


def test_unit_order_puts_always_sampled_first_then_blocks_in_proportion() -> None:
    assert unit_order(5) == [0, 1, 2, 3, 4]
    assert unit_order(6, always_sampled=(4,), blocks=(4, 2)) == [4, 0, 1, 2, 3, 5]
    assert sorted(unit_order(9, always_sampled=(8, 2), blocks=(6, 3))) == list(range(9))


@st.composite
def _heads(draw: st.DrawFn) -> tuple:
    units = draw(st.integers(3, 40))
    classes = draw(st.integers(1, 30))
    rows = draw(st.sampled_from([(1,), (3,), (2, 4)]))
    always = tuple(draw(st.lists(st.integers(0, units - 1), unique=True, max_size=min(3, units - 2))))
    population = units - len(always)
    first = draw(st.integers(2, population))
    samples = (first,) if first == population or draw(st.booleans()) else (
        first, draw(st.integers(first + 1, population)))
    alpha = draw(st.sampled_from([0.0, 1e-6, 0.01, 0.3, 0.5]))
    pooled = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, units, generator=generator)
    weight = torch.randn(classes, units, generator=generator)
    bias = torch.randn(classes, generator=generator) if draw(st.booleans()) else None
    return x, weight, bias, always, samples, alpha, pooled


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_heads())
def test_op_keeps_exact_logits_over_shapes_and_schedules(case: tuple) -> None:
    x, weight, bias, always, samples, alpha, pooled = case
    xs, head, squares, rest = _split(x, weight, always, samples[0], pooled)
    out, tested = dominance_linear(xs, head, squares, rest, bias, list(samples), len(always), alpha, "h")
    dense = F.linear(x, weight, bias)
    _check_contract(out, dense)
    assert tested.shape == (len(samples) + 1,) and int(tested[-1]) == int(torch.isfinite(out).sum())
    if alpha == 0.0 or samples[0] == x.shape[-1] - len(always):  # no test, or only a full sample's exact bounds
        assert torch.equal(out.argmax(-1), dense.argmax(-1))
    if alpha == 0.0:
        assert torch.isfinite(out).all()


def test_nan_inputs_drop_no_class() -> None:
    x, weight = torch.randn(2, 16), torch.randn(30, 16)
    x[0, 3] = math.nan
    xs, head, squares, rest = _split(x, weight, (), 4, pooled=False)
    out, _ = dominance_linear(xs, head, squares, rest, None, [4], 0, 0.4, "h")
    assert torch.isnan(out[0]).all()  # every class kept, and NaN, as in the dense head


def test_op_passes_opcheck() -> None:
    x, weight, bias = torch.randn(3, 16), torch.randn(20, 16), torch.randn(20)
    for pooled in (False, True):
        xs, head, squares, rest = _split(x, weight, (2,), 4, pooled)
        for samples in ([4], [4, 9]):
            torch.library.opcheck(torch.ops.exfx.dominance_linear.default,
                                  (xs, head, squares, rest, bias, samples, 1, 0.1, "h"),
                                  test_utils=("test_schema", "test_faketensor"))
