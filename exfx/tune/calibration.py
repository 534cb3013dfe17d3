"""Calibration: per-site early-exit parameters for an accuracy budget, in about ten evaluations.

:func:`calibrate` uses the structure of the problem instead of blind search:

1. **Instrument once.** The model is compiled never-pruning, with every
   candidate checkpoint, and run over the calibration data. At each checkpoint
   of each site it records, for a seeded random sample of neurons, both rules'
   test statistics (the mean term and the z-score), and at completion the
   neuron's true pre-activation. A second pass runs the analysed graph with
   autograd and records, for the same neurons, the gradient of a random
   projection of the outputs: the neuron's *gain* on the outputs.
2. **Price every candidate offline.** For each site, each rule (threshold,
   z-test), each schedule and each parameter on a grid (thresholds at quantiles
   of the recorded statistic, a ladder of alphas), it replays the early-exit
   tests on the recorded neurons. That gives the executed FLOPs per neuron, with
   the test overhead and the same FLOP convention as :mod:`exfx.cost.flops`, and the
   *damage*: the first-order output energy ``sum (gain * activation) ** 2`` of
   the neurons it would falsely zero, as a share of the whole model's. A site
   whose errors later layers amplify therefore costs more per false prune.
3. **Allocate across sites.** For a price ``lam``, each site takes the
   candidate that maximises ``saved FLOPs / model FLOPs - lam * damage``. This is
   the Lagrangian of "fewest FLOPs subject to bounded damage", solved exactly
   per site. Sweeping ``lam`` over a fine log grid from conservative to
   aggressive gives an ordered *path* of distinct allocations, each saving more
   and damaging more than the one before. A **binary search** along the path
   then runs full evaluations on the calibration data and keeps the most
   aggressive plan whose metric drop stays within ``budget``: about
   ``log2(path length)`` evaluations, never more than ``max_evals``.

Everything is deterministic under ``seed`` (the neuron sample), and the data is
read in the order given. The returned plan's ``meta["calibration"]`` records the
number of full evaluations, the wall time, the baseline and calibrated scores
and the measured FLOP reduction.

:func:`calibrate_budgets` does this for several budgets at once: steps 1-3 do not
depend on the budget, so only the binary searches are per budget, and they share
the evaluations of the plans they both visit.

:func:`exfx.random_search` (:mod:`.search`) is the baseline in the spirit of the published tuning
(Optuna over per-layer parameters): it draws random per-site rules and
parameters, evaluates each, and keeps the best plan within budget.

Both select on the data they are given; hand them a validation split, never the
test set.

Stages: :mod:`.instrument` (step 1), :mod:`.pricing` (steps 2-3), this module
(the search). Under ``torch.distributed`` each rank reads its shard of the data and
:mod:`.distributed` combines the ranks' records and evaluations into one process's.
The model is analysed once (:func:`exfx.analyse`); the baseline, the probe and
every evaluated plan are compiled from that one analysis. Pass an
:class:`exfx.Analysis` as ``model`` to reuse yours.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from exfx.api import Analysis
from exfx.config import Config, Plan, SiteParams
from exfx.errors import ExfxWarning
from exfx.report import reason_lines
from exfx.tune.evaluation import (
    Batch,
    Evaluation,
    Metric,
    analysis_of,
    check_budget,
    drop_bound,
    plan_for,
    quiet,
    tunable_sites,
    with_calibration_record,
)
from exfx.tune.distributed import Ranks
from exfx.tune.instrument import SiteSample, instrument, record_gains
from exfx.tune.options import DEFAULT_ALPHAS, DEFAULT_SCHEDULES, CalibrationOptions
from exfx.tune.pricing import allocation_path, candidates, harm_scales

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "calibrate_budgets", "CalibrationOptions", "DEFAULT_SCHEDULES", "DEFAULT_ALPHAS"]


def calibrate(model: torch.nn.Module | Analysis, example_inputs: Any, data: Iterable[Batch], metric: Metric,
              budget: float = 0.001, config: Config | None = None, *, options: CalibrationOptions | None = None,
              **overrides: Any) -> Plan:
    """The plan with the fewest executed FLOPs whose metric drop on ``data`` is at most ``budget``.

    Args:
        model: an eval-mode model, or an :class:`exfx.Analysis` of one (then
            ``example_inputs`` is ignored and the capture options must be the defaults).
        example_inputs: as for :func:`exfx.compile`.
        data: held-out ``(inputs, targets)`` batches (a validation split): a
            list, a loader or a generator. It is read once into a list (so it
            is held in memory), and every evaluation sees the same batches in
            the same order.
        metric: ``metric(outputs, targets) -> float``, higher is better, applied
            once to all outputs and targets concatenated along dim 0. The
            outputs are those of the compiled module, which for a
            Dynamo-captured model are a tensor or a tuple of tensors (see
            :func:`exfx.compile`); the baseline is the model compiled with every
            site disabled, so each plan's drop is that of early exit alone.
        budget: allowed absolute metric drop (0.001 = 0.1 point, 0.01 = 1 point).
        config: if given, restricts the search to ``config.rule`` and the single
            schedule ``config.samples`` (its threshold or alpha is searched, not
            taken); by default both rules and every schedule in ``schedules``.
            The same as the ``config`` option.
        options: how to search: an :class:`exfx.CalibrationOptions` (default: its defaults).
        **overrides: any field of :class:`exfx.CalibrationOptions` by name, over ``options``:
            ``schedules``, ``alphas``, ``max_evals``, ``max_neurons``, ``seed``,
            ``confidence``, ``sensitivity``, ``progress``, ``capture_options`` (the
            capture options of :func:`exfx.compile`, used for every compile and
            analysis: compile the plan with the same ones) and ``distributed``
            (calibrate over the ranks of ``torch.distributed``: see
            :class:`~exfx.tune.options.CalibrationOptions` and :mod:`exfx.tune.distributed`).

    Raises:
        TypeError: a keyword is not a field of :class:`exfx.CalibrationOptions`.
        ValueError: ``budget`` or an option is out of range (the message names it).

    See the module docstring for the method. ``plan.meta["calibration"]`` holds
    ``evals`` (full evaluations, baseline included), ``seconds``, ``baseline``,
    ``score``, ``reduction`` (measured), ``budget`` and ``lam``.
    """
    options = CalibrationOptions.from_kwargs(options, **_with_config(config, overrides))
    return _calibrate(model, example_inputs, data, metric, (budget,), options)[0]


def calibrate_budgets(model: torch.nn.Module | Analysis, example_inputs: Any, data: Iterable[Batch], metric: Metric,
                      budgets: Sequence[float], config: Config | None = None, *,
                      options: CalibrationOptions | None = None, **overrides: Any) -> dict[float, Plan]:
    """:func:`calibrate` for several budgets at once: budget -> plan, each as ``calibrate`` would return it.

    The other arguments are as for :func:`calibrate`. The baseline, the instrumented pass,
    the gains and the allocation path do not depend on the budget, so they are computed
    once; each budget then runs its own binary search along the same path, and a plan
    already evaluated for one budget is not evaluated again for another. Each plan is the
    one ``calibrate`` returns for that budget with the same arguments. Its
    ``meta["calibration"]`` holds the ``evals`` and ``seconds`` of the whole call (shared
    work is not split) and ``budgets``, all the budgets calibrated together.

    Example::

        >>> plans = exfx.calibrate_budgets(model, (x,), val_batches, accuracy, budgets=(0.001, 0.01))
        >>> plans[0.01].meta["calibration"]["reduction"] >= plans[0.001].meta["calibration"]["reduction"]
        True
    """
    if (isinstance(budgets, (numbers.Real, str)) or not isinstance(budgets, Iterable)
            or (isinstance(budgets, np.ndarray) and budgets.ndim == 0)):
        raise ValueError(f"budgets must be a non-empty sequence of budgets, e.g. (0.001, 0.01); got {budgets!r}")
    budgets = tuple(budgets)  # once: a generator or a numpy array alike
    if not budgets:
        raise ValueError("budgets must be a non-empty sequence of budgets, e.g. (0.001, 0.01); got none")
    options = CalibrationOptions.from_kwargs(options, **_with_config(config, overrides))
    plans = _calibrate(model, example_inputs, data, metric, budgets, options)
    return {float(budget): plan for budget, plan in zip(budgets, plans)}


def _with_config(config: Config | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The keyword overrides, with the positional ``config`` among them when it is given."""
    return overrides if config is None else {**overrides, "config": config}


def _calibrate(model: torch.nn.Module | Analysis, example_inputs: Any, data: Iterable[Batch], metric: Metric,
               budgets: tuple[float, ...], options: CalibrationOptions) -> list[Plan]:
    started = time.perf_counter()
    ranks = Ranks.detect(options.distributed)
    ranks.check_arguments({"budgets": budgets, **options.rank_arguments()})
    progress = ranks.progress(options.progress)
    budgets = tuple(check_budget(budget) for budget in budgets)
    rules, schedules, alphas = options.rules, options.search_schedules, options.alphas
    max_evals, seed, confidence = options.max_evals, options.seed, options.confidence
    data = data if isinstance(data, (list, tuple)) else list(data)
    analysis = analysis_of(model, example_inputs, options.capture_options)
    first_batch, total_batches = ranks.check_model_and_data(analysis, len(data))
    sites, signatures = tunable_sites(analysis, schedules), analysis.signatures
    baseline = ranks.evaluate(analysis.compile(plan_for(signatures), lowering="reference"), data, metric,
                              desc="exfx calibrate: baseline",
                              progress=progress)
    if not sites:
        warnings.warn(ExfxWarning(_no_site_message(analysis, schedules)), stacklevel=3)
        unpruned = [with_calibration_record(plan_for(signatures), baseline, baseline, 1, started, budget, math.inf,
                                            budgets) for budget in budgets]
        return ranks.on_first(lambda: unpruned)
    checkpoints = {s.name: tuple(sorted({k for sch in schedules if sch[-1] <= (s.fan_in or 0) for k in sch}))
                   for s in sites}
    samples = instrument(analysis, data, checkpoints, options.max_neurons, seed, progress, first_batch=first_batch,
                         total_batches=total_batches)
    if options.sensitivity == "gradient":
        record_gains(analysis, data, samples, seed, progress, first_batch=first_batch)
    samples = ranks.merge_samples(samples)  # every rank's records, on rank 0
    path = ranks.on_first(lambda: _price(samples, schedules, alphas, rules, float(baseline.dense)))
    logger.info("calibrate: %d sites, %d distinct allocations on the path", len(sites), len(path))
    evaluated: dict[int, tuple[Plan, Evaluation, float]] = {}  # path index -> plan, result, bounded drop

    def evaluate_at(index: int) -> tuple[Plan, Evaluation, float]:
        if index not in evaluated:
            lam, allocation = path[index]
            plan = plan_for(signatures, allocation)
            result = ranks.evaluate(analysis.compile(plan, lowering="reference"), data, metric,
                                    desc=f"exfx calibrate: lam={lam:.3g}",
                                    progress=progress)
            drop = baseline.score - result.score
            if confidence is not None:  # the outputs are on rank 0
                drop = max(drop, ranks.on_first(lambda: drop_bound(metric, baseline, result, confidence, seed=seed)))
            evaluated[index] = (plan, result, drop)
            bar.update(1)
        return evaluated[index]

    bar = tqdm(total=len(budgets) * min(max_evals, math.ceil(math.log2(len(path) + 1))),
               desc="exfx calibrate: search", disable=quiet(progress), leave=False)
    found = [_binary_search(path, budget, max_evals, evaluate_at, baseline.score) for budget in budgets]
    bar.close()
    evals = 1 + len(evaluated)
    plans = [with_calibration_record(plan_for(signatures), baseline, baseline, evals, started, budget, math.inf,
                                     budgets) if index is None
             else with_calibration_record(evaluated[index][0], baseline, evaluated[index][1], evals, started, budget,
                                          path[index][0], budgets)
             for budget, index in zip(budgets, found)]
    return ranks.on_first(lambda: plans)  # rank 0's, so that every rank returns the very same plans


def _no_site_message(analysis: Analysis, schedules: Sequence[tuple[int, ...]]) -> str:
    """Why calibration has nothing to tune: each activation's reason, or that there is none."""
    shortest = min(schedule[-1] for schedule in schedules)
    reasons = [(s.name, s.reason if not s.eligible else f"fan-in {s.fan_in} < {shortest}, the last checkpoint of "
                f"the shortest schedule") for s in analysis.sites]
    if not reasons:
        return (f"exfx.calibrate: {analysis.model_name} has no activation, so no site to tune; the plan leaves "
                f"the model as it is")
    return (f"exfx.calibrate: no site of {analysis.model_name} can be tuned, so the plan leaves the model as it "
            f"is; why, per activation:\n{reason_lines(reasons)}")


def _price(samples: Mapping[str, SiteSample], schedules: Sequence[tuple[int, ...]], alphas: Sequence[float],
           rules: tuple[str, ...], dense: float) -> list[tuple[float, dict[str, SiteParams]]]:
    """Steps 2-3: every site's candidates priced on its records, and the allocation path."""
    scales = harm_scales(samples)
    priced = {name: candidates(sample, schedules, alphas, rules, scales[name]) for name, sample in samples.items()}
    return allocation_path(priced, dense)


def _binary_search(path: Sequence[tuple[float, Any]], budget: float, max_evals: int,
                   evaluate_at: Callable[[int], tuple[Plan, Evaluation, float]], baseline: float) -> int | None:
    """The path index of the most aggressive plan found within ``budget`` (None: not even the first).

    The path is ordered from conservative to aggressive, so feasibility is
    (nearly) monotone along it: ``lo`` is known feasible (-1: the empty plan),
    ``hi`` known over budget. At most ``max_evals`` indices are visited; of the
    feasible ones, the plan with the fewest executed FLOPs wins.
    """
    best: int | None = None
    lo, hi, visited = -1, len(path), 0
    while hi - lo > 1 and visited < max_evals:
        mid = (lo + hi) // 2
        _, result, drop = evaluate_at(mid)
        visited += 1
        feasible = drop <= budget + 1e-12
        logger.info("calibrate: budget %g, lam=%.3g score=%.5f (baseline %.5f) reduction=%.4f %s", budget,
                    path[mid][0], result.score, baseline, result.reduction, "ok" if feasible else "over budget")
        if feasible:
            lo = mid
            if best is None or result.executed < evaluate_at(best)[1].executed:
                best = mid
        else:
            hi = mid
    return best
