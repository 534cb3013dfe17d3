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
from exfx.cost.model import op_arguments, site_cost, test_flops

logger = logging.getLogger(__name__)

__all__ = ["SiteFlops", "FlopReport", "count_flops", "run_counting", "FLOP_CONVENTION"]

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

    @property
    def reduction(self) -> float:
        """Fraction of dense FLOPs saved (negative if the tests cost more than they save)."""
        return 1.0 - self.executed / self.dense if self.dense else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense, "executed": self.executed, "reduction": self.reduction,
                "convention": self.convention, "sites": {k: v.to_dict() for k, v in self.sites.items()}}

    def __str__(self) -> str:
        lines = [f"dense {self.dense:,} FLOPs, executed {self.executed:,} FLOPs "
                 f"({100 * self.reduction:.2f}% saved; {self.convention})"]
        for site in self.sites.values():
            lines.append(f"  {site.name:<30} executed {site.executed:>14,}  dense {site.dense:>14,}  "
                         f"pruned {100 * site.pruned_fraction:6.2f}%")
        return "\n".join(lines)


_SITES: contextvars.ContextVar[dict[str, SiteFlops] | None] = contextvars.ContextVar("exfx_site_flops",
                                                                                        default=None)


@contextlib.contextmanager
def _site_accounting() -> Iterator[dict[str, SiteFlops]]:
    sites: dict[str, SiteFlops] = {}
    token = _SITES.set(sites)
    try:
        yield sites
    finally:
        _SITES.reset(token)


def _record(site: str, **amounts: int) -> None:
    sites = _SITES.get()
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
    flops = test_flops(a["rule"]) * _count_active(a["active"], out_val.shape)
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


def run_counting(module: torch.nn.Module, *inputs: Any, **kwargs: Any) -> tuple[Any, FlopReport]:
    """Run ``module(*inputs, **kwargs)`` once; return its output and a :class:`FlopReport`."""
    with torch.no_grad(), _site_accounting() as sites, FlopCounterMode(display=False) as counter:
        output = module(*inputs, **kwargs)
    executed = int(counter.get_total_flops())
    dense = executed + sum(s.dense - s.executed for s in sites.values())
    return output, FlopReport(dense=dense, executed=executed, sites=dict(sites))


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
