"""The cost model: dense and executed FLOPs of every exfx op and producer, in one place.

Every place that prices a site asks this module: the ``FlopCounterMode``
formulas (:mod:`exfx.cost.flops`), calibration's offline pricing of candidate
plans (:mod:`exfx.tune.pricing`) and the oracle bound
(:mod:`exfx.tune.evaluation`). Lowering and structured pruning will price with
it too. Op arguments are read by name from the op's schema
(:func:`op_arguments`), never by position.

Convention: **2 FLOPs per multiply-add**, as ``FlopCounterMode`` counts
``mm``/``conv``; element-wise work (bias adds, ReLU) is not counted, as
``FlopCounterMode`` does not count it for the dense model. Per output neuron of a
site with fan-in ``n`` units of ``t`` multiply-adds each:

- dense: ``2 n t``;
- ``partial_sum`` over ``[a, b)``: ``2 (b - a) t``, plus ``MOMENT_FLOPS_PER_TERM (b - a)``
  under the z-test (the second moment), per *active* neuron;
- ``early_exit``: ``THRESHOLD_TEST_FLOPS`` or ``ZTEST_TEST_FLOPS`` per tested neuron;
- ``complete`` from unit ``a``: ``2 (n - a) t`` per *kept* neuron.

Example::

    >>> cost = SiteCost(fan_in=256, unit_flops=2 * 9)          # a 3x3 conv over 256 channels
    >>> cost.dense
    4608
    >>> cost.expected((16, 32), "threshold", active=(1.0, 0.6, 0.4))   # 60% survive k=16, 40% survive k=32
    2080.0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx.operator_schemas import normalize_function

from exfx.ops.enp import fan_in_of, terms_per_unit

logger = logging.getLogger(__name__)

__all__ = ["THRESHOLD_TEST_FLOPS", "ZTEST_TEST_FLOPS", "MOMENT_FLOPS_PER_TERM", "FLOPS_PER_MULTIPLY_ADD",
           "SiteCost", "site_cost", "test_flops", "op_arguments"]

#: The convention of ``FlopCounterMode`` for matmuls and convs.
FLOPS_PER_MULTIPLY_ADD = 2
#: FLOPs charged per tested neuron by the threshold rule: scale the partial sum, add the spread shift, compare.
THRESHOLD_TEST_FLOPS = 4
#: FLOPs charged per tested neuron by the z-test: mean, variance from the two moments, standard error (sqrt),
#: ratio, compare.
ZTEST_TEST_FLOPS = 12
#: FLOPs per sampled term for the second moment (square and accumulate), charged only under the z-test.
MOMENT_FLOPS_PER_TERM = 2


def test_flops(rule: str) -> int:
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
            flops += fraction * test_flops(rule)
            done = k
        return flops + active[-1] * (self.fan_in - done) * self.unit_flops


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
