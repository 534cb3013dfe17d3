"""The cost model: dense and executed FLOPs of every exfx op and producer, in one place.

Every place that prices a site asks this module: the ``FlopCounterMode``
formulas (:mod:`exfx.cost.flops`), calibration's offline pricing of candidate
plans (:mod:`exfx.tune.pricing`) and the oracle bound
(:mod:`exfx.tune.evaluation`), and the lowering pass's choice of kernel
(:class:`LatencyModel`). Op arguments are read by name from the op's schema
(:func:`op_arguments`), never by position.

Latency: FLOPs do not say which kernel is faster on a given machine (a masked
reference op does every multiply-add of dense and then some; a native kernel
saves memory traffic that FLOPs do not see). :class:`LatencyModel` therefore
*measures* the candidate kernels of a site at its shapes and compile-time batch
size, interleaved, and caches the medians per machine (torch version, CPU,
instruction set, thread count) in ``timings.json`` under :func:`cache_dir`
(``$EXFX_CACHE_DIR``, else ``~/.cache/exfx``). ``EXFX_FORCE_LOWERING=native`` or
``=dense`` (or ``LatencyModel(force=...)``) skips timing and forces the choice,
for deterministic tests.

Convention: **2 FLOPs per multiply-add**, as ``FlopCounterMode`` counts
``mm``/``conv``; element-wise work (bias adds, ReLU) is not counted, as
``FlopCounterMode`` does not count it for the dense model. Per output neuron of a
site with fan-in ``n`` units of ``t`` multiply-adds each:

- dense: ``2 n t``;
- ``partial_sum`` over ``[a, b)``: ``2 (b - a) t``, plus ``MOMENT_FLOPS_PER_TERM (b - a)``
  under the z-test (the second moment), per *active* neuron;
- ``early_exit``: ``THRESHOLD_TEST_FLOPS`` or ``ZTEST_TEST_FLOPS`` per tested neuron;
- ``complete`` from unit ``a``: ``2 (n - a) t`` per *kept* neuron;
- ``exact_exit`` at unit ``k`` with ``B`` bound blocks left: the block norms of the
  input, once per call and shared by every output neuron (a square and an add per input
  element of the unsampled units; per block, for a conv, a window sum over the kernel at
  each output position; a square root each), then ``2 B + EXACT_TEST_FLOPS`` per
  *tested* neuron (the bound's multiply-adds, adding it and the shift, the compare).
  This is decision overhead, like the statistical tests.

Example::

    >>> cost = SiteCost(fan_in=256, unit_flops=2 * 9)          # a 3x3 conv over 256 channels
    >>> cost.dense
    4608
    >>> cost.expected((16, 32), "threshold", active=(1.0, 0.6, 0.4))   # 60% survive k=16, 40% survive k=32
    2080.0
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx.operator_schemas import normalize_function

from exfx.ops.enp import fan_in_of, terms_per_unit

logger = logging.getLogger(__name__)

__all__ = ["THRESHOLD_TEST_FLOPS", "ZTEST_TEST_FLOPS", "MOMENT_FLOPS_PER_TERM", "FLOPS_PER_MULTIPLY_ADD",
           "EXACT_TEST_FLOPS", "exact_exit_flops", "block_norm_flops", "DOMINANCE_TEST_FLOPS",
           "dominance_sample_flops",
           "SiteCost", "site_cost", "exit_test_flops", "op_arguments", "sparse_input_flops",
           "CACHE_DIR_ENV", "FORCE_LOWERING_ENV", "WIN_MARGIN", "cache_dir", "machine_key", "TimingCache",
           "time_interleaved",
           "Choice", "LatencyModel", "label_weight", "weight_label"]

#: The convention of ``FlopCounterMode`` for matmuls and convs.
FLOPS_PER_MULTIPLY_ADD = 2
#: FLOPs charged per tested neuron by the threshold rule: scale the partial sum, add the spread shift, compare.
THRESHOLD_TEST_FLOPS = 4
#: FLOPs charged per tested neuron by the z-test: mean, variance from the two moments, standard error (sqrt),
#: ratio, compare.
ZTEST_TEST_FLOPS = 12
#: FLOPs per sampled term for the second moment (square and accumulate), charged only under the z-test.
MOMENT_FLOPS_PER_TERM = 2
#: FLOPs charged per tested neuron by the exact rule besides the bound's multiply-adds: add the shift and the
#: bound, compare with the margin.
EXACT_TEST_FLOPS = 3
#: FLOPs per tested class of a dominance test (``exfx::dominance_linear``): scale the partial sum and add the exact
#: part and bias, the variance from the two moments, the standard error with its finite-population correction
#: (sqrt), both bounds, the row's best lower bound and the comparison.
DOMINANCE_TEST_FLOPS = 16


def dominance_sample_flops(units: int, pooled: bool = False) -> int:
    """FLOPs per tested class of ``units`` more sampled head units: the term and its second moment (the squared
    weights are stored, so each is one multiply-add), or, for the pooled variance, the term and one multiply
    (the class's mean squared weight times the row's mean squared input)."""
    if pooled:
        return FLOPS_PER_MULTIPLY_ADD * units + 1
    return (FLOPS_PER_MULTIPLY_ADD + MOMENT_FLOPS_PER_TERM) * units


def exit_test_flops(rule: str) -> int:
    """FLOPs of one early-exit test of one neuron under ``rule``."""
    return ZTEST_TEST_FLOPS if rule == "ztest" else THRESHOLD_TEST_FLOPS


@dataclass(frozen=True)
class SiteCost:
    """Per-neuron FLOPs of one site: ``fan_in`` units, each adding ``unit_flops`` FLOPs to a neuron."""

    fan_in: int
    unit_flops: int

    @property
    def dense(self) -> int:
        """FLOPs of one neuron computed densely."""
        return self.fan_in * self.unit_flops

    def sampled(self, units: int, rule: str) -> int:
        """FLOPs of ``units`` more sampled units of one active neuron (``partial_sum``)."""
        moments = MOMENT_FLOPS_PER_TERM * units if rule == "ztest" else 0
        return units * self.unit_flops + moments

    def completion(self, start: int) -> int:
        """FLOPs of finishing one kept neuron from unit ``start`` (``complete``)."""
        return (self.fan_in - start) * self.unit_flops

    def expected(self, schedule: Sequence[int], rule: str, active: Sequence[float]) -> float:
        """Expected executed FLOPs of one neuron under an early-exit schedule.

        ``active[i]`` is the fraction of neurons still active before checkpoint
        ``i`` (``active[0]`` is 1 for a fresh site) and ``active[-1]`` the fraction
        kept after the last test, so ``len(active) == len(schedule) + 1``.
        """
        if len(active) != len(schedule) + 1:
            raise ValueError(f"active needs one fraction per checkpoint and one after the last: "
                             f"{len(schedule) + 1}, got {len(active)}")
        # Term by term, in this order, so that calibration's prices stay bit-identical across releases.
        flops, done = 0.0, 0
        for k, fraction in zip(schedule, active):
            flops += fraction * (k - done) * self.unit_flops
            if rule == "ztest":
                flops += fraction * (k - done) * MOMENT_FLOPS_PER_TERM
            flops += fraction * exit_test_flops(rule)
            done = k
        return flops + active[-1] * (self.fan_in - done) * self.unit_flops


def block_norm_flops(x: Tensor, weight: Tensor, n_units: int, count: int, blocks: int, out_positions: int) -> int:
    """FLOPs of the input-side norms of the exact rule's bound over the unsampled units ``[count, n)`` of ``x``:
    a square and an add per input element of those units, then per block a square root per row (linear) or,
    for a conv, a window sum over the kernel (``2 K``) and a square root at each of the ``out_positions``
    output positions (per sample and group). Shared by every output neuron."""
    if blocks == 0:
        return 0
    fan_in = fan_in_of(x, weight, n_units)
    per_unit = terms_per_unit(x, weight, n_units)
    if weight.dim() == 2:
        rows = x.numel() // max(1, x.shape[-1])
        return rows * (2 * (fan_in - count) * per_unit + blocks)
    groups = x.shape[1] // fan_in
    spatial = x[0, 0].numel()
    windows = blocks * out_positions * (FLOPS_PER_MULTIPLY_ADD * per_unit + 1)
    return x.shape[0] * groups * (2 * (fan_in - count) * spatial + windows)


def exact_exit_flops(tested: int, blocks: int, norms: int) -> int:
    """FLOPs of one ``exact_exit`` call: the input-side block norms (:func:`block_norm_flops`), then the bound
    (``blocks`` multiply-adds) and the test of each of ``tested`` neurons."""
    return norms + tested * (FLOPS_PER_MULTIPLY_ADD * blocks + EXACT_TEST_FLOPS)


def site_cost(x: Tensor, weight: Tensor, n_units: int) -> SiteCost:
    """The cost of a site from its producer's input, weight and unit count (real or fake tensors)."""
    return SiteCost(fan_in=fan_in_of(x, weight, n_units),
                    unit_flops=FLOPS_PER_MULTIPLY_ADD * terms_per_unit(x, weight, n_units))


def op_arguments(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket, args: Sequence[Any],
                 kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The arguments of a call of ``op``, keyed by their names in its schema (defaults filled in)."""
    overload = op.default if isinstance(op, torch._ops.OpOverloadPacket) else op
    normalised = normalize_function(overload, tuple(args), dict(kwargs or {}), normalize_to_only_use_kwargs=True)
    if normalised is None:
        raise TypeError(f"the arguments of {overload} do not match its schema {overload._schema}")
    return dict(normalised.kwargs)


def sparse_input_flops(nonzero_inputs: int, out_features: int) -> int:
    """FLOPs of a linear layer that reads only its ``nonzero_inputs`` non-zero (sample, input unit) entries."""
    return FLOPS_PER_MULTIPLY_ADD * nonzero_inputs * out_features


# ---------------------------------------------------------------------------
# Which site a prepared weight belongs to (for FLOP records of ops without a site argument)
# ---------------------------------------------------------------------------

_LABELS: dict[int, tuple[weakref.ref[Tensor], str]] = {}


def label_weight(weight: Tensor, name: str) -> None:
    """Remember that ``weight`` (a relaid or transposed copy made at compile time) prices site ``name``."""
    key = id(weight)
    _LABELS[key] = (weakref.ref(weight, lambda _ref, key=key: _LABELS.pop(key, None)), name)


def weight_label(weight: Tensor) -> str | None:
    """The name :func:`label_weight` gave this very tensor object, or None."""
    entry = _LABELS.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else None


# ---------------------------------------------------------------------------
# Latency: measured kernel timings, cached per machine
# ---------------------------------------------------------------------------

#: Directory of the timing cache (default ``~/.cache/exfx``).
CACHE_DIR_ENV = "EXFX_CACHE_DIR"
#: ``native`` or ``dense``: skip timing and force that choice wherever it is possible.
FORCE_LOWERING_ENV = "EXFX_FORCE_LOWERING"
#: A candidate replaces the baseline only when its median is below this fraction of the baseline's:
#: timings on a shared machine are noisy, and "never slower than dense" is the contract.
WIN_MARGIN = 0.95
_TIMINGS_FILE = "timings.json"
_FORMAT = 1


def cache_dir() -> Path:
    """Where exfx caches per-machine data: ``$EXFX_CACHE_DIR``, else ``~/.cache/exfx``."""
    configured = os.environ.get(CACHE_DIR_ENV, "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "exfx"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a timing depends on besides the shapes: torch version, CPU, instruction set, intra-op threads."""
    return (f"torch={torch.__version__}|cpu={_cpu_name()}|isa={torch.backends.cpu.get_cpu_capability()}"
            f"|threads={torch.get_num_threads()}")


class TimingCache:
    """Kernel timings (milliseconds) in a JSON file, keyed by machine, kernel, shapes and batch.

    Unreadable or unwritable files are logged and ignored: a cache miss only costs a measurement.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / _TIMINGS_FILE

    def load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("timings"), dict):
            return {}
        return {str(k): float(v) for k, v in data["timings"].items() if isinstance(v, (int, float))}

    def get(self, key: str) -> float | None:
        return self.load().get(key)

    def put(self, entries: Mapping[str, float]) -> None:
        """Merge ``entries`` into the file (written to a temporary file, then renamed: never half-written)."""
        timings = self.load()
        timings.update(entries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as handle:
                json.dump({"format": _FORMAT, "timings": timings}, handle, indent=0, sort_keys=True)
            os.replace(handle.name, self.path)
        except OSError as error:
            logger.debug("exfx: cannot write the timing cache %s (%s); timings are not kept", self.path, error)


@dataclass(frozen=True)
class Choice:
    """The form :meth:`LatencyModel.choose` picked, the median milliseconds per form, and how it decided."""

    form: str
    timings: tuple[tuple[str, float], ...] = ()
    forced: bool = False

    def ms(self, form: str) -> float | None:
        return dict(self.timings).get(form)


class LatencyModel:
    """Pick the fastest of a few candidate kernels for one site, by measuring them (or reading the cache).

    Args:
        cache: where medians are kept; None for the default file, ``False`` for no cache.
        repeats: timed calls per candidate, interleaved (after one warm-up call each).
        force: skip timing: a candidate's name picks it, the baseline's name picks the baseline, any other
            name (``"native"``) the first non-baseline candidate; default ``$EXFX_FORCE_LOWERING``.
        margin: see :data:`WIN_MARGIN`.

    Example::

        >>> latency = LatencyModel(cache=False, repeats=3)
        >>> latency.choose("linear 2048->8192 rows=1 keep=0.50", {"dense": dense_fn, "native": native_fn}).form
        'native'
    """

    def __init__(self, cache: TimingCache | bool | None = None, *, repeats: int = 5, force: str | None = None,
                 margin: float = WIN_MARGIN) -> None:
        self.cache = TimingCache() if cache is None or cache is True else (cache or None)
        self.repeats = max(1, int(repeats))
        self.force = force if force is not None else (os.environ.get(FORCE_LOWERING_ENV, "") or None)
        self.margin = margin

    def measure(self, key: str, candidates: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        """Median milliseconds per candidate for the problem ``key`` on this machine (cached)."""
        keys = {form: f"{machine_key()}|{key}|{form}" for form in candidates}
        cached = self.cache.load() if self.cache is not None else {}
        if all(k in cached for k in keys.values()):
            return {form: cached[k] for form, k in keys.items()}
        medians = time_interleaved(candidates, self.repeats)
        if self.cache is not None:
            self.cache.put({keys[form]: ms for form, ms in medians.items()})
        return medians

    def time(self, candidates: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        """Median milliseconds per candidate, measured now (never cached): for whole models, whose timings no key
        describes."""
        return time_interleaved(candidates, self.repeats)

    def choose(self, key: str, candidates: Mapping[str, Callable[[], object]], baseline: str = "dense") -> Choice:
        """The fastest candidate, unless it does not beat ``baseline`` by :attr:`margin` (then ``baseline``)."""
        if baseline not in candidates:
            raise ValueError(f"the baseline {baseline!r} must be one of the candidates {sorted(candidates)}")
        if self.force is not None:  # the named candidate; any other name but the baseline means "not dense"
            others = [form for form in candidates if form != baseline]
            forced = self.force if self.force in candidates else (
                others[0] if others and self.force != baseline else baseline)
            return Choice(forced, forced=True)
        timings = self.measure(key, candidates)
        best = min((form for form in candidates if form != baseline), key=lambda f: timings[f], default=baseline)
        chosen = best if timings[best] <= self.margin * timings[baseline] else baseline
        return Choice(chosen, tuple((form, timings[form]) for form in candidates))


def time_interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """One warm-up call each, then ``repeats`` rounds calling every candidate once: median ms per candidate."""
    samples: dict[str, list[float]] = {form: [] for form in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            fn()
        for _ in range(repeats):
            for form, fn in candidates.items():
                start = time.perf_counter()
                fn()
                samples[form].append(1e3 * (time.perf_counter() - start))
    return {form: statistics.median(values) for form, values in samples.items()}
