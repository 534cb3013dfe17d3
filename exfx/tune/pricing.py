"""Pricing: every candidate's FLOPs saved and damage, replayed offline on the instrumented records; allocation.

For each site, each rule, each schedule and each parameter on a grid
(thresholds at quantiles of the recorded statistic, a ladder of alphas),
:func:`replay` re-runs the early-exit tests on the recorded neurons. The executed
FLOPs come from the cost model (:meth:`exfx.cost.model.SiteCost.expected`, test
overhead included); the *damage* is the harm of the neurons it would falsely zero
(:meth:`~exfx.tune.instrument.SiteSample.harm`), made comparable across sites by
:func:`harm_scales`.

:func:`allocation_path` then solves "fewest FLOPs subject to bounded damage" by
its Lagrangian: for a price ``lam``, each site takes the candidate that maximises
``saved / model FLOPs - lam * damage``; sweeping ``lam`` from conservative to
aggressive gives an ordered path of distinct allocations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from exfx.config import SiteParams
from exfx.ops import cutoff
from exfx.tune.instrument import SiteSample

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "replay", "candidates", "harm_scales", "allocate", "allocation_path", "THRESHOLD_QUANTILES",
           "LAMBDA_GRID"]

#: Quantiles of the first checkpoint's recorded statistic at which threshold candidates sit.
THRESHOLD_QUANTILES = tuple(q / 100 for q in (1, 2, 3, 5, 7, 10, 13, 16, 20, 25, 30, 35, 40, 45, 50, 60, 70))


@dataclass(frozen=True)
class Candidate:
    params: SiteParams
    saved: float  # FLOPs saved over the calibration data (extrapolated from the sample)
    damage: float  # harm of the false prunes, comparable across sites (see SiteSample.harm and harm_scales)


def replay(stats: dict[int, dict[str, torch.Tensor]], positive: torch.Tensor, harm: torch.Tensor,
            sample: SiteSample, params: SiteParams) -> tuple[float, float]:
    """Executed FLOPs per neuron (from the cost model) and summed harm of the false prunes of ``params``,
    on the recorded neurons."""
    cut = cutoff(params.rule, params.param)
    active = torch.ones_like(positive, dtype=torch.bool)
    fractions = []
    for k in params.samples:
        fractions.append(float(active.double().mean()))
        active &= ~(stats[k][params.rule] < cut)
    fractions.append(float(active.double().mean()))
    flops = sample.cost.expected(params.samples, params.rule, fractions)
    return flops, float(harm[~active & (positive > 0)].sum())


def candidates(sample: SiteSample, schedules: Sequence[tuple[int, ...]], alphas: Sequence[float],
                rules: Sequence[str] = ("threshold", "ztest"), harm_scale: float = 1.0) -> list[Candidate]:
    """Every candidate's FLOPs saved and damage; damage is the sample's harm of false prunes times ``harm_scale``."""
    stats, pre = sample.tensors()
    positive = pre.clamp_min(0.0)
    harm = sample.harm()
    dense = sample.cost.dense
    scale = sample.neurons
    out = [Candidate(SiteParams(enabled=False), 0.0, 0.0)]
    for schedule in schedules:
        if schedule[-1] > sample.fan_in:
            continue
        first = stats[schedule[0]]["threshold"]
        finite = first[torch.isfinite(first)]
        thresholds = sorted({float(v) for v in torch.quantile(finite, torch.tensor(THRESHOLD_QUANTILES,
                                                                                     dtype=finite.dtype))}
                            ) if finite.numel() else []
        options = [SiteParams(rule="threshold", threshold=t, samples=schedule) for t in thresholds
                   if "threshold" in rules]
        if schedule[0] >= 2 and "ztest" in rules:
            options += [SiteParams(rule="ztest", alpha=a, samples=schedule) for a in alphas]
        for params in options:
            flops, damage = replay(stats, positive, harm, sample, params)
            out.append(Candidate(params, (dense - flops) * scale, damage * harm_scale))
    return out


def harm_scales(samples: Mapping[str, SiteSample]) -> dict[str, float]:
    """Per site, the factor that makes sampled harm comparable across sites.

    With gains, harm is extrapolated from the sample to all the site's neurons and
    divided by the model's total first-order output energy, so one unit of damage
    means the same at every site. Without gains, each site's damage is already a
    share of its own activation mass.
    """
    if not all(sample.gains for sample in samples.values()):
        return {name: 1.0 for name in samples}
    harms = {name: sample.harm() for name, sample in samples.items()}
    extrapolated = {name: samples[name].neurons / len(harm) for name, harm in harms.items()}
    total = sum(float(harm.sum()) * extrapolated[name] for name, harm in harms.items())
    return {name: extrapolated[name] / total if total > 0 else 1.0 for name in samples}


def allocate(candidates: dict[str, list[Candidate]], total: float, lam: float) -> dict[str, SiteParams]:
    return {name: max(options, key=lambda c: c.saved / total - lam * c.damage).params
            for name, options in candidates.items()}


LAMBDA_GRID = tuple(math.exp(math.log(1e4) - i * math.log(1e8) / 400) for i in range(401))


def allocation_path(candidates: dict[str, list[Candidate]],
                     total: float) -> list[tuple[float, dict[str, SiteParams]]]:
    """Distinct allocations along a log grid of prices, from conservative (``lam`` 1e4) to aggressive (1e-4).

    An allocation that disables every site is left out: it is the baseline, already evaluated.
    """
    path: list[tuple[float, dict[str, SiteParams]]] = []
    for lam in LAMBDA_GRID:
        allocation = allocate(candidates, total, lam)
        if not any(params.enabled for params in allocation.values()):
            continue
        if not path or allocation != path[-1][1]:
            path.append((lam, allocation))
    return path
