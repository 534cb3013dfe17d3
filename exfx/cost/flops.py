"""Executed versus dense FLOPs, counted through ``torch.utils.flop_counter``.

Convention: **2 FLOPs per multiply-add**, the same as ``FlopCounterMode`` uses for
``mm``/``conv``. Element-wise work (bias adds, ReLU) is not counted, exactly as
``FlopCounterMode`` does not count it for the dense model.

The ``exfx::`` ops get FLOP formulas that follow the actual masks, priced by
:mod:`exfx.cost.model` (sampled units per *active* neuron, one test per tested
neuron, the rest of the fan-in per *kept* neuron). A neuron's dense cost is
``2 * n * t`` for ``n`` units of ``t`` multiply-adds. The dense figure of a
compiled module is its executed FLOPs with every site replaced by its dense cost,
so the two figures differ only by what early exit saved and what the tests cost.

The native kernels of a lowered module (``exfx::enp_linear``,
``exfx::sparse_input_linear``) get formulas too, registered by
:func:`register_native_flop_formulas` once those ops exist (the lowering pass
calls it; :func:`run_counting` calls it when the ops are defined). An
``enp_linear`` site is counted exactly like the reference chain it replaced (same
masks, same figures). The savings of a sparse-input consumer are real executed
work, but they are not early negative prediction: they are kept apart in
:attr:`FlopReport.consumers`, and :attr:`FlopReport.enp_reduction` gives ENP's
share alone (the paper's figure).

The dominance op of a prediction head (``exfx::dominance_linear``,
:mod:`exfx.ops.dominance`) is priced the same way, from the counts it returns: sampled
terms and their second moments and one test per tested (row, class) at each
checkpoint, the rest of the units per kept one; the head appears in ``.sites``.

The per-site figures are gathered in a :class:`contextvars.ContextVar`, so
counting in one thread never mixes with another's.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from exfx import ops  # noqa: F401  (the exfx:: ops must exist before their formulas are registered)
from exfx.capture.common import mha_fastpath_disabled
from exfx.cost.model import (FLOPS_PER_MULTIPLY_ADD, SiteCost, block_norm_flops, exact_exit_flops, exit_test_flops,
                             op_arguments, site_cost, sparse_input_flops, weight_label)
from exfx.ops.exact import block_count
from exfx.ops.native import runs_dense
from exfx.cost.model import DOMINANCE_TEST_FLOPS, dominance_sample_flops

logger = logging.getLogger(__name__)

__all__ = ["SiteFlops", "FlopReport", "count_flops", "run_counting", "FLOP_CONVENTION", "leading_size", "per_examples",
           "register_native_flop_formulas"]

FLOP_CONVENTION = "2 FLOPs per multiply-add; element-wise ops not counted; exfx test overhead included"


@dataclass
class SiteFlops:
    """FLOPs and neuron counts of one ENP site for one call."""

    name: str
    executed: int = 0
    dense: int = 0
    neurons: int = 0
    pruned: int = 0

    @property
    def pruned_fraction(self) -> float:
        return self.pruned / self.neurons if self.neurons else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "executed": self.executed, "dense": self.dense, "neurons": self.neurons,
                "pruned": self.pruned, "pruned_fraction": self.pruned_fraction}


@dataclass
class FlopReport:
    """The result of :func:`count_flops`."""

    dense: int
    executed: int
    sites: dict[str, SiteFlops] = field(default_factory=dict)
    convention: str = FLOP_CONVENTION
    #: ``relu -> F.linear`` consumers lowered to ``exfx::sparse_input_linear`` (empty unless lowered natively).
    consumers: dict[str, SiteFlops] = field(default_factory=dict)
    #: The examples the counted call ran on (the first tensor input's leading size), or None if unknown.
    examples: int | None = None

    @property
    def per(self) -> str:
        """What the totals are for (:func:`per_examples`)."""
        return per_examples(self.examples)

    @property
    def reduction(self) -> float:
        """Fraction of dense FLOPs saved (negative if the tests cost more than they save)."""
        return 1.0 - self.executed / self.dense if self.dense else 0.0

    @property
    def enp_reduction(self) -> float:
        """Fraction of dense FLOPs saved by early negative prediction alone (sparse-input savings excluded)."""
        if not self.dense:
            return 0.0
        consumer_savings = sum(c.dense - c.executed for c in self.consumers.values())
        return 1.0 - (self.executed + consumer_savings) / self.dense

    def to_dict(self) -> dict[str, Any]:
        data = {"dense": self.dense, "executed": self.executed, "examples": self.examples, "reduction": self.reduction,
                "convention": self.convention, "sites": {k: v.to_dict() for k, v in self.sites.items()}}
        if self.consumers:
            data["enp_reduction"] = self.enp_reduction
            data["consumers"] = {k: v.to_dict() for k, v in self.consumers.items()}
        return data

    def __str__(self) -> str:
        lines = [f"dense {self.dense:,} FLOPs, executed {self.executed:,} FLOPs {self.per} "
                 f"({100 * self.reduction:.2f}% saved; {self.convention})"]
        for site in self.sites.values():
            lines.append(f"  {site.name:<30} executed {site.executed:>14,}  dense {site.dense:>14,}  "
                         f"pruned {100 * site.pruned_fraction:6.2f}%")
        for site in self.consumers.values():
            lines.append(f"  {site.name:<30} executed {site.executed:>14,}  dense {site.dense:>14,}  "
                         f"zero inputs skipped (sparse-input consumer, not ENP)")
        return "\n".join(lines)


_SITES: contextvars.ContextVar[dict[str, SiteFlops] | None] = contextvars.ContextVar("exfx_site_flops",
                                                                                        default=None)
_CONSUMERS: contextvars.ContextVar[dict[str, SiteFlops] | None] = contextvars.ContextVar("exfx_consumer_flops",
                                                                                            default=None)


@contextlib.contextmanager
def _accounting(table: contextvars.ContextVar[dict[str, SiteFlops] | None]) -> Iterator[dict[str, SiteFlops]]:
    """Collect per-site figures in a fresh dict for the duration of the block (this context only)."""
    figures: dict[str, SiteFlops] = {}
    token = table.set(figures)
    try:
        yield figures
    finally:
        table.reset(token)


def _record(site: str, *, table: contextvars.ContextVar[dict[str, SiteFlops] | None] = _SITES,
            **amounts: int) -> None:
    sites = table.get()
    if sites is None:
        return
    entry = sites.setdefault(site, SiteFlops(site))
    for key, value in amounts.items():
        setattr(entry, key, getattr(entry, key) + int(value))


def _count_active(active: Tensor | None, shape: torch.Size) -> int:
    if active is None:
        return int(torch.Size(shape).numel())
    return int(active.sum())


@register_flop_formula(torch.ops.exfx.partial_sum, get_raw=True)
def _partial_sum_flops(*args: Any, out_val: Tensor, **kwargs: Any) -> int:
    a = op_arguments(torch.ops.exfx.partial_sum, args, kwargs)
    cost = site_cost(a["x"], a["weight"], a["n_units"])
    rule = "ztest" if a["moments"] else "threshold"
    flops = cost.sampled(a["stop"] - a["start"], rule) * _count_active(a["active"], out_val.shape[1:])
    _record(a["site"], executed=flops)
    return flops


@register_flop_formula(torch.ops.exfx.early_exit, get_raw=True)
def _early_exit_flops(*args: Any, out_val: Tensor, **kwargs: Any) -> int:
    a = op_arguments(torch.ops.exfx.early_exit, args, kwargs)
    flops = exit_test_flops(a["rule"]) * _count_active(a["active"], out_val.shape)
    _record(a["site"], executed=flops)
    return flops


@register_flop_formula(torch.ops.exfx.exact_exit, get_raw=True)
def _exact_exit_flops(*args: Any, out_val: Tensor, **kwargs: Any) -> int:
    a = op_arguments(torch.ops.exfx.exact_exit, args, kwargs)
    blocks = block_count(a["block_starts"], a["count"])
    positions = out_val[0, 0].numel() if out_val.dim() > 2 else 1
    norms = block_norm_flops(a["x"], a["weight"], a["n_units"], a["count"], blocks, positions)
    flops = exact_exit_flops(_count_active(a["active"], out_val.shape), blocks, norms)
    _record(a["site"], executed=flops)
    return flops


@register_flop_formula(torch.ops.exfx.complete, get_raw=True)
def _complete_flops(*args: Any, out_val: Tensor, **kwargs: Any) -> int:
    a = op_arguments(torch.ops.exfx.complete, args, kwargs)
    cost = site_cost(a["x"], a["weight"], a["n_units"])
    neurons = out_val.numel()
    kept = int(a["active"].sum())
    flops = cost.completion(a["start"]) * kept
    _record(a["site"], executed=flops, dense=cost.dense * neurons, neurons=neurons, pruned=neurons - kept)
    return flops


def _enp_linear_flops(*args: Any, out_val: tuple[Tensor, Tensor], **kwargs: Any) -> int:
    """``exfx::enp_linear``: the head of every neuron, one test each, the tail of the kept ones."""
    a = op_arguments(torch.ops.exfx.enp_linear, args, kwargs)
    features = a["head"].shape[1] + a["tail"].shape[1]
    cost = SiteCost(fan_in=a["n_units"], unit_flops=FLOPS_PER_MULTIPLY_ADD * (features // a["n_units"]))
    keep = out_val[1]
    neurons, kept = keep.numel(), int(keep.sum())
    site = weight_label(a["head"]) or f"enp_linear[{a['head'].shape[0]}x{features}]"
    if runs_dense(a["x"], a["max_rows"]):  # past the site's crossover the call ran dense: counted as dense
        _record(site, executed=cost.dense * neurons, dense=cost.dense * neurons, neurons=neurons, pruned=0)
        return cost.dense * neurons
    flops = (cost.sampled(a["count"], a["rule"]) + exit_test_flops(a["rule"])) * neurons
    flops += cost.completion(a["count"]) * kept
    _record(site, executed=flops, dense=cost.dense * neurons, neurons=neurons, pruned=neurons - kept)
    return flops


def _sparse_input_linear_flops(*args: Any, out_val: Tensor, **kwargs: Any) -> int:
    """``exfx::sparse_input_linear``: every non-zero input entry times every output."""
    a = op_arguments(torch.ops.exfx.sparse_input_linear, args, kwargs)
    x, w_t = a["x"], a["w_t"]
    nonzero = x.numel() if runs_dense(x, a["max_rows"]) else int((x != 0).sum())  # past the crossover: dense
    flops = sparse_input_flops(nonzero, w_t.shape[1])
    site = weight_label(w_t) or f"sparse_input_linear[{w_t.shape[1]}x{w_t.shape[0]}]"
    neurons = x.numel()
    _record(site, table=_CONSUMERS, executed=flops, dense=sparse_input_flops(neurons, w_t.shape[1]),
            neurons=neurons, pruned=neurons - nonzero)
    return flops


@register_flop_formula(torch.ops.exfx.dominance_linear, get_raw=True)
def _dominance_linear_flops(*args: Any, out_val: tuple[Tensor, Tensor], **kwargs: Any) -> int:
    """``exfx::dominance_linear``: the exact units for every class; per checkpoint, the sampled terms (and second
    moments) and the test of each tested (row, class); the remaining units of each kept one."""
    a = op_arguments(torch.ops.exfx.dominance_linear, args, kwargs)
    x, classes, exact = a["x"], a["head"].shape[1], a["exact_units"]
    units = x.shape[-1]
    rows = x.numel() // max(1, units)
    pooled = a["squares"].dim() == 1
    tested = [int(v) for v in out_val[1].tolist()]
    test = DOMINANCE_TEST_FLOPS if a["alpha"] > 0 else 0
    flops = FLOPS_PER_MULTIPLY_ADD * exact * rows * classes
    if pooled:  # the rows' mean squared input over the sampled units
        flops += FLOPS_PER_MULTIPLY_ADD * (units - exact) * rows
    done = 0
    for count, pairs in zip(a["samples"], tested):
        flops += (dominance_sample_flops(count - done, pooled) + test) * pairs
        done = count
    flops += FLOPS_PER_MULTIPLY_ADD * (units - exact - done) * tested[-1]
    neurons = rows * classes
    _record(a["site"], executed=flops, dense=FLOPS_PER_MULTIPLY_ADD * units * neurons, neurons=neurons,
            pruned=neurons - tested[-1])
    return flops


class _NativeFormulas:
    registered = False


def register_native_flop_formulas() -> bool:
    """Register the formulas of the native ops if they are defined (idempotent); whether they are registered."""
    if _NativeFormulas.registered:
        return True
    try:
        enp, sparse = torch.ops.exfx.enp_linear, torch.ops.exfx.sparse_input_linear
    except (AttributeError, RuntimeError):  # not built or loaded in this process: nothing can call them
        return False
    register_flop_formula(enp, get_raw=True)(_enp_linear_flops)
    register_flop_formula(sparse, get_raw=True)(_sparse_input_linear_flops)
    _NativeFormulas.registered = True
    return True


def run_counting(module: torch.nn.Module, *inputs: Any, **kwargs: Any) -> tuple[Any, FlopReport]:
    """Run ``module(*inputs, **kwargs)`` once; return its output and a :class:`FlopReport`.

    The run takes ``nn.MultiheadAttention``'s slow path (the fast path is switched
    off for it, and restored after): under ``no_grad`` the fast path's fused ops
    are invisible to ``FlopCounterMode``, and the slow path computes the same
    function, so the count is what a run with grad enabled counts.
    """
    register_native_flop_formulas()
    with (mha_fastpath_disabled(), torch.no_grad(), _accounting(_SITES) as sites,
          _accounting(_CONSUMERS) as consumers, FlopCounterMode(display=False) as counter):
        output = module(*inputs, **kwargs)
    executed = int(counter.get_total_flops())
    dense = executed + sum(s.dense - s.executed for s in sites.values())
    dense += sum(c.dense - c.executed for c in consumers.values())
    return output, FlopReport(dense=dense, executed=executed, sites=dict(sites), consumers=dict(consumers),
                              examples=leading_size(inputs, kwargs))


def per_examples(examples: int | None) -> str:
    """What a FLOP total counted on ``examples`` examples is for: ``per example``, ``per batch of N``, or
    ``per call`` when the batch is unknown."""
    if examples is None:
        return "per call"
    return "per example" if examples == 1 else f"per batch of {examples}"


def leading_size(inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int | None:
    """The leading (batch) size of the first tensor among the inputs with at least one axis, or None."""
    for value in (*inputs, *(kwargs or {}).values()):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def count_flops(module: torch.nn.Module, *inputs: Any, **kwargs: Any) -> FlopReport:
    """Run ``module(*inputs, **kwargs)`` once and count executed and dense FLOPs.

    Works on any module; for an exfx-compiled one, ``.sites`` holds per-site
    figures and ``.executed`` follows the actual early-exit masks.

    Example::

        >>> gm = exfx.compile(model, (x,))
        >>> report = exfx.count_flops(gm, x)
        >>> report.executed < report.dense
        True
    """
    return run_counting(module, *inputs, **kwargs)[1]
