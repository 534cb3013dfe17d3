"""The native ENP kernels (``exfx.ops.native``): same masks and values as the reference ops, and the fallback.

Oracles are the reference ops chain (``exfx::partial_sum -> early_exit -> complete``)
and plain ``F.linear``. Two kinds of data:

- *dyadic*: small multiples of 1/4 and 1/8, so every partial sum is exactly
  representable and any summation order gives the same bits. Masks and outputs
  must then be bit-identical, ties with the cutoff included;
- *Gaussian*: the realistic case, where the kernels sum in another order than BLAS.
  Masks must agree except for a statistic within rounding of the cutoff.

The extension is built (or loaded from the torch extensions cache) once per session
by the ``native`` fixture; the fallback runs in a subprocess with ``EXFX_NO_NATIVE=1``.
No test asserts speed.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import exfx  # noqa: F401  (registers the reference ops)
from exfx.errors import ExfxError, UnsupportedModelError
from exfx.ops import enp as enp_ops
from exfx.ops import native

OPS = torch.ops.exfx
INF = float("inf")
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def built() -> bool:
    """Build or load the extension once; later calls are a flag check."""
    return native.native_available()


def test_extension_builds_where_a_compiler_exists(built: bool) -> None:
    if os.environ.get(native.NO_NATIVE_ENV) or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler (or native disabled): the fallback is tested below")
    assert built, "the native kernels failed to build although a compiler exists; see the warning"


# ---------------------------------------------------------------------------
# Data and the reference chain
# ---------------------------------------------------------------------------


def dyadic(shape: tuple[int, ...], scale: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randint(-4, 5, shape, generator=g) / scale).to(dtype)


def reference(x, w, b, r, count, n_units, rule, param):
    """The reference ops chain for one checkpoint, as the ENP pass emits it."""
    state = OPS.partial_sum(x, w, None, None, 0, count, n_units, [], [], [], 1, rule == "ztest", "site")
    keep = OPS.early_exit(state, w, b, r, None, count, n_units, rule, param, "site")
    return OPS.complete(x, w, state, b, r, keep, count, n_units, [], [], [], 1, "site"), keep


def statistic(x, w, b, r, count, n_units, rule):
    state = OPS.partial_sum(x, w, None, None, 0, count, n_units, [], [], [], 1, rule == "ztest", "site")
    return enp_ops.exit_statistic(state, w, b, r, count, n_units, rule)


RULE_PARAMS = [("threshold", 0.0), ("threshold", 0.125), ("threshold", -0.1), ("threshold", 0.7),
               ("ztest", 0.05), ("ztest", 0.3), ("ztest", 0.5)]


@st.composite
def enp_cases(draw):
    unit = draw(st.sampled_from([1, 1, 2]))
    n_units = draw(st.sampled_from([1, 2, 7, 8, 37, 64, 129]))
    count = draw(st.integers(1, n_units))
    if draw(st.booleans()):
        count = min(n_units, 32)
    rule, param = draw(st.sampled_from(RULE_PARAMS))
    return {"batch": draw(st.sampled_from([1, 2, 7, 64])), "out": draw(st.sampled_from([1, 5, 33])), "unit": unit,
            "n_units": n_units, "count": count, "rule": rule, "param": param, "bias": draw(st.booleans()),
            "residual": draw(st.sampled_from([None, "row", "full"])), "seed": draw(st.integers(0, 2**31 - 1))}


def make_site(case: dict, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(case["seed"])
    features, out, batch = case["n_units"] * case["unit"], case["out"], case["batch"]
    x, w = dyadic((batch, features), 4, g, dtype), dyadic((out, features), 8, g, dtype)
    b = dyadic((out,), 8, g, dtype) if case["bias"] else None
    r = {None: None, "row": dyadic((out,), 4, g, dtype), "full": dyadic((batch, out), 4, g, dtype)}[case["residual"]]
    return x, w, b, r


# ---------------------------------------------------------------------------
# enp_linear
# ---------------------------------------------------------------------------


@PROPERTY
@given(case=enp_cases())
def test_exact_data_gives_identical_masks_and_values(built: bool, case: dict) -> None:
    """Exactly representable sums: bit-identical to the reference chain and to the fallback."""
    x, w, b, r = make_site(case)
    expected, expected_keep = reference(x, w, b, r, case["count"], case["n_units"], case["rule"], case["param"])
    relaid = native.relayout(w, case["count"], case["n_units"])
    for impl in (native.enp_linear, native.enp_linear_reference):
        pre, keep = impl(x, relaid, b, r, rule=case["rule"], param=case["param"])
        assert torch.equal(keep, expected_keep), impl.__name__
        assert torch.equal(pre, expected), impl.__name__


@pytest.mark.parametrize("features", [37, 129, 2048])
@pytest.mark.parametrize("batch", [1, 2, 7, 64])
@pytest.mark.parametrize("rule,param", [("threshold", -0.01), ("ztest", 0.2)])
def test_gaussian_data_matches_reference(built: bool, features: int, batch: int, rule: str, param: float) -> None:
    """Realistic data: values up to reassociation; masks differ only within rounding of the cutoff."""
    g = torch.Generator().manual_seed(features * 100 + batch)
    out, count = 48, min(32, features)
    x, w = torch.relu(torch.randn(batch, features, generator=g)), torch.randn(out, features, generator=g) * 0.05
    b, r = torch.randn(out, generator=g) * 0.1, torch.randn(batch, out, generator=g) * 0.1
    expected, expected_keep = reference(x, w, b, r, count, features, rule, param)
    pre, keep = native.enp_linear(x, native.relayout(w, count), b, r, rule=rule, param=param)
    stat = statistic(x, w, b, r, count, features, rule)
    near = (stat - enp_ops.cutoff(rule, param)).abs() <= 1e-4 * (stat.abs() + 1)
    assert torch.equal(keep[~near], expected_keep[~near])
    both = keep & expected_keep
    torch.testing.assert_close(pre[both], expected[both], rtol=1e-5, atol=1e-5 * math.sqrt(features))
    assert torch.equal(pre[~keep], torch.zeros_like(pre[~keep]))
    assert 0 < keep.sum() < keep.numel() or batch * out < 10  # the test exercises both branches


@pytest.mark.parametrize("rule", ["threshold", "ztest"])
def test_all_pruned_and_none_pruned(built: bool, rule: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(7, 129, generator=g), torch.randn(20, 129, generator=g), torch.randn(20, generator=g)
    relaid = native.relayout(w, 32)
    everything = 1e30 if rule == "threshold" else 1.0   # a large finite threshold; alpha = 1: Phi^-1 = +inf
    pre, keep = native.enp_linear(x, relaid, b, rule=rule, param=everything)
    assert not keep.any() and torch.equal(pre, torch.zeros(7, 20))
    nothing = -INF if rule == "threshold" else 0.0
    pre, keep = native.enp_linear(x, relaid, b, rule=rule, param=nothing)
    assert keep.all()
    torch.testing.assert_close(pre, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_count_equal_to_fan_in_has_no_tail(built: bool) -> None:
    g = torch.Generator().manual_seed(2)
    w = dyadic((9, 37), 8, g)
    for batch in (1, 3):  # batch 1 takes the kernel's single-row path
        x = dyadic((batch, 37), 4, g)
        expected, expected_keep = reference(x, w, None, None, 37, 37, "threshold", 0.0)
        pre, keep = native.enp_linear(x, native.relayout(w, 37), rule="threshold", param=0.0)
        assert torch.equal(keep, expected_keep) and torch.equal(pre, expected)


def test_non_finite_statistics_never_prune(built: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x, w = dyadic((4, 40), 4, g), dyadic((6, 40), 8, g)
    x[0, 3], x[1, 5], x[2, 30] = float("nan"), INF, -INF  # in the head (0, 1), in the tail (2)
    for rule, param in [("threshold", 10.0), ("ztest", 0.5)]:
        expected, expected_keep = reference(x, w, None, None, 16, 40, rule, param)
        pre, keep = native.enp_linear(x, native.relayout(w, 16), rule=rule, param=param)
        assert torch.equal(keep, expected_keep)
        assert keep[0].all() and keep[1].all()
        torch.testing.assert_close(pre, expected, equal_nan=True)


def test_non_contiguous_and_batched_shapes(built: bool) -> None:
    g = torch.Generator().manual_seed(4)
    base = dyadic((2, 3, 2 * 37), 4, g)
    x = base[..., ::2]                              # strided last axis, 3-D input
    w = dyadic((37, 11), 8, g).t()                  # a transposed weight
    b = dyadic((22,), 8, g)[::2]
    r = dyadic((3, 11), 4, g)                       # broadcast over the leading axis
    expected, expected_keep = reference(x, w, b, r, 9, 37, "ztest", 0.3)
    pre, keep = native.enp_linear(x, native.relayout(w, 9), b, r, rule="ztest", param=0.3)
    assert pre.shape == keep.shape == (2, 3, 11)
    assert torch.equal(keep, expected_keep) and torch.equal(pre, expected)


def test_relu_flag(built: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x, w, b = dyadic((5, 64), 4, g), dyadic((30, 64), 8, g), dyadic((30,), 8, g)
    relaid = native.relayout(w, 8)
    pre, keep = native.enp_linear(x, relaid, b, rule="threshold", param=-0.05)
    fused, fused_keep = native.enp_linear(x, relaid, b, rule="threshold", param=-0.05, relu=True)
    assert torch.equal(fused_keep, keep) and torch.equal(fused, torch.relu(pre))


@PROPERTY
@given(case=enp_cases())
def test_float64_goes_through_the_torch_path(built: bool, case: dict) -> None:
    x, w, b, r = make_site(case, torch.float64)
    expected, expected_keep = reference(x, w, b, r, case["count"], case["n_units"], case["rule"], case["param"])
    pre, keep = native.enp_linear(x, native.relayout(w, case["count"], case["n_units"]), b, r, rule=case["rule"],
                                  param=case["param"])
    assert pre.dtype == torch.float64
    assert torch.equal(keep, expected_keep) and torch.equal(pre, expected)


def test_errors_name_the_problem(built: bool) -> None:
    w = torch.randn(4, 10)
    with pytest.raises(ExfxError, match="count=0"):
        native.relayout(w, 0)
    with pytest.raises(UnsupportedModelError, match="not a multiple of n_units=3"):
        native.relayout(w, 1, 3)
    with pytest.raises(UnsupportedModelError, match="only linear weights"):
        native.relayout(torch.randn(4, 3, 3), 1)
    with pytest.raises(ExfxError, match="unknown rule 'oracle'"):
        native.enp_linear(torch.randn(2, 10), native.relayout(w, 3), rule="oracle")
    with pytest.raises(UnsupportedModelError, match="expects 10 features"):
        native.enp_linear(torch.randn(2, 11), native.relayout(w, 3))
    with pytest.raises(UnsupportedModelError, match="expects 10 features"):
        native.sparse_input_linear(torch.randn(2, 11), torch.randn(10, 4))


# ---------------------------------------------------------------------------
# sparse_input_linear
# ---------------------------------------------------------------------------


@PROPERTY
@given(batch=st.sampled_from([1, 2, 7, 64]), features=st.sampled_from([1, 37, 129, 600]),
       out=st.sampled_from([1, 5, 130, 1100]), zeros=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sparse_input_linear_equals_linear(built: bool, batch: int, features: int, out: int, zeros: float,
                                           bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=g)
    x[torch.rand(batch, features, generator=g) < zeros] = 0.0
    w, b = torch.randn(out, features, generator=g), (torch.randn(out, generator=g) if bias else None)
    w_t = native.transpose_for_sparse_input(w)
    expected = F.linear(x, w, b)
    for impl in (native.sparse_input_linear, native.sparse_input_linear_reference):
        torch.testing.assert_close(impl(x, w_t, b), expected, rtol=1e-5, atol=1e-5 * math.sqrt(features))
    if zeros == 1.0:
        assert torch.equal(native.sparse_input_linear(x, w_t, b), expected)  # only the bias (or 0) survives


def test_sparse_input_linear_shapes_and_float64(built: bool) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.relu(torch.randn(2, 3, 80, generator=g))[..., ::2]   # 3-D, strided
    w, b = torch.randn(17, 40, generator=g), torch.randn(17, generator=g)
    torch.testing.assert_close(native.sparse_input_linear(x, native.transpose_for_sparse_input(w), b),
                               F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xd, wd, bd = x.double(), w.double(), b.double()
    got = native.sparse_input_linear(xd, native.transpose_for_sparse_input(wd), bd)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.linear(xd, wd, bd))


# ---------------------------------------------------------------------------
# The ops themselves: schema and fake implementations
# ---------------------------------------------------------------------------


def test_opcheck(built: bool) -> None:
    g = torch.Generator().manual_seed(8)
    x, w, b, r = torch.randn(3, 40, generator=g), torch.randn(12, 40, generator=g), torch.randn(12), torch.randn(3, 12)
    relaid = native.relayout(w, 10)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(OPS.enp_linear.default, (x, relaid.head, relaid.tail, b, r, 10, 40, "ztest", -0.5, True),
                          test_utils=checks)
    torch.library.opcheck(OPS.sparse_input_linear.default,
                          (torch.relu(x), native.transpose_for_sparse_input(w), b), test_utils=checks)


# ---------------------------------------------------------------------------
# The fallback (no compiler), in a fresh process
# ---------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import sys, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from exfx.ops import native
        from exfx.ops.enp import cutoff
        assert not native.native_available()
        data = torch.load(sys.argv[1])
        x, w, b, r, xs, w2 = data["x"], data["w"], data["b"], data["r"], data["xs"], data["w2"]
        relaid = native.relayout(w, 16)
        results = {}
        for rule, param in [("threshold", 0.0), ("ztest", 0.3)]:
            results[rule] = native.enp_linear(x, relaid, b, r, rule=rule, param=param)
            op = torch.ops.exfx.enp_linear(x, relaid.head, relaid.tail, b, r, 16, 48, rule, cutoff(rule, param))
            assert all(torch.equal(a, c) for a, c in zip(op, results[rule]))
        results["sparse"] = native.sparse_input_linear(xs, native.transpose_for_sparse_input(w2), None)
        native.native_available()
    ours = [w for w in caught if issubclass(w.category, native.NativeUnavailableWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "EXFX_NO_NATIVE" in str(ours[0].message)
    torch.save(results, sys.argv[2])
""")


def test_fallback_without_native_is_identical_and_warns_once(built: bool, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    data = {"x": dyadic((7, 48), 4, g), "w": dyadic((20, 48), 8, g), "b": dyadic((20,), 8, g),
            "r": dyadic((7, 20), 4, g), "xs": torch.relu(dyadic((7, 48), 4, g)), "w2": dyadic((5, 48), 8, g)}
    torch.save(data, tmp_path / "in.pt")
    env = {**os.environ, native.NO_NATIVE_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    relaid = native.relayout(data["w"], 16)
    for rule, param in [("threshold", 0.0), ("ztest", 0.3)]:
        pre, keep = native.enp_linear(data["x"], relaid, data["b"], data["r"], rule=rule, param=param)
        assert torch.equal(keep, results[rule][1]) and torch.equal(pre, results[rule][0])
    sparse = native.sparse_input_linear(data["xs"], native.transpose_for_sparse_input(data["w2"]))
    assert torch.equal(sparse, results["sparse"])
