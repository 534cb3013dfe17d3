"""Random search: the blind baseline :func:`exfx.calibrate` is compared with.

In the spirit of the published tuning (Optuna over per-layer parameters): draw
random per-site rules and parameters, evaluate each plan in full, keep the best
within budget. Every trial is compiled from one analysis of the model.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from exfx.api import Analysis
from exfx.capture import CaptureOptions
from exfx.config import Plan, SiteParams
from exfx.tune import evaluation
from exfx.tune.evaluation import Batch, Metric
from exfx.tune.options import DEFAULT_SCHEDULES, check_schedules

logger = logging.getLogger(__name__)

__all__ = ["random_search"]


def random_search(model: torch.nn.Module | Analysis, example_inputs: Any, data: Iterable[Batch], metric: Metric,
                  budget: float = 0.001, *, evals: int = 120, schedules: Sequence[tuple[int, ...]] = DEFAULT_SCHEDULES,
                  seed: int = 0, progress: bool | None = None,
                  capture_options: CaptureOptions | Mapping[str, Any] | None = None) -> Plan:
    """Blind random search over per-site parameters (the baseline :func:`calibrate` is compared with).

    Each trial gives every site, independently: disabled (probability 0.2), or a
    random schedule with either the threshold rule (``T = -10**u``,
    ``u ~ U(-4, 1)``) or the z-test (``alpha ~ U(0, 0.5)``). Each trial is one full
    evaluation; the plan with the fewest executed FLOPs within ``budget`` wins.
    The arguments (``schedules``, ``seed``, ``progress``, ``capture_options``: the
    :class:`exfx.CalibrationOptions` fields of those names) and ``plan.meta["calibration"]``
    are as for :func:`calibrate`.
    """
    started = time.perf_counter()
    budget = evaluation.check_budget(budget)
    schedules = check_schedules(schedules)
    data = data if isinstance(data, (list, tuple)) else list(data)
    analysis = evaluation.analysis_of(model, example_inputs, capture_options)
    sites, signatures = evaluation.tunable_sites(analysis, schedules), analysis.signatures
    baseline = evaluation.evaluate(analysis.compile(evaluation.plan_for(signatures), lowering="reference"), data,
                                   metric, desc="exfx random search: baseline", progress=progress)
    rng = random.Random(seed)
    best: tuple[Plan, evaluation.Evaluation] = (evaluation.plan_for(signatures), baseline)
    found = False
    for _ in tqdm(range(evals), desc="exfx random search", disable=evaluation.quiet(progress), leave=False):
        plan = evaluation.plan_for(signatures, {s.name: _random_params(rng, s.fan_in or 0, schedules) for s in sites})
        result = evaluation.evaluate(analysis.compile(plan, lowering="reference"), data, metric, progress=False)
        if baseline.score - result.score <= budget + 1e-12 and (not found or result.executed < best[1].executed):
            best, found = (plan, result), True
    return evaluation.with_calibration_record(best[0], baseline, best[1], evals + 1, started, budget, math.inf)


def _random_params(rng: random.Random, fan_in: int, schedules: Sequence[tuple[int, ...]]) -> SiteParams:
    fitting = [s for s in schedules if s[-1] <= fan_in]
    if not fitting or rng.random() < 0.2:
        return SiteParams(enabled=False)
    schedule = rng.choice(fitting)
    if schedule[0] >= 2 and rng.random() < 0.5:
        return SiteParams(rule="ztest", alpha=rng.uniform(0.0, 0.5), samples=schedule)
    return SiteParams(rule="threshold", threshold=-(10 ** rng.uniform(-4, 1)), samples=schedule)
