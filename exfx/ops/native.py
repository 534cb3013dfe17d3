"""Native CPU kernels that really skip the work early negative prediction saves, with an exact torch fallback.

The reference ops (:mod:`exfx.ops.enp`) compute densely and mask afterwards: they
are exact FLOP simulations, but slower than dense. This module provides two ops
for linear sites, in C++ (``exfx/csrc/enp_cpu.cpp``, built with
``torch.utils.cpp_extension.load`` on first use and cached under the torch
extensions directory):

- ``torch.ops.exfx.enp_linear``: ``relu(x @ W.T + b + r)`` with one early-exit
  checkpoint. For every (sample, output neuron) it sums the first ``count`` units,
  runs the threshold or z-test, and finishes the sum only for kept neurons. The
  weight is relaid once (:func:`relayout`) into a contiguous head block (the first
  ``count`` units of every row) and a tail block, so a pruned neuron reads only its
  head. Returns the pre-activation (exactly 0 where pruned; optionally ReLU'd) and
  the keep mask.
- ``torch.ops.exfx.sparse_input_linear``: ``x @ W.T + b`` for an ``x`` that is a
  ReLU output, reading only the rows of ``w_t = W.T`` (:func:`transpose_for_sparse_input`)
  whose input unit is non-zero.

Why this is exact: the early-exit statistic is computed with the same float
operations, in the same order, as :func:`exfx.ops.enp.exit_statistic`, compared
with the same float-rounded :func:`exfx.ops.enp.cutoff`, and non-finite statistics
never prune. Only the partial sums are added in a different order than the
reference's BLAS call, so kept neurons equal the reference up to float
reassociation and the masks are identical except for a statistic within rounding
of its cutoff (bit-identical whenever the sums are exactly representable). A
skipped input unit of ``sparse_input_linear`` is exactly 0, so it contributes
exactly 0 to every output (for finite weights).

When the extension cannot be built (no compiler, no ninja) or ``EXFX_NO_NATIVE=1``
is set, one :class:`NativeUnavailableWarning` is issued per process and the same
ops are registered with pure-torch implementations
(:func:`enp_linear_reference`, :func:`sparse_input_linear_reference`) that give the
same masks and values. Single checkpoint only: multi-checkpoint schedules still
use the reference ops.

Example::

    >>> w = relayout(fc1.weight, count=32)
    >>> pre, keep = enp_linear(x, w, fc1.bias, rule="threshold", param=-0.002, relu=True)
    >>> y = sparse_input_linear(pre, transpose_for_sparse_input(fc2.weight), fc2.bias)
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from exfx.config import RULES
from exfx.errors import ExfxError, UnsupportedModelError
from exfx.ops.enp import bias_and_residual, cutoff, exit_statistic

logger = logging.getLogger(__name__)

__all__ = [
    "NO_NATIVE_ENV",
    "SOURCE",
    "NativeUnavailableWarning",
    "RelaidWeight",
    "relayout",
    "transpose_for_sparse_input",
    "enp_linear",
    "sparse_input_linear",
    "enp_linear_reference",
    "sparse_input_linear_reference",
    "native_available",
]

#: Set to ``1`` to skip the build and use the pure-torch fallback (as on a machine without a compiler).
NO_NATIVE_ENV = "EXFX_NO_NATIVE"
#: The C++ source, shipped as package data.
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "enp_cpu.cpp"

_ENP_SCHEMA = ("enp_linear(Tensor x, Tensor head, Tensor tail, Tensor? bias, Tensor? residual, int count, "
               "int n_units, str rule, float cutoff, bool relu=False, Tensor? weight=None, int max_rows=-1) "
               "-> (Tensor, Tensor)")
_SPARSE_SCHEMA = ("sparse_input_linear(Tensor x, Tensor w_t, Tensor? bias, int max_rows=-1, Tensor? weight=None) "
                  "-> Tensor")


class NativeUnavailableWarning(UserWarning):
    """The native kernels could not be built or were disabled; exfx uses the exact pure-torch fallback."""


class RelaidWeight(NamedTuple):
    """A linear weight split for one early-exit checkpoint (see :func:`relayout`).

    ``head`` is ``[out, count * unit]`` (the sampled units), ``tail`` the rest;
    both contiguous.
    """

    head: Tensor
    tail: Tensor
    count: int
    n_units: int


# ---------------------------------------------------------------------------
# Weight preparation (once, at compile time)
# ---------------------------------------------------------------------------

#: Weights derived at compile time (relaid, transposed), kept while some compiled module holds them, so that
#: compiling the same model again (Dynamo's prefill and decode graphs, a recompile) does not copy them again.
_DERIVED: weakref.WeakValueDictionary[tuple[Any, ...], Tensor] = weakref.WeakValueDictionary()
_PROBES: dict[tuple[Any, ...], Tensor] = {}


def _probe(weight: Tensor) -> Tensor:
    """A few of ``weight``'s values (64 evenly spaced): a check that a cached derivation is of this very data."""
    flat = weight.reshape(-1)
    return flat[:: max(1, flat.numel() // 64)][:64].clone()


def _derived(kind: str, weight: Tensor, split: int, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, or the copy an earlier call made from the same weight data (same memory, shape, version and
    values), while it is alive."""
    key = (kind, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight._version, split)
    cached = _DERIVED.get(key)
    if cached is not None and torch.equal(_PROBES.get(key, torch.empty(0)), _probe(weight)):
        return cached
    value = make()
    _DERIVED[key] = value
    _PROBES[key] = _probe(weight)
    weakref.finalize(value, _PROBES.pop, key, None)
    return value


def relayout(weight: Tensor, count: int, n_units: int | None = None) -> RelaidWeight:
    """Split a ``[out, features]`` linear weight into contiguous head and tail blocks at unit ``count``.

    ``n_units`` is the site's fan-in in units (default: ``features``, one feature per unit).
    """
    if weight.dim() != 2:
        raise UnsupportedModelError(f"relayout: the weight has shape {tuple(weight.shape)}; only linear weights "
                                    f"[out, features] can be relaid (convolution sites use the reference ops)")
    features = weight.shape[1]
    units = features if n_units is None else n_units
    if units < 1 or features % units:
        raise UnsupportedModelError(f"relayout: {features} features are not a multiple of n_units={units}; pass "
                                    f"the site's unit count")
    if not 1 <= count <= units:
        raise ExfxError(f"relayout: count={count} must be in [1, {units}] (the sampled units of the checkpoint)")
    split = count * (features // units)
    weight = weight.detach()
    return RelaidWeight(_derived("head", weight, split, lambda: weight[:, :split].contiguous()),
                        _derived("tail", weight, split, lambda: weight[:, split:].contiguous()), count, units)


def transpose_for_sparse_input(weight: Tensor) -> Tensor:
    """``W.T`` as a contiguous ``[in, out]`` tensor: one row per input unit, the layout that lets zeros be skipped."""
    if weight.dim() != 2:
        raise UnsupportedModelError(f"transpose_for_sparse_input: the weight has shape {tuple(weight.shape)}; "
                                    f"only linear weights [out, in] are supported")
    weight = weight.detach()
    return _derived("transposed", weight, 0, lambda: weight.t().contiguous())


# ---------------------------------------------------------------------------
# Pure-torch implementations (the fallback; also float64 and non-CPU tensors)
# ---------------------------------------------------------------------------


def _head_state(x_head: Tensor, head: Tensor, count: int, moments: bool) -> Tensor:
    """The partial-sum state of :func:`exfx.ops.enp.partial_sum` over the head block."""
    total = F.linear(x_head, head)
    if not moments:
        return total.unsqueeze(0)
    unit = x_head.shape[-1] // count
    if unit == 1:
        square = F.linear(x_head * x_head, head * head)
    else:
        terms = torch.einsum("...mu,jmu->...jm", x_head.reshape(*x_head.shape[:-1], count, unit),
                             head.reshape(head.shape[0], count, unit))
        square = (terms * terms).sum(-1)
    return torch.stack([total, square])


def rows_of(x: Tensor) -> int:
    """The rows a linear op runs over: every axis of ``x`` but the last (features)."""
    return x.numel() // x.shape[-1] if x.dim() >= 1 and x.shape[-1] else 0


def runs_dense(x: Tensor, max_rows: int) -> bool:
    """Whether ``enp_linear`` runs a call on ``x`` densely: it has more rows than the site's crossover."""
    return max_rows >= 0 and rows_of(x) > max_rows


def dense_site(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
               relu: bool) -> tuple[Tensor, Tensor]:
    """The unpruned site, ``F.linear(x, W, b) + residual`` (then ReLU), with every neuron kept."""
    pre = F.linear(x, weight, bias)
    pre = pre if residual is None else pre + residual
    pre = torch.relu(pre) if relu else pre
    return pre, torch.ones(pre.shape, dtype=torch.bool, device=pre.device)


def _enp_linear_torch(x: Tensor, head: Tensor, tail: Tensor, bias: Tensor | None, residual: Tensor | None,
                      count: int, n_units: int, rule: str, cutoff_value: float,
                      relu: bool = False, weight: Tensor | None = None, max_rows: int = -1) -> tuple[Tensor, Tensor]:
    """The fallback kernel: the op's schema, computed with torch ops; the tail only for rows some sample keeps."""
    if runs_dense(x, max_rows):
        if weight is None:
            raise ExfxError(f"enp_linear: max_rows={max_rows} needs the dense weight")
        return dense_site(x, weight, bias, residual, relu)
    split = head.shape[1]
    state = _head_state(x[..., :split], head, count, rule == "ztest")
    statistic = exit_statistic(state, head, bias, residual, count, n_units, rule)
    keep = ~(statistic < cutoff_value)
    total = state[0]
    rows = keep.reshape(-1, keep.shape[-1]).any(0).nonzero().squeeze(1)
    if tail.shape[1] > 0 and rows.numel() > 0:
        kept_tail = tail if rows.numel() == tail.shape[0] else tail.index_select(0, rows)
        rest = F.linear(x[..., split:], kept_tail)
        total = rest + total if rows.numel() == tail.shape[0] else total.index_add(-1, rows, rest)
    shift = bias_and_residual(state, head, bias, residual)
    if shift is not None:
        total = total + shift
    out = torch.where(keep, total, torch.zeros((), dtype=total.dtype, device=total.device))
    return (torch.relu(out) if relu else out), keep


def _sparse_input_linear_torch(x: Tensor, w_t: Tensor, bias: Tensor | None, max_rows: int = -1,
                               weight: Tensor | None = None) -> Tensor:
    """The fallback kernel: a matmul over the input units that are non-zero in some row (dense past max_rows)."""
    if runs_dense(x, max_rows):
        return F.linear(x, w_t.t() if weight is None else weight, bias)
    flat = x.reshape(-1, w_t.shape[0])
    units = (flat != 0).any(0).nonzero().squeeze(1)
    out = flat.new_zeros(flat.shape[0], w_t.shape[1]) if bias is None else bias.expand(flat.shape[0], -1).clone()
    if units.numel() > 0:
        out = torch.addmm(out, flat.index_select(1, units), w_t.index_select(0, units))
    return out.reshape(*x.shape[:-1], w_t.shape[1])


def _check_linear(x: Tensor, features: int, tensors: dict[str, Tensor | None], op: str) -> None:
    if x.dim() < 1 or x.shape[-1] != features:
        raise UnsupportedModelError(f"{op}: the input has shape {tuple(x.shape)} but the weight expects {features} "
                                    f"features on the last axis; pass inputs shaped like the layer's")
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.dtype != x.dtype or tensor.device != x.device):
            raise UnsupportedModelError(f"{op}: {name} is {tensor.dtype} on {tensor.device} but the input is "
                                        f"{x.dtype} on {x.device}; cast them to one dtype and device")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ExfxError(f"enp_linear: unknown rule {rule!r}; expected one of {RULES}")


def enp_linear_reference(x: Tensor, weight: RelaidWeight, bias: Tensor | None = None,
                         residual: Tensor | None = None, *, rule: str = "threshold", param: float = 0.0,
                         relu: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`enp_linear` in pure torch (any dtype and device); same masks and values."""
    _check_rule(rule)
    _check_linear(x, weight.head.shape[1] + weight.tail.shape[1],
                  {"head": weight.head, "tail": weight.tail, "bias": bias, "residual": residual}, "enp_linear")
    return _enp_linear_torch(x, weight.head, weight.tail, bias, residual, weight.count, weight.n_units, rule,
                             cutoff(rule, param), relu)


def sparse_input_linear_reference(x: Tensor, w_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`sparse_input_linear` in pure torch (any dtype and device)."""
    _check_linear(x, w_t.shape[0], {"w_t": w_t, "bias": bias}, "sparse_input_linear")
    return _sparse_input_linear_torch(x, w_t, bias)


# ---------------------------------------------------------------------------
# Building and registering (once per process)
# ---------------------------------------------------------------------------


class _State:
    lock = threading.Lock()
    native: bool | None = None  # None: not tried yet
    warned = False
    fallback_library: torch.library.Library | None = None


def _build_options() -> tuple[str, list[str], list[str]]:
    """Extension name (one per instruction set, so caches never mix) and compiler / linker flags."""
    # No -ffast-math: the early-exit test relies on isfinite. No FMA contraction of the statistic.
    cflags = ["-O3", "-ffp-contract=off"]
    ldflags: list[str] = []
    tag = "default"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        tag = "avx2"
        cflags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        cflags += ["-DCPU_CAPABILITY=DEFAULT"]
    if torch._C.has_openmp:  # at::parallel_for is inlined: without -fopenmp it would run serially
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return f"exfx_enp_cpu_{tag}", cflags, ldflags


def _build() -> None:
    """Compile (or load from the cache) the extension; its static initialisers register the ops."""
    from torch.utils.cpp_extension import load

    name, cflags, ldflags = _build_options()
    start = time.perf_counter()
    built = _built_library(name)
    if not built:  # a first build takes seconds: say so, instead of a silent pause
        logger.warning("exfx: building the native CPU kernels %s (first use on this machine, about 15-30 s; "
                       "later runs load them from %s)", name, _build_directory(name))
    load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags, is_python_module=False,
         verbose=False)
    seconds = time.perf_counter() - start
    log = logger.warning if not built or seconds > 2.0 else logger.info  # a (re)build: say what the wait was
    log("exfx: native kernels %s ready in %.1f s", name, seconds)


def _build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _built_library(name: str) -> bool:
    """Whether an earlier run left this extension built, so loading it takes a moment, not a compile.

    (A changed source still rebuilds; this only decides whether to announce the wait.)"""
    try:
        return any(_build_directory(name).glob(f"{name}*.so"))
    except (OSError, RuntimeError):
        return False


def _register_fake() -> None:
    """Shape-only implementations, so graphs holding these ops trace, export and compile."""

    @torch.library.register_fake("exfx::enp_linear")
    def _enp_fake(x, head, tail, bias, residual, count, n_units, rule, cutoff, relu=False, weight=None,
                  max_rows=-1):
        shape = (*x.shape[:-1], head.shape[0])
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.bool)

    @torch.library.register_fake("exfx::sparse_input_linear")
    def _sparse_fake(x, w_t, bias, max_rows=-1, weight=None):
        return x.new_empty((*x.shape[:-1], w_t.shape[1]))


def _register_fallback() -> None:
    """Define the two ops with the pure-torch kernels, so graphs using them run without the extension."""
    library = torch.library.Library("exfx", "FRAGMENT")
    library.define(_ENP_SCHEMA)
    library.define(_SPARSE_SCHEMA)
    library.impl("enp_linear", _enp_linear_torch, "CompositeExplicitAutograd")
    library.impl("sparse_input_linear", _sparse_input_linear_torch, "CompositeExplicitAutograd")
    _State.fallback_library = library


def _warn_once(reason: str) -> None:
    if _State.warned:
        return
    _State.warned = True
    warnings.warn(f"exfx: native ENP kernels unavailable ({reason}); using the exact pure-torch fallback, which is "
                  f"slower. Install a C++ compiler and ninja (pip install ninja) to build them.",
                  NativeUnavailableWarning, stacklevel=3)


def native_available() -> bool:
    """Whether the C++ kernels are loaded; builds them on the first call (tens of seconds, then cached).

    After this call ``torch.ops.exfx.enp_linear`` and ``torch.ops.exfx.sparse_input_linear``
    exist either way: native, or backed by the pure-torch fallback.
    """
    with _State.lock:
        if _State.native is None:
            reason = None
            if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
                reason = f"{NO_NATIVE_ENV} is set"
            else:
                try:
                    _build()
                except Exception as error:  # no compiler, no ninja, a compile error: all mean "fall back"
                    reason = f"build failed: {type(error).__name__}: {str(error).strip().splitlines()[-1:]}"
                    logger.debug("exfx native build failed", exc_info=True)
            if reason is not None:
                _register_fallback()
                _warn_once(reason)
            _register_fake()
            _State.native = reason is None
        return _State.native


def _native_ok(*tensors: Tensor | None) -> bool:
    """Native kernels take float32 CPU tensors; anything else goes to the torch implementation."""
    return native_available() and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu")
                                      for t in tensors)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def enp_linear(x: Tensor, weight: RelaidWeight, bias: Tensor | None = None, residual: Tensor | None = None, *,
               rule: str = "threshold", param: float = 0.0, relu: bool = False) -> tuple[Tensor, Tensor]:
    """Early-exit linear site ``x @ W.T + bias + residual`` with one checkpoint at ``weight.count`` units.

    Args:
        x: ``[..., features]``.
        weight: the site's weight, prepared by :func:`relayout`.
        bias: ``[out]`` or None. residual: broadcastable to ``[..., out]`` or None.
        rule, param: as in :func:`exfx.ops.enp.early_exit` (threshold ``T`` or z-test ``alpha``).
        relu: apply the site's ReLU in the kernel.

    Returns:
        ``(pre, keep)``: the pre-activation (exactly 0 where pruned; ReLU'd if ``relu``)
        and the boolean mask of kept neurons, both ``[..., out]``.
    """
    _check_rule(rule)
    if not _native_ok(x, weight.head, weight.tail, bias, residual):
        return enp_linear_reference(x, weight, bias, residual, rule=rule, param=param, relu=relu)
    _check_linear(x, weight.head.shape[1] + weight.tail.shape[1], {}, "enp_linear")
    return torch.ops.exfx.enp_linear(x, weight.head, weight.tail, bias, residual, weight.count, weight.n_units,
                                     rule, cutoff(rule, param), relu)


def sparse_input_linear(x: Tensor, w_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ w_t + bias`` (``= F.linear(x, W, bias)`` for ``w_t = W.T``), skipping input units that are 0.

    Args:
        x: ``[..., in]``, typically a ReLU output.
        w_t: ``[in, out]``, from :func:`transpose_for_sparse_input`.
        bias: ``[out]`` or None.
    """
    if not _native_ok(x, w_t, bias):
        return sparse_input_linear_reference(x, w_t, bias)
    _check_linear(x, w_t.shape[0], {}, "sparse_input_linear")
    return torch.ops.exfx.sparse_input_linear(x, w_t, bias)
