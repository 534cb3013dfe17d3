"""The ``exfx::`` operators, called directly: partial_sum, early_exit, complete.

Oracles are plain ``F.linear``/``F.conv*d`` and brute-force per-unit loops, never the ops themselves.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import exfx  # noqa: F401  (registers the ops)
from exfx.ops import enp as enp_ops
from helpers import dense_preactivation

OPS = torch.ops.exfx
INF = float("inf")


# ---------------------------------------------------------------------------
# Cases: one per contraction kind. Each gives x, weight, bias, conv geometry and n_units.
# ---------------------------------------------------------------------------


def _case(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    if kind == "linear":
        x, w = torch.randn(5, 40, generator=g), torch.randn(12, 40, generator=g)
        geo = dict(stride=[], padding=[], dilation=[], groups=1)
        return dict(x=x, w=w, b=torch.randn(12, generator=g), n_units=40, fan_in=40, unit=1, **geo)
    if kind == "linear3d":  # (batch, tokens, features), as in a transformer FFN
        x, w = torch.randn(2, 3, 36, generator=g), torch.randn(10, 36, generator=g)
        geo = dict(stride=[], padding=[], dilation=[], groups=1)
        return dict(x=x, w=w, b=torch.randn(10, generator=g), n_units=36, fan_in=36, unit=1, **geo)
    if kind == "flattened":  # 9 channels of 4x4 flattened: 9 units of 16 features
        x, w = torch.randn(3, 9 * 16, generator=g), torch.randn(7, 9 * 16, generator=g)
        geo = dict(stride=[], padding=[], dilation=[], groups=1)
        return dict(x=x, w=w, b=torch.randn(7, generator=g), n_units=9, fan_in=9, unit=16, **geo)
    if kind == "conv1d":
        x, w = torch.randn(2, 20, 11, generator=g), torch.randn(6, 20, 3, generator=g)
        geo = dict(stride=[2], padding=[1], dilation=[1], groups=1)
        return dict(x=x, w=w, b=torch.randn(6, generator=g), n_units=20, fan_in=20, unit=3, **geo)
    if kind == "conv2d":
        x, w = torch.randn(2, 12, 7, 6, generator=g), torch.randn(5, 12, 3, 3, generator=g)
        geo = dict(stride=[1, 2], padding=[1, 0], dilation=[2, 1], groups=1)
        return dict(x=x, w=w, b=torch.randn(5, generator=g), n_units=12, fan_in=12, unit=9, **geo)
    if kind == "grouped":  # 3 groups of 8 input channels, 2 output channels per group
        x, w = torch.randn(2, 24, 6, 6, generator=g), torch.randn(6, 8, 3, 3, generator=g)
        geo = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=3)
        return dict(x=x, w=w, b=torch.randn(6, generator=g), n_units=8, fan_in=8, unit=9, **geo)
    raise AssertionError(kind)


KINDS = ["linear", "linear3d", "flattened", "conv1d", "conv2d", "grouped"]


def _geo(c: dict) -> tuple:
    return c["stride"], c["padding"], c["dilation"], c["groups"]


def _dense(c: dict, bias: bool = True, residual: torch.Tensor | None = None) -> torch.Tensor:
    return dense_preactivation(c["x"], c["w"], c["b"] if bias else None, residual, *_geo(c))


def _partial(c: dict, state, active, start: int, stop: int, moments: bool = False) -> torch.Tensor:
    return OPS.partial_sum(c["x"], c["w"], state, active, start, stop, c["n_units"], *_geo(c), moments, "s")


def _complete(c: dict, state, active, start: int, bias=True, residual=None) -> torch.Tensor:
    return OPS.complete(c["x"], c["w"], state, c["b"] if bias else None, residual, active, start, c["n_units"],
                        *_geo(c), "s")


def _unit_terms(c: dict) -> torch.Tensor:
    """Brute force: the per-unit contribution of every unit to every output neuron, stacked on dim 0."""
    x, w, n = c["x"], c["w"], c["n_units"]
    terms = []
    if w.dim() == 2:
        u = c["unit"]
        for i in range(n):
            terms.append(F.linear(x[..., i * u:(i + 1) * u], w[:, i * u:(i + 1) * u]))
        return torch.stack(terms)
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    stride, padding, dilation, groups = _geo(c)
    per_group_in, per_group_out = x.shape[1] // groups, w.shape[0] // groups
    for i in range(n):  # unit i = the i-th input channel of every group
        outs = []
        for grp in range(groups):
            xi = x[:, grp * per_group_in + i: grp * per_group_in + i + 1]
            wi = w[grp * per_group_out:(grp + 1) * per_group_out, i:i + 1]
            outs.append(conv(xi, wi, None, stride, padding, dilation, 1))
        terms.append(torch.cat(outs, dim=1))
    return torch.stack(terms)


def _all_active(c: dict) -> torch.Tensor:
    return torch.ones_like(_dense(c), dtype=torch.bool)


# ---------------------------------------------------------------------------
# partial_sum + complete
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unit_terms_oracle_sums_to_dense(kind: str) -> None:
    """Sanity check of the brute-force oracle itself."""
    c = _case(kind)
    torch.testing.assert_close(_unit_terms(c).sum(0), _dense(c, bias=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("moments", [False, True])
def test_checkpoints_then_complete_equals_dense(kind: str, moments: bool) -> None:
    c = _case(kind)
    n = c["n_units"]
    checkpoints = sorted({1, n // 3, n // 2, n - 1} - {0})
    state, done = None, 0
    active = _all_active(c)
    for k in checkpoints:
        state = _partial(c, state, None if done == 0 else active, done, k, moments)
        done = k
    assert state.shape == (2 if moments else 1, *_dense(c).shape)
    torch.testing.assert_close(state[0], _unit_terms(c)[:done].sum(0), rtol=1e-5, atol=1e-5)
    out = _complete(c, state, active, done)
    torch.testing.assert_close(out, _dense(c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_complete_with_residual_and_no_bias(kind: str) -> None:
    c = _case(kind)
    residual = torch.randn_like(_dense(c))
    state = _partial(c, None, None, 0, 2)
    out = _complete(c, state, _all_active(c), 2, bias=False, residual=residual)
    torch.testing.assert_close(out, _dense(c, bias=False, residual=residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_complete_after_every_unit_was_sampled(kind: str) -> None:
    """A schedule ending at the fan-in leaves nothing to complete; the result is still exact."""
    c = _case(kind)
    n = c["n_units"]
    state = _partial(c, None, None, 0, n)
    torch.testing.assert_close(_complete(c, state, _all_active(c), n), _dense(c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_complete_zeroes_exactly_the_inactive_neurons(kind: str) -> None:
    c = _case(kind)
    state = _partial(c, None, None, 0, 2)
    active = torch.rand(_dense(c).shape) < 0.5
    out = _complete(c, state, active, 2)
    assert torch.equal(out[~active], torch.zeros(int((~active).sum())))
    torch.testing.assert_close(out[active], _dense(c)[active], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sum_of_squares_moment_matches_brute_force(kind: str) -> None:
    c = _case(kind)
    terms = _unit_terms(c)
    n = c["n_units"]
    lo, hi = 1, max(2, n // 2)
    state = _partial(c, None, None, 0, lo, moments=True)
    state = _partial(c, state, None, lo, hi, moments=True)
    torch.testing.assert_close(state[0], terms[:hi].sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[1], (terms[:hi] ** 2).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["conv2d", "grouped", "conv1d"])
def test_conv_moment_is_the_sum_of_squared_channel_terms(kind: str) -> None:
    """The second moment is, by definition, sum over input channels of (that channel's conv term) ** 2."""
    c = _case(kind)
    conv = torch.nn.functional.conv1d if c["w"].dim() == 3 else torch.nn.functional.conv2d
    expected = torch.zeros(())
    for channel in range(c["x"].shape[1]):
        only = torch.zeros_like(c["x"])
        only[:, channel] = c["x"][:, channel]
        term = conv(only, c["w"], None, c["stride"], c["padding"], c["dilation"], c["groups"])
        expected = expected + term * term
    moment = _partial(c, None, None, 0, c["n_units"], moments=True)[1]
    torch.testing.assert_close(moment, expected, rtol=1e-5, atol=1e-4)


def test_partial_sum_does_not_alias_or_mutate_state() -> None:
    c = _case("linear")
    state = _partial(c, None, None, 0, 4)
    before = state.clone()
    new = _partial(c, state, None, 4, 8)
    assert torch.equal(state, before)
    assert new.data_ptr() != state.data_ptr()


def test_flattened_linear_rejects_features_not_a_multiple_of_units() -> None:
    c = _case("flattened")
    with pytest.raises(RuntimeError, match="not a multiple"):
        OPS.partial_sum(c["x"], c["w"], None, None, 0, 2, 10, [], [], [], 1, False, "s")


def test_fan_in_and_terms_per_unit() -> None:
    assert enp_ops.fan_in_of(_case("flattened")["x"], _case("flattened")["w"], 9) == 9
    assert enp_ops.terms_per_unit(_case("flattened")["x"], _case("flattened")["w"], 9) == 16
    assert enp_ops.fan_in_of(_case("grouped")["x"], _case("grouped")["w"], 8) == 8
    assert enp_ops.terms_per_unit(_case("grouped")["x"], _case("grouped")["w"], 8) == 9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ops_keep_the_input_dtype(dtype: torch.dtype) -> None:
    c = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in _case("conv2d").items()}
    state = _partial(c, None, None, 0, 3, moments=True)
    assert state.dtype == dtype
    active = OPS.early_exit(state, c["w"], c["b"], None, None, 3, c["fan_in"], "ztest", 0.2, "s")
    out = _complete(c, state, active, 3)
    assert out.dtype == dtype


# ---------------------------------------------------------------------------
# early_exit: the decision rules
# ---------------------------------------------------------------------------


def _exit(state, *, w=None, b=None, residual=None, active=None, count, fan_in, rule="threshold", param=0.0):
    w = torch.zeros(state.shape[-1], 3) if w is None else w  # a linear weight: bias lies on the last axis
    return OPS.early_exit(state, w, b, residual, active, count, fan_in, rule, param, "s")


def test_threshold_minus_inf_never_prunes() -> None:
    state = torch.tensor([[[-1e30, -5.0, 0.0, 3.0, -INF]]])
    keep = _exit(state, count=4, fan_in=8, param=-INF)
    assert keep.dtype == torch.bool and keep.shape == (1, 5)
    assert bool(keep.all())


def test_threshold_zero_prunes_iff_estimated_mean_negative() -> None:
    partial = torch.tensor([[-4.0, -1.0, 0.0, 1.0, 2.0, -2.0]])
    bias = torch.tensor([8.0, 2.0, 0.0, -3.0, -4.0, 4.0])  # spread over fan-in 8
    # mean = S/4 + b/8 -> [0.0, -0.0, 0.0, -0.125, 0.0, 0.0]
    keep = _exit(partial[None], b=bias, count=4, fan_in=8)
    mean = partial / 4 + bias / 8
    assert torch.equal(keep, ~(mean < 0))
    assert keep.tolist() == [[True, True, True, False, True, True]]


@pytest.mark.parametrize("threshold", [-3.0, -0.5, 0.0, 0.7])
def test_threshold_rule_uses_mean_term_with_bias_and_residual(threshold: float) -> None:
    g = torch.Generator().manual_seed(3)
    partial, bias, residual = torch.randn(1, 4, 6, generator=g) * 5, torch.randn(6, generator=g), torch.randn(
        4, 6, generator=g)
    keep = _exit(partial, b=bias, residual=residual, count=5, fan_in=20, param=threshold)
    mean = partial[0] / 5 + (bias + residual) / 20
    assert torch.equal(keep, mean >= threshold)


def test_threshold_rule_conv_bias_is_per_channel() -> None:
    g = torch.Generator().manual_seed(4)
    state = torch.randn(1, 2, 3, 4, 4, generator=g)
    w, bias = torch.zeros(3, 5, 3, 3), torch.tensor([10.0, -10.0, 0.0])
    keep = _exit(state, w=w, b=bias, count=2, fan_in=5)
    mean = state[0] / 2 + bias.reshape(3, 1, 1) / 5
    assert torch.equal(keep, mean >= 0)


def test_active_mask_is_sticky() -> None:
    state = torch.full((1, 2, 3), 5.0)
    active = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(_exit(state, active=active, count=2, fan_in=4, param=-INF), active)


def _ztest_oracle(terms: torch.Tensor, shift: torch.Tensor, fan_in: int, alpha: float) -> torch.Tensor:
    """Keep mask from the textbook one-sided z-test on the shifted terms t_i + shift/n (terms on dim 0)."""
    k = terms.shape[0]
    scaled = terms.double() + shift.double() / fan_in
    mean = scaled.mean(0)
    var = scaled.var(0, unbiased=True)  # a constant shift leaves the sample variance unchanged
    z = mean / torch.sqrt(var / k)
    crit = statistics.NormalDist().inv_cdf(alpha) if alpha > 0 else -math.inf
    return ~(z < crit)


def _moment_state(terms: torch.Tensor) -> torch.Tensor:
    return torch.stack([terms.sum(0), (terms * terms).sum(0)])


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2, 0.5])
def test_ztest_matches_textbook_sample_variance_with_bias_and_residual(alpha: float) -> None:
    g = torch.Generator().manual_seed(5)
    k, fan_in = 16, 64
    terms = torch.randn(k, 8, 50, generator=g) * 0.5 + torch.linspace(-0.6, 0.6, 50)  # (k, batch, neurons)
    bias = torch.randn(50, generator=g) * 3
    residual = torch.randn(8, 50, generator=g) * 3
    keep = _exit(_moment_state(terms), b=bias, residual=residual, count=k, fan_in=fan_in, rule="ztest",
                 param=alpha)
    expected = _ztest_oracle(terms, bias + residual, fan_in, alpha)
    assert torch.equal(keep, expected)
    assert 0 < int((~keep).sum()) < keep.numel()  # the case is not trivial


def test_ztest_variance_is_shift_invariant_not_raw_second_moment() -> None:
    """The published code mixed the raw second moment with the shifted mean; exfx must not.

    Terms vary slightly around -1 and a residual makes the mean slightly negative: the correct sample
    variance is tiny, so the z-test is confident and prunes. Mixing the raw second moment (about 1) with
    the shifted mean (about 0) would give a variance near 1 and keep the neuron.
    """
    k, fan_in = 8, 8
    terms = -1.0 + 0.01 * torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0])[:, None, None]
    residual = torch.tensor([[7.9]])  # mean = -1 + 7.9/8 = -0.0125
    keep = _exit(_moment_state(terms), residual=residual, count=k, fan_in=fan_in, rule="ztest", param=0.05)
    assert keep.flatten().tolist() == [False]
    assert torch.equal(keep, _ztest_oracle(terms, residual, fan_in, 0.05))


def test_ztest_alpha_zero_never_prunes() -> None:
    g = torch.Generator().manual_seed(6)
    terms = torch.randn(10, 4, 30, generator=g) - 3.0
    keep = _exit(_moment_state(terms), count=10, fan_in=40, rule="ztest", param=0.0)
    assert bool(keep.all())
    # Zero variance and a negative mean give z = -inf, which alpha = 0 still never prunes.
    flat = torch.full((10, 1, 3), -2.0)
    assert bool(_exit(_moment_state(flat), count=10, fan_in=40, rule="ztest", param=0.0).all())


def test_ztest_alpha_half_equals_threshold_zero_when_variance_positive() -> None:
    g = torch.Generator().manual_seed(8)
    terms = torch.randn(12, 6, 40, generator=g) + torch.linspace(-1, 1, 40)
    bias = torch.randn(40, generator=g)
    state = _moment_state(terms)
    z = _exit(state, b=bias, count=12, fan_in=48, rule="ztest", param=0.5)
    t = _exit(state[:1], b=bias, count=12, fan_in=48, rule="threshold", param=0.0)
    assert torch.equal(z, t)
    assert enp_ops.z_critical(0.5) == 0.0
    assert enp_ops.z_critical(0.0) == -math.inf


def test_z_critical_matches_normal_quantile() -> None:
    for alpha in (0.001, 0.05, 0.3, 0.5):
        assert enp_ops.z_critical(alpha) == pytest.approx(statistics.NormalDist().inv_cdf(alpha), abs=1e-12)


def test_ztest_needs_moments() -> None:
    with pytest.raises(RuntimeError, match="moments"):
        _exit(torch.zeros(1, 2, 3), count=4, fan_in=8, rule="ztest", param=0.1)


def test_unknown_rule_raises() -> None:
    with pytest.raises(ValueError, match="unknown rule"):
        _exit(torch.zeros(1, 2, 3), count=4, fan_in=8, rule="bogus", param=0.1)


@pytest.mark.parametrize("rule,param", [("threshold", 0.0), ("threshold", 5.0), ("ztest", 0.5)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_statistics_never_prune(rule: str, param: float, bad: float) -> None:
    terms = torch.full((6, 1, 4), -3.0)
    terms[2, 0, 1] = bad
    state = _moment_state(terms)
    if rule == "threshold":
        state = state[:1]
    keep = _exit(state, count=6, fan_in=12, rule=rule, param=param)
    assert keep[0, 1].item() is True  # the non-finite neuron is kept
    assert not bool(keep[0, [0, 2, 3]].any())  # the finite, clearly negative ones are pruned


def test_non_finite_bias_never_prunes() -> None:
    state = torch.full((1, 1, 3), -3.0)
    keep = _exit(state, b=torch.tensor([0.0, -INF, math.nan]), count=2, fan_in=4)
    assert keep.tolist() == [[False, True, True]]


@pytest.mark.parametrize("rule,param", [("threshold", 0.0), ("ztest", 0.5)])
def test_nan_in_sampled_units_propagates_through_complete(rule: str, param: float) -> None:
    c = _case("linear")
    c["x"] = c["x"].clone()
    c["x"][1, 0] = math.nan  # first unit of row 1: inside the sample
    moments = rule == "ztest"
    state = _partial(c, None, None, 0, 8, moments)
    keep = OPS.early_exit(state, c["w"], c["b"], None, None, 8, 40, rule, param, "s")
    assert bool(keep[1].all()), "a NaN statistic must never prune"
    out = _complete(c, state, keep, 8)
    assert bool(torch.isnan(out[1]).all())
    assert not bool(torch.isnan(out[[0, 2, 3, 4]]).any())


# ---------------------------------------------------------------------------
# Fake implementations and opcheck
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("moments", [False, True])
def test_fake_impls_give_real_shapes(kind: str, moments: bool) -> None:
    c = _case(kind)
    real_state = _partial(c, None, None, 0, 3, moments)
    rule, param = ("ztest", 0.3) if moments else ("threshold", 0.0)
    real_active = OPS.early_exit(real_state, c["w"], c["b"], None, None, 3, c["fan_in"], rule, param, "s")
    real_out = _complete(c, real_state, real_active, 3)
    with FakeTensorMode() as mode:
        x, w, b = (mode.from_tensor(t) for t in (c["x"], c["w"], c["b"]))
        state = OPS.partial_sum(x, w, None, None, 0, 3, c["n_units"], *_geo(c), moments, "s")
        state2 = OPS.partial_sum(x, w, state, None, 3, 5, c["n_units"], *_geo(c), moments, "s")
        active = OPS.early_exit(state2, w, b, None, None, 5, c["fan_in"], rule, param, "s")
        out = OPS.complete(x, w, state2, b, None, active, 5, c["n_units"], *_geo(c), "s")
    assert state.shape == state2.shape == real_state.shape and state.dtype == real_state.dtype
    assert active.shape == real_active.shape and active.dtype == torch.bool
    assert out.shape == real_out.shape and out.dtype == real_out.dtype


def _opcheck_samples(kind: str) -> list:
    c = _case(kind)
    state = _partial(c, None, None, 0, 2, True)
    active = OPS.early_exit(state, c["w"], c["b"], None, None, 2, c["fan_in"], "ztest", 0.4, "s")
    residual = torch.randn_like(_dense(c))
    geo = _geo(c)
    return [
        (OPS.partial_sum.default, (c["x"], c["w"], None, None, 0, 2, c["n_units"], *geo, True, "s")),
        (OPS.partial_sum.default, (c["x"], c["w"], state, active, 2, 4, c["n_units"], *geo, True, "s")),
        (OPS.early_exit.default, (state, c["w"], c["b"], residual, None, 2, c["fan_in"], "ztest", 0.4, "s")),
        (OPS.early_exit.default, (state, c["w"], None, None, active, 2, c["fan_in"], "threshold", 0.0, "s")),
        (OPS.complete.default, (c["x"], c["w"], state, c["b"], residual, active, 2, c["n_units"], *geo, "s")),
    ]


@pytest.mark.parametrize("kind", ["linear", "flattened", "conv1d", "grouped"])
def test_opcheck(kind: str) -> None:
    for op, args in _opcheck_samples(kind):
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), (op, results)


def test_float64_statistics_are_not_rounded_to_float32() -> None:
    """A float64 model's test runs in float64: 1 - 1e-12 - 1 < 0 although float32 rounds it to 0."""
    state = torch.tensor([[[1.0 - 1e-12]]], dtype=torch.float64)
    residual = torch.tensor([[-1.0]], dtype=torch.float64)
    w = torch.zeros(1, 1, dtype=torch.float64)
    keep = OPS.early_exit(state, w, None, residual, None, 1, 1, "threshold", 0.0, "s")
    assert keep.tolist() == [[False]]
