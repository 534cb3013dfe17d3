"""Evaluation: run a module over held-out data, score it and count its FLOPs; the oracle bound; the bootstrap guard.

The shared ground of every tuner (:mod:`.calibration`, :mod:`.search`,
:mod:`.pareto`): :func:`evaluate` is one full pass over the data, :func:`drop_bound`
the paired-bootstrap guard on a metric drop, :func:`oracle` the bound no predictor
can beat, and :func:`analysis_of` the one analysis a tuner compiles all its plans from.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from exfx.api import Analysis, analyse
from exfx.capture import CaptureOptions, normalise_inputs
from exfx.config import Config, Plan, SiteParams
from exfx.meta import SiteMatch
from exfx.cost.flops import FlopReport, run_counting
from exfx.cost.model import op_arguments, site_cost
from exfx.errors import ExfxError

logger = logging.getLogger(__name__)

__all__ = ["Evaluation", "Counts", "Metric", "Batch", "evaluate", "drop_bound", "drop_interval", "oracle", "split_batch",
           "concat_batches",
           "select_examples", "count_examples", "analysis_of", "quiet", "plan_for", "tunable_sites",
           "check_budget", "budget_error", "run_batches", "score_batches",
           "with_calibration_record"]

#: ``metric(outputs, targets) -> float``, higher is better.
Metric = Callable[[Any, Any], float]
#: One ``(inputs, targets)`` pair of the data.
Batch = Any


@dataclass
class Evaluation:
    """One full pass over the data: the metric, the FLOPs actually executed, and each site's measured keep ratio."""

    score: float
    executed: int
    dense: int
    outputs: Any = field(default=None, repr=False)  # all outputs and targets, concatenated along dim 0
    targets: Any = field(default=None, repr=False)
    keep: dict[str, float] = field(default_factory=dict)  # site -> share of its neurons kept (not pruned)

    @property
    def reduction(self) -> float:
        return 1.0 - self.executed / self.dense if self.dense else 0.0


@dataclass
class Counts:
    """What a pass over the data executed: FLOPs in all, and each site's neurons and pruned neurons."""

    executed: int = 0
    dense: int = 0
    neurons: dict[str, int] = field(default_factory=dict)
    pruned: dict[str, int] = field(default_factory=dict)

    def add(self, flops: FlopReport) -> None:
        self.executed += flops.executed
        self.dense += flops.dense
        for name, site in flops.sites.items():
            self.neurons[name] = self.neurons.get(name, 0) + site.neurons
            self.pruned[name] = self.pruned.get(name, 0) + site.pruned

    @property
    def keep(self) -> dict[str, float]:
        """Site -> the share of its neurons kept, over every call counted (sites that ran no neuron left out)."""
        return {name: 1.0 - self.pruned[name] / n for name, n in self.neurons.items() if n}


# Outputs and targets of the batches are combined along dim 0 when they are tensors, numpy arrays or
# sequences of numbers; tuples, lists and dicts of those are combined member by member; anything else is
# kept as the list of the batches' values.


def _is_data(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (numbers.Number, str)) for v in value)


def concat_batches(parts: list[Any]) -> Any:
    """The batches' ``parts`` of an output or target, combined (see above)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if _is_data(first):
        return [v for part in parts for v in part]
    if isinstance(first, Mapping):
        return {key: concat_batches([p[key] for p in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([p[i] for p in parts]) for i in range(len(first)))
    return parts


def select_examples(value: Any, index: torch.Tensor) -> Any:
    """The examples ``index`` (along dim 0) of a combined output or target."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[index.numpy()]
    if _is_data(value):
        return [value[i] for i in index.tolist()]
    if isinstance(value, Mapping):
        return {key: select_examples(v, index) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(select_examples(v, index) for v in value)
    raise ExfxError(f"confidence resamples examples, so outputs and targets must be tensors, numpy arrays or lists "
                    f"of numbers (or tuples, lists or dicts of them), got {type(value).__name__}")


def count_examples(value: Any) -> int:
    """How many examples a combined output or target holds."""
    if _is_data(value):
        return len(value)
    if isinstance(value, Mapping) and value:
        return count_examples(next(iter(value.values())))
    if isinstance(value, (tuple, list)) and value:
        return count_examples(value[0])
    raise ExfxError(f"cannot count the examples in targets of type {type(value).__name__}")


def drop_bound(metric: Metric, baseline: Evaluation, result: Evaluation, confidence: float, rounds: int = 200,
               seed: int = 0) -> float:
    """Upper ``confidence`` quantile of the metric drop under a paired bootstrap over the examples.

    Both models are scored on the same resampled examples, so the bound reflects
    how many predictions changed, not just the net change.
    """
    return float(_bootstrap_drops(metric, baseline, result, rounds, seed).quantile(confidence))


def drop_interval(metric: Metric, baseline: Evaluation, result: Evaluation, confidence: float = 0.95,
                  rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The central ``confidence`` interval of the metric drop under the same paired bootstrap: how much the drop
    measured on these examples may differ on others like them."""
    drops = _bootstrap_drops(metric, baseline, result, rounds, seed)
    tail = (1.0 - confidence) / 2
    return float(drops.quantile(tail)), float(drops.quantile(1.0 - tail))


def _bootstrap_drops(metric: Metric, baseline: Evaluation, result: Evaluation, rounds: int,
                     seed: int) -> torch.Tensor:
    count = count_examples(baseline.targets)
    generator = torch.Generator().manual_seed(seed)
    drops = []
    for _ in range(rounds):
        index = torch.randint(0, count, (count,), generator=generator)
        drops.append(float(metric(select_examples(baseline.outputs, index), select_examples(baseline.targets, index)))
                     - float(metric(select_examples(result.outputs, index), select_examples(result.targets, index))))
    return torch.tensor(drops, dtype=torch.float64)


def analysis_of(model: torch.nn.Module | Analysis, example_inputs: Any,
                capture_options: CaptureOptions | Mapping[str, Any] | None = None) -> Analysis:
    """The analysis a tuner compiles every plan from: ``model`` itself when it is one, else ``exfx.analyse``
    with ``capture_options`` (an :class:`exfx.CaptureOptions` or a dict of its fields)."""
    options = CaptureOptions.of(capture_options)
    if isinstance(model, Analysis):
        if not options.is_default:
            raise ValueError("capture_options apply to capture, and this exfx.Analysis is captured already; "
                             "pass them to exfx.analyse instead")
        return model
    return analyse(model, normalise_inputs(example_inputs), capture_options=options)


def split_batch(batch: Batch) -> tuple[tuple[Any, ...], Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ExfxError("calibration data must yield (inputs, targets) pairs; inputs may be a tensor or a tuple")
    inputs, targets = batch
    return normalise_inputs(inputs), targets


def evaluate(module: torch.nn.Module, data: Iterable[Batch], metric: Metric, *, desc: str = "evaluate",
             progress: bool | None = None) -> Evaluation:
    """Run ``module`` over ``data``; score all outputs at once with ``metric`` and count FLOPs."""
    return score_batches(*run_batches(module, data, desc=desc, progress=progress), metric)


def run_batches(module: torch.nn.Module, data: Iterable[Batch], *, desc: str = "evaluate",
                progress: bool | None = None) -> tuple[list[Any], list[Any], Counts]:
    """Run ``module`` over ``data``: each batch's outputs and targets, and what the whole pass executed."""
    outputs, targets, counts = [], [], Counts()
    for batch in tqdm(data, desc=desc, disable=quiet(progress), leave=False):
        inputs, target = split_batch(batch)
        output, flops = run_counting(module, *inputs)
        outputs.append(output)
        targets.append(target)
        counts.add(flops)
    return outputs, targets, counts


def score_batches(outputs: list[Any], targets: list[Any], counts: Counts, metric: Metric) -> Evaluation:
    """The :class:`Evaluation` of the batches' ``outputs`` and ``targets``, combined along dim 0 and scored once."""
    if not outputs:
        raise ExfxError("calibration data is empty")
    outputs, targets = concat_batches(outputs), concat_batches(targets)
    return Evaluation(score=float(metric(outputs, targets)), executed=counts.executed, dense=counts.dense,
                      outputs=outputs, targets=targets, keep=counts.keep)


def quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


class _NegativeCounter(fx.Interpreter):
    """Counts the FLOPs an oracle would skip: the remaining terms of every non-positive neuron."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.skipped = 0

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.exfx.complete.default:
            args = op_arguments(n.target, *self.fetch_args_kwargs_from_env(n))
            cost = site_cost(args["x"], args["weight"], args["n_units"])
            self.skipped += int((result <= 0).sum()) * cost.completion(args["start"])
        return result


def oracle(model: torch.nn.Module | Analysis, example_inputs: Any, data: Iterable[Batch], metric: Metric,
           samples: int = 32, progress: bool | None = None,
           capture_options: CaptureOptions | Mapping[str, Any] | None = None) -> Evaluation:
    """The oracle bound: every truly non-positive neuron stops after its first ``samples`` units, at no cost
    in accuracy and with no test overhead. Its score is the model's own (the analysed graph's, when ``model``
    is an :class:`~exfx.api.Analysis`). ``capture_options`` as for :func:`exfx.calibrate`."""
    data = list(data)
    analysis = analysis_of(model, example_inputs, capture_options)
    never = analysis.compile(Config(threshold=-math.inf, samples=samples), lowering="reference")
    dense_model = analysis.graph_module if isinstance(model, Analysis) else model
    dense = evaluate(dense_model, data, metric, desc="exfx oracle", progress=progress)
    skipped = 0
    with torch.no_grad():
        for batch in data:
            counter = _NegativeCounter(never)
            counter.run(*split_batch(batch)[0])
            skipped += counter.skipped
    return Evaluation(score=dense.score, executed=dense.dense - skipped, dense=dense.dense, outputs=dense.outputs,
                      targets=dense.targets)


def plan_for(signatures: Mapping[str, str], sites: Mapping[str, SiteParams] | None = None) -> Plan:
    """A plan for every structurally eligible site: ``sites``' parameters, and every other site disabled.

    A site the plan left out would get the default ``Config`` from :func:`exfx.compile`: untuned pruning.
    """
    params = {name: SiteParams(enabled=False) for name in signatures}
    params.update(sites or {})
    return Plan(sites=params, signatures=dict(signatures))


def tunable_sites(analysis: Analysis, schedules: Sequence[tuple[int, ...]]) -> list[SiteMatch]:
    """The structurally eligible sites whose fan-in fits at least one of ``schedules``, in graph order."""
    shortest = min(schedule[-1] for schedule in schedules)
    return [s for s in analysis.sites if s.eligible and (s.fan_in or 0) >= shortest]


def check_budget(budget: float) -> float:
    """The budget as a Python float (numpy scalars too), after checking it."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0.0 <= budget < 1.0:
        raise ValueError(budget_error(budget))
    return float(budget)


def budget_error(given: Any, name: str = "budget") -> str:
    """What a budget must be, and what was given: the one message of the API and the CLI (``name="--budget"``)."""
    return f"{name} must be an absolute metric drop in [0, 1) (0.01 = 1 point, 0.001 = 0.1 point), got {given!r}"


def with_calibration_record(plan: Plan, baseline: Evaluation, result: Evaluation, evals: int, started: float,
                            budget: float, lam: float, budgets: tuple[float, ...] | None = None) -> Plan:
    """A copy of ``plan`` whose ``meta["calibration"]`` records how it was found (see :func:`exfx.calibrate`)."""
    enabled = {name for name, params in plan.sites.items() if params.enabled}
    plan = Plan(sites=dict(plan.sites), signatures=dict(plan.signatures), meta=dict(plan.meta),
                keep={name: ratio for name, ratio in result.keep.items() if name in enabled})
    plan.meta["calibration"] = {
        "evals": evals, "seconds": time.perf_counter() - started, "baseline": baseline.score,
        "score": result.score, "reduction": result.reduction, "budget": budget,
        "lam": lam if math.isfinite(lam) else None,
    }
    if budgets is not None and len(budgets) > 1:
        plan.meta["calibration"]["budgets"] = list(budgets)
    return plan
