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
   the test overhead and the same FLOP convention as :mod:`exfx.flops`, and the
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

:func:`random_search` is the baseline in the spirit of the published tuning
(Optuna over per-layer parameters): it draws random per-site rules and
parameters, evaluates each, and keeps the best plan within budget.

Both select on the data they are given; hand them a validation split, never the
test set.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from exfx.api import compile as exfx_compile
from exfx.api import _analyse, explain
from exfx.capture import normalise_inputs
from exfx.config import Config, Plan, SiteParams
from exfx.errors import ExfxError
from exfx.flops import run_counting
from exfx.ops import enp_ops

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "calibrate_budgets", "random_search", "evaluate", "oracle", "drop_bound", "Evaluation",
           "DEFAULT_SCHEDULES", "DEFAULT_ALPHAS"]

Metric = Callable[[Any, Any], float]
Batch = Any

#: Every checkpoint schedule over {8, 16, 32, 64} (a site takes those that fit its fan-in): pricing is
#: offline, so more candidates cost no evaluation, only a little more work in the instrumented pass.
DEFAULT_SCHEDULES: tuple[tuple[int, ...], ...] = tuple(
    tuple(k for k, bit in zip((8, 16, 32, 64), f"{mask:04b}"[::-1]) if bit == "1") for mask in range(1, 16))
DEFAULT_ALPHAS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
_THRESHOLD_QUANTILES = tuple(q / 100 for q in (1, 2, 3, 5, 7, 10, 13, 16, 20, 25, 30, 35, 40, 45, 50, 60, 70))


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One full pass over the data: the metric and the FLOPs actually executed."""

    score: float
    executed: int
    dense: int
    outputs: Any = field(default=None, repr=False)  # all outputs and targets, concatenated along dim 0
    targets: Any = field(default=None, repr=False)

    @property
    def reduction(self) -> float:
        return 1.0 - self.executed / self.dense if self.dense else 0.0


# Outputs and targets of the batches are combined along dim 0 when they are tensors, numpy arrays or
# sequences of numbers; tuples, lists and dicts of those are combined member by member; anything else is
# kept as the list of the batches' values.


def _is_data(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (numbers.Number, str)) for v in value)


def _concat(parts: list[Any]) -> Any:
    """The batches' ``parts`` of an output or target, combined (see above)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if _is_data(first):
        return [v for part in parts for v in part]
    if isinstance(first, Mapping):
        return {key: _concat([p[key] for p in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return parts


def _select(value: Any, index: torch.Tensor) -> Any:
    """The examples ``index`` (along dim 0) of a combined output or target."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[index.numpy()]
    if _is_data(value):
        return [value[i] for i in index.tolist()]
    if isinstance(value, Mapping):
        return {key: _select(v, index) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, index) for v in value)
    raise ExfxError(f"confidence resamples examples, so outputs and targets must be tensors, numpy arrays or lists "
                    f"of numbers (or tuples, lists or dicts of them), got {type(value).__name__}")


def _count(value: Any) -> int:
    """How many examples a combined output or target holds."""
    if _is_data(value):
        return len(value)
    if isinstance(value, Mapping) and value:
        return _count(next(iter(value.values())))
    if isinstance(value, (tuple, list)) and value:
        return _count(value[0])
    raise ExfxError(f"cannot count the examples in targets of type {type(value).__name__}")


def drop_bound(metric: Metric, baseline: Evaluation, result: Evaluation, confidence: float, rounds: int = 200,
               seed: int = 0) -> float:
    """Upper ``confidence`` quantile of the metric drop under a paired bootstrap over the examples.

    Both models are scored on the same resampled examples, so the bound reflects
    how many predictions changed, not just the net change.
    """
    count = _count(baseline.targets)
    generator = torch.Generator().manual_seed(seed)
    drops = []
    for _ in range(rounds):
        index = torch.randint(0, count, (count,), generator=generator)
        drops.append(float(metric(_select(baseline.outputs, index), _select(baseline.targets, index)))
                     - float(metric(_select(result.outputs, index), _select(result.targets, index))))
    return float(torch.tensor(drops).quantile(confidence))


_TRACING_KEYS = ("leaf_modules", "concrete_args", "hidden_inputs", "capture")


def _tracing(tracing: Mapping[str, Any] | None) -> dict[str, Any]:
    """The capture options of :func:`exfx.compile` that every internal compile and analysis must share."""
    options = dict(tracing or {})
    unknown = sorted(set(options) - set(_TRACING_KEYS))
    if unknown:
        raise ValueError(f"tracing takes the capture options of exfx.compile {list(_TRACING_KEYS)}, got {unknown}")
    return options


def _split(batch: Batch) -> tuple[tuple[Any, ...], Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ExfxError("calibration data must yield (inputs, targets) pairs; inputs may be a tensor or a tuple")
    inputs, targets = batch
    return normalise_inputs(inputs), targets


def evaluate(module: torch.nn.Module, data: Iterable[Batch], metric: Metric, *, desc: str = "evaluate",
             progress: bool | None = None) -> Evaluation:
    """Run ``module`` over ``data``; score all outputs at once with ``metric`` and count FLOPs."""
    outputs, targets, executed, dense = [], [], 0, 0
    for batch in tqdm(data, desc=desc, disable=_quiet(progress), leave=False):
        inputs, target = _split(batch)
        output, flops = run_counting(module, *inputs)
        outputs.append(output)
        targets.append(target)
        executed += flops.executed
        dense += flops.dense
    if not outputs:
        raise ExfxError("calibration data is empty")
    outputs, targets = _concat(outputs), _concat(targets)
    return Evaluation(score=float(metric(outputs, targets)), executed=executed, dense=dense, outputs=outputs,
                      targets=targets)


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


class _NegativeCounter(fx.Interpreter):
    """Counts, per site, the FLOPs an oracle would skip: the remaining terms of every non-positive neuron."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.skipped = 0

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.exfx.complete.default:
            x, weight, _state, _bias, _residual, _active, start, n_units = self.fetch_args_kwargs_from_env(n)[0][:8]
            per_unit = 2 * enp_ops.terms_per_unit(x, weight, n_units)
            remaining = enp_ops.fan_in_of(x, weight, n_units) - start
            self.skipped += int((result <= 0).sum()) * remaining * per_unit
        return result


def oracle(model: torch.nn.Module, example_inputs: Any, data: Iterable[Batch], metric: Metric,
           samples: int = 32, progress: bool | None = None, tracing: Mapping[str, Any] | None = None) -> Evaluation:
    """The oracle bound: every truly non-positive neuron stops after its first ``samples`` units, at no cost
    in accuracy and with no test overhead. Its score is the model's own. ``tracing`` as for :func:`calibrate`."""
    data = list(data)
    never = exfx_compile(model, normalise_inputs(example_inputs), Config(threshold=-math.inf, samples=samples),
                         **_tracing(tracing))
    dense = evaluate(model, data, metric, desc="exfx oracle", progress=progress)
    skipped = 0
    with torch.no_grad():
        for batch in data:
            counter = _NegativeCounter(never)
            counter.run(*_split(batch)[0])
            skipped += counter.skipped
    return Evaluation(score=dense.score, executed=dense.dense - skipped, dense=dense.dense, outputs=dense.outputs,
                      targets=dense.targets)


# ---------------------------------------------------------------------------
# 1. Instrumentation
# ---------------------------------------------------------------------------


@dataclass
class _SiteSample:
    """What the instrumented pass saw at one site, for a sample of its neurons."""

    fan_in: int = 0
    cost_per_unit: int = 0  # FLOPs one unit adds to one neuron (2 per multiply-add)
    neurons: int = 0  # all neurons seen, not just the sample
    checkpoints: dict[int, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    pre: list[torch.Tensor] = field(default_factory=list)
    picks: list[torch.Tensor] = field(default_factory=list)  # the sampled indices, one tensor per batch
    gains: list[torch.Tensor] = field(default_factory=list)  # d(r . outputs) / d(activation), per sampled neuron

    def tensors(self) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]:
        stats = {k: {rule: torch.cat(v) for rule, v in per_rule.items()} for k, per_rule in self.checkpoints.items()}
        return stats, torch.cat(self.pre)

    def harm(self) -> torch.Tensor:
        """Per sampled neuron, the harm of zeroing it: first-order output energy ``(gain * activation) ** 2``,
        or, without gains, its activation as a share of the site's activation mass."""
        positive = torch.cat(self.pre).clamp_min(0.0)
        if self.gains:
            return (torch.cat(self.gains) * positive) ** 2
        mass = float(positive.sum())
        return positive / mass if mass > 0 else positive


def _on_cpu(values: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The sampled neurons ``picked`` (flat indices, on the CPU) of ``values``, as float64 on the CPU.

    Recording moves every sample to the CPU, so pricing (quantiles, replays) runs
    there whatever the model's device.
    """
    return values.reshape(-1)[picked.to(values.device)].double().cpu()


class _Recorder(fx.Interpreter):
    """Interprets a never-pruning compiled module with moments, sampling neurons at every site."""

    def __init__(self, gm: fx.GraphModule, samples: dict[str, _SiteSample], per_batch: int,
                 generator: torch.Generator) -> None:
        super().__init__(gm)
        self.samples, self.per_batch, self.generator = samples, per_batch, generator
        self.index: dict[str, torch.Tensor] = {}

    def _pick(self, site: str, numel: int) -> torch.Tensor:
        if site not in self.index:
            count = min(numel, self.per_batch)
            # clone: the slice alone would keep the whole permutation alive (numel int64s per batch and site,
            # about 20 GB over 10,000 ResNet-18 images)
            self.index[site] = torch.randperm(numel, generator=self.generator)[:count].clone()
        return self.index[site]

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op != "call_function":
            return result
        if n.target is torch.ops.exfx.early_exit.default:
            args = self.fetch_args_kwargs_from_env(n)[0]
            state, weight, bias, residual, _active, count, fan_in, _rule, _param, site = args
            picked = self._pick(site, state[0].numel())
            per_rule = self.samples.setdefault(site, _SiteSample()).checkpoints.setdefault(
                count, {r: [] for r in enp_ops.RULES})
            for rule in enp_ops.RULES:
                statistic = enp_ops.exit_statistic(state, weight, bias, residual, count, fan_in, rule)
                per_rule[rule].append(_on_cpu(statistic, picked))
        elif n.target is torch.ops.exfx.complete.default:
            args = self.fetch_args_kwargs_from_env(n)[0]
            x, weight, n_units, site = args[0], args[1], args[7], args[12]
            sample = self.samples.setdefault(site, _SiteSample())
            sample.fan_in = enp_ops.fan_in_of(x, weight, n_units)
            sample.cost_per_unit = 2 * enp_ops.terms_per_unit(x, weight, n_units)
            picked = self._pick(site, result.numel())
            sample.pre.append(_on_cpu(result, picked))
            sample.picks.append(picked)
            sample.neurons += result.numel()
        return result


def _instrument(model: torch.nn.Module, example_inputs: tuple[Any, ...], data: Iterable[Batch], sites: list[Any],
                signatures: dict[str, str], checkpoints: dict[str, tuple[int, ...]], max_neurons: int, seed: int,
                progress: bool | None, tracing: Mapping[str, Any] = MappingProxyType({}),
                recorder: Callable[..., _Recorder] = _Recorder) -> dict[str, _SiteSample]:
    """Run the never-pruning probe over ``data``, recording each site's sampled neurons (``recorder`` builds
    the :class:`_Recorder` of each batch; a subclass may record more, e.g. :mod:`benchmarks.predictor_frontier`)."""
    # Never-pruning (alpha 0) at the searched sites, dense at the others, as in every trial.
    plan = _plan(signatures, {s.name: SiteParams(rule="ztest", alpha=0.0, samples=checkpoints[s.name]) for s in sites})
    probe = exfx_compile(model, example_inputs, plan=plan, **tracing)
    samples: dict[str, _SiteSample] = {}
    batches = list(data) if not isinstance(data, (list, tuple)) else data
    per_batch = max(1, max_neurons // max(1, len(batches)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for batch in tqdm(batches, desc="exfx calibrate: instrument", disable=_quiet(progress), leave=False):
            inputs, _ = _split(batch)
            recorder(probe, samples, per_batch, generator).run(*inputs)
    return samples


class _GainProbe(fx.Interpreter):
    """Interprets the analysed (pre-rewrite) graph with autograd, keeping each site's ReLU output."""

    def __init__(self, gm: fx.GraphModule, sites: set[str]) -> None:
        super().__init__(gm)
        self.sites = sites
        self.activations: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        site = n.meta.get("exfx", {}).get("site") if n.op == "call_function" and n.target is torch.relu else None
        if site in self.sites and isinstance(result, torch.Tensor):
            if not result.requires_grad:
                result = result.detach().requires_grad_()
            self.activations[site] = result
        return result


def _record_gains(model: torch.nn.Module, example_inputs: tuple[Any, ...], batches: Sequence[Batch],
                  samples: dict[str, _SiteSample], seed: int, progress: bool | None,
                  tracing: Mapping[str, Any] = MappingProxyType({})) -> None:
    """Fill each sample's ``gains``: the gradient of a random projection ``r . outputs`` at its neurons.

    Zeroing a neuron with activation ``a`` moves the outputs by about ``-a * J``;
    over random ``r``, ``E[(r . J a) ** 2] = |J a| ** 2``, so ``(gain * a) ** 2`` is a
    first-order estimate of the output energy a false prune costs, comparable
    across sites. Uses ``torch.autograd.grad``, so no parameter's ``.grad`` changes.
    On a graph that autograd cannot run, it logs a warning and leaves the gains
    empty (damage then falls back to each site's share of activation mass).
    """
    gm, _ = _analyse(model, example_inputs, Config(), **tracing)
    generator = torch.Generator().manual_seed(seed + 1)
    try:
        for index, batch in enumerate(tqdm(batches, desc="exfx calibrate: gains", disable=_quiet(progress),
                                           leave=False)):
            inputs, _ = _split(batch)
            with torch.enable_grad():
                probe = _GainProbe(gm, set(samples))
                leaves = [t for t in tree_leaves(probe.run(*inputs))
                          if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
                names = [name for name in samples if name in probe.activations]
                if not leaves or len(names) != len(samples):
                    raise RuntimeError("the outputs do not depend differentiably on every site")
                # drawn on the CPU generator, then moved: the same projection on any device
                projection = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum()
                                 for t in leaves)
                grads = torch.autograd.grad(projection, [probe.activations[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                picked = samples[name].picks[index]
                gain = torch.zeros(len(picked), dtype=torch.double) if grad is None else _on_cpu(grad, picked)
                samples[name].gains.append(gain.detach())
    except (RuntimeError, TypeError, ExfxError) as err:
        logger.warning("calibrate: no output gradients (%s); damage falls back to activation mass per site", err)
        for sample in samples.values():
            sample.gains.clear()


# ---------------------------------------------------------------------------
# 2. Pricing candidates
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    params: SiteParams
    saved: float  # FLOPs saved over the calibration data (extrapolated from the sample)
    damage: float  # harm of the false prunes, comparable across sites (see _SiteSample.harm and _harm_scales)


def _replay(stats: dict[int, dict[str, torch.Tensor]], positive: torch.Tensor, harm: torch.Tensor,
            sample: _SiteSample, params: SiteParams) -> tuple[float, float]:
    """Executed FLOPs per neuron and summed harm of the false prunes of ``params``, on the recorded neurons."""
    cut = enp_ops.cutoff(params.rule, params.param)
    active = torch.ones_like(positive, dtype=torch.bool)
    flops, done = 0.0, 0
    per_test = enp_ops.ZTEST_TEST_FLOPS if params.rule == "ztest" else enp_ops.THRESHOLD_TEST_FLOPS
    for k in params.samples:
        fraction = float(active.double().mean())
        flops += fraction * (k - done) * sample.cost_per_unit
        if params.rule == "ztest":
            flops += fraction * (k - done) * enp_ops.MOMENT_FLOPS_PER_TERM
        flops += fraction * per_test
        active &= ~(stats[k][params.rule] < cut)
        done = k
    flops += float(active.double().mean()) * (sample.fan_in - done) * sample.cost_per_unit
    return flops, float(harm[~active & (positive > 0)].sum())


def _candidates(sample: _SiteSample, schedules: Sequence[tuple[int, ...]], alphas: Sequence[float],
                rules: Sequence[str] = ("threshold", "ztest"), harm_scale: float = 1.0) -> list[_Candidate]:
    """Every candidate's FLOPs saved and damage; damage is the sample's harm of false prunes times ``harm_scale``."""
    stats, pre = sample.tensors()
    positive = pre.clamp_min(0.0)
    harm = sample.harm()
    dense = sample.fan_in * sample.cost_per_unit
    scale = sample.neurons
    out = [_Candidate(SiteParams(enabled=False), 0.0, 0.0)]
    for schedule in schedules:
        if schedule[-1] > sample.fan_in:
            continue
        first = stats[schedule[0]]["threshold"]
        finite = first[torch.isfinite(first)]
        thresholds = sorted({float(v) for v in torch.quantile(finite, torch.tensor(_THRESHOLD_QUANTILES,
                                                                                     dtype=finite.dtype))}
                            ) if finite.numel() else []
        options = [SiteParams(rule="threshold", threshold=t, samples=schedule) for t in thresholds
                   if "threshold" in rules]
        if schedule[0] >= 2 and "ztest" in rules:
            options += [SiteParams(rule="ztest", alpha=a, samples=schedule) for a in alphas]
        for params in options:
            flops, damage = _replay(stats, positive, harm, sample, params)
            out.append(_Candidate(params, (dense - flops) * scale, damage * harm_scale))
    return out


def _harm_scales(samples: Mapping[str, _SiteSample]) -> dict[str, float]:
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


# ---------------------------------------------------------------------------
# 3. Allocation
# ---------------------------------------------------------------------------


def _allocate(candidates: dict[str, list[_Candidate]], total: float, lam: float) -> dict[str, SiteParams]:
    return {name: max(options, key=lambda c: c.saved / total - lam * c.damage).params
            for name, options in candidates.items()}


_LAMBDA_GRID = tuple(math.exp(math.log(1e4) - i * math.log(1e8) / 400) for i in range(401))


def _allocation_path(candidates: dict[str, list[_Candidate]],
                     total: float) -> list[tuple[float, dict[str, SiteParams]]]:
    """Distinct allocations along a log grid of prices, from conservative (``lam`` 1e4) to aggressive (1e-4).

    An allocation that disables every site is left out: it is the baseline, already evaluated.
    """
    path: list[tuple[float, dict[str, SiteParams]]] = []
    for lam in _LAMBDA_GRID:
        allocation = _allocate(candidates, total, lam)
        if not any(params.enabled for params in allocation.values()):
            continue
        if not path or allocation != path[-1][1]:
            path.append((lam, allocation))
    return path


def _plan(signatures: dict[str, str], sites: Mapping[str, SiteParams] | None = None) -> Plan:
    """A plan for every structurally eligible site: ``sites``' parameters, and every other site disabled.

    A site the plan left out would get the default ``Config`` from :func:`exfx.compile`: untuned pruning.
    """
    params = {name: SiteParams(enabled=False) for name in signatures}
    params.update(sites or {})
    return Plan(sites=params, signatures=dict(signatures))


def _eligible_sites(model: torch.nn.Module, example_inputs: tuple[Any, ...], schedules: Sequence[tuple[int, ...]],
                    tracing: Mapping[str, Any] = MappingProxyType({})) -> tuple[list[Any], dict[str, str]]:
    """Sites that fit at least one schedule, and the signatures a plan for this model carries."""
    report = explain(model, example_inputs, **tracing)
    shortest = min(schedule[-1] for schedule in schedules)
    sites = [s for s in report.sites if s.structurally_eligible and (s.fan_in or 0) >= shortest]
    return sites, report.signatures


def _check_args(budget: float, schedules: Sequence[tuple[int, ...]]) -> float:
    """The budget as a Python float (numpy scalars too), after checking it and the schedules."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be an absolute metric drop in [0, 1), got {budget!r}")
    if not schedules:
        raise ValueError("schedules must name at least one checkpoint schedule")
    for schedule in schedules:
        SiteParams(samples=schedule)  # validates: positive, strictly increasing
    return float(budget)


def calibrate(model: torch.nn.Module, example_inputs: Any, data: Iterable[Batch], metric: Metric,
              budget: float = 0.001, config: Config | None = None, *,
              schedules: Sequence[tuple[int, ...]] = DEFAULT_SCHEDULES, alphas: Sequence[float] = DEFAULT_ALPHAS,
              max_evals: int = 10, max_neurons: int = 200_000, seed: int = 0, confidence: float | None = None,
              sensitivity: str = "gradient", progress: bool | None = None,
              tracing: Mapping[str, Any] | None = None) -> Plan:
    """The plan with the fewest executed FLOPs whose metric drop on ``data`` is at most ``budget``.

    Args:
        model: an eval-mode model.
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
        schedules: candidate checkpoint schedules (a site takes those that fit its fan-in; a site
            that fits none is disabled in the plan).
        alphas: candidate z-test levels.
        max_evals: at most this many full evaluations after the baseline (the binary search stops
            earlier once it has pinned the budget's edge on the path).
        max_neurons: neurons sampled per site by the instrumented pass.
        seed: seeds the neuron sample (and the bootstrap); same seed and data, same plan.
        confidence: if set (e.g. 0.95), a plan must also keep the upper
            ``confidence`` quantile of its drop under a paired bootstrap of the
            examples within ``budget``: a guard against a small calibration set
            that happens to hide flipped predictions. Default: the plain drop.
        sensitivity: how a false prune's damage is weighed across sites.
            ``"gradient"`` (default): first-order output energy, from one
            backward pass per batch of a random projection of the outputs, so
            a site whose errors the later layers amplify costs more.
            ``"mass"``: the pruned share of the site's own activation mass, the
            same at every site.
        progress: show tqdm bars (default: when attached to a terminal).
        tracing: the capture options of :func:`exfx.compile` (``leaf_modules``,
            ``concrete_args``, ``hidden_inputs``, ``capture``), used for every
            compile and analysis; compile the plan with the same ones.

    See the module docstring for the method. ``plan.meta["calibration"]`` holds
    ``evals`` (full evaluations, baseline included), ``seconds``, ``baseline``,
    ``score``, ``reduction`` (measured), ``budget`` and ``lam``.
    """
    return _calibrate(model, example_inputs, data, metric, (budget,), config, schedules, alphas, max_evals,
                      max_neurons, seed, confidence, sensitivity, progress, tracing)[0]


def calibrate_budgets(model: torch.nn.Module, example_inputs: Any, data: Iterable[Batch], metric: Metric,
                      budgets: Sequence[float], config: Config | None = None, *,
                      schedules: Sequence[tuple[int, ...]] = DEFAULT_SCHEDULES,
                      alphas: Sequence[float] = DEFAULT_ALPHAS, max_evals: int = 10, max_neurons: int = 200_000,
                      seed: int = 0, confidence: float | None = None, sensitivity: str = "gradient",
                      progress: bool | None = None, tracing: Mapping[str, Any] | None = None) -> dict[float, Plan]:
    """:func:`calibrate` for several budgets at once: budget -> plan, each as ``calibrate`` would return it.

    The baseline, the instrumented pass, the gains and the allocation path do not
    depend on the budget, so they are computed once; each budget then runs its own
    binary search along the same path, and a plan already evaluated for one budget
    is not evaluated again for another. Each plan is the one ``calibrate`` returns
    for that budget with the same arguments. Its ``meta["calibration"]`` holds the
    ``evals`` and ``seconds`` of the whole call (shared work is not split) and
    ``budgets``, all the budgets calibrated together.

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
    plans = _calibrate(model, example_inputs, data, metric, budgets, config, schedules, alphas, max_evals,
                       max_neurons, seed, confidence, sensitivity, progress, tracing)
    return {float(budget): plan for budget, plan in zip(budgets, plans)}


def _calibrate(model: torch.nn.Module, example_inputs: Any, data: Iterable[Batch], metric: Metric,
               budgets: tuple[float, ...], config: Config | None, schedules: Sequence[tuple[int, ...]],
               alphas: Sequence[float], max_evals: int, max_neurons: int, seed: int, confidence: float | None,
               sensitivity: str, progress: bool | None, tracing: Mapping[str, Any] | None) -> list[Plan]:
    started = time.perf_counter()
    traced = _tracing(tracing)
    budgets = tuple(_check_args(budget, schedules) for budget in budgets)
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an exfx.Config, got {type(config).__name__}")
    rules: tuple[str, ...] = ("threshold", "ztest") if config is None else (config.rule,)
    if config is not None:
        if tuple(schedules) != DEFAULT_SCHEDULES:
            raise ValueError("pass config (one rule and its schedule, config.samples) or schedules, not both")
        schedules = (tuple(config.samples),)
    starting_at_1 = [tuple(schedule) for schedule in schedules if schedule[0] < 2]
    if starting_at_1:
        raise ValueError(f"calibrate needs every schedule to start at 2 samples or more, got {starting_at_1}: the "
                         "instrumented pass records the z-test statistic (a sample variance) at every checkpoint")
    alphas = tuple(alphas)  # a numpy array too
    bad_alphas = [a for a in alphas if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a <= 0.5]
    if not alphas or bad_alphas:
        raise ValueError(f"alphas must be z-test levels in [0, 0.5], got {list(alphas)!r}")
    if max_evals < 2:
        raise ValueError(f"max_evals must be at least 2, got {max_evals!r}")
    if confidence is not None and not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")
    if sensitivity not in ("gradient", "mass"):
        raise ValueError(f"sensitivity must be 'gradient' or 'mass', got {sensitivity!r}")
    example_inputs = normalise_inputs(example_inputs)
    data = data if isinstance(data, (list, tuple)) else list(data)
    sites, signatures = _eligible_sites(model, example_inputs, schedules, traced)
    baseline = evaluate(exfx_compile(model, example_inputs, plan=_plan(signatures), **traced), data, metric,
                        desc="exfx calibrate: baseline", progress=progress)
    if not sites:
        return [_finish(_plan(signatures), baseline, baseline, 1, started, budget, math.inf, budgets)
                for budget in budgets]
    checkpoints = {s.name: tuple(sorted({k for sch in schedules if sch[-1] <= s.fan_in for k in sch})) for s in sites}
    samples = _instrument(model, example_inputs, data, sites, signatures, checkpoints, max_neurons, seed, progress,
                          traced)
    if sensitivity == "gradient":
        _record_gains(model, example_inputs, data, samples, seed, progress, traced)
    scales = _harm_scales(samples)
    candidates = {name: _candidates(sample, schedules, alphas, rules, scales[name]) for name, sample in samples.items()}

    path = _allocation_path(candidates, float(baseline.dense))
    logger.info("calibrate: %d sites, %d distinct allocations on the path", len(sites), len(path))
    evaluated: dict[int, tuple[Plan, Evaluation, float]] = {}  # path index -> plan, result, bounded drop

    def evaluate_at(index: int) -> tuple[Plan, Evaluation, float]:
        if index not in evaluated:
            lam, allocation = path[index]
            plan = _plan(signatures, allocation)
            result = evaluate(exfx_compile(model, example_inputs, plan=plan, **traced), data, metric,
                              desc=f"exfx calibrate: lam={lam:.3g}", progress=progress)
            drop = baseline.score - result.score
            if confidence is not None:
                drop = max(drop, drop_bound(metric, baseline, result, confidence, seed=seed))
            evaluated[index] = (plan, result, drop)
            bar.update(1)
        return evaluated[index]

    bar = tqdm(total=len(budgets) * min(max_evals, math.ceil(math.log2(len(path) + 1))),
               desc="exfx calibrate: search", disable=_quiet(progress), leave=False)
    found = [_binary_search(path, budget, max_evals, evaluate_at, baseline.score) for budget in budgets]
    bar.close()
    evals = 1 + len(evaluated)
    return [_finish(_plan(signatures), baseline, baseline, evals, started, budget, math.inf, budgets) if index is None
            else _finish(evaluated[index][0], baseline, evaluated[index][1], evals, started, budget, path[index][0],
                         budgets)
            for budget, index in zip(budgets, found)]


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


def _finish(plan: Plan, baseline: Evaluation, result: Evaluation, evals: int, started: float, budget: float,
            lam: float, budgets: tuple[float, ...] | None = None) -> Plan:
    plan = Plan(sites=dict(plan.sites), signatures=dict(plan.signatures), meta=dict(plan.meta))
    plan.meta["calibration"] = {
        "evals": evals, "seconds": time.perf_counter() - started, "baseline": baseline.score,
        "score": result.score, "reduction": result.reduction, "budget": budget,
        "lam": lam if math.isfinite(lam) else None,
    }
    if budgets is not None and len(budgets) > 1:
        plan.meta["calibration"]["budgets"] = list(budgets)
    return plan


def random_search(model: torch.nn.Module, example_inputs: Any, data: Iterable[Batch], metric: Metric,
                  budget: float = 0.001, *, evals: int = 120, schedules: Sequence[tuple[int, ...]] = DEFAULT_SCHEDULES,
                  seed: int = 0, progress: bool | None = None, tracing: Mapping[str, Any] | None = None) -> Plan:
    """Blind random search over per-site parameters (the baseline :func:`calibrate` is compared with).

    Each trial gives every site, independently: disabled (probability 0.2), or a
    random schedule with either the threshold rule (``T = -10**u``,
    ``u ~ U(-4, 1)``) or the z-test (``alpha ~ U(0, 0.5)``). Each trial is one full
    evaluation; the plan with the fewest executed FLOPs within ``budget`` wins.
    The arguments and ``plan.meta["calibration"]`` are as for :func:`calibrate`.
    """
    started = time.perf_counter()
    budget = _check_args(budget, schedules)
    traced = _tracing(tracing)
    example_inputs = normalise_inputs(example_inputs)
    data = data if isinstance(data, (list, tuple)) else list(data)
    sites, signatures = _eligible_sites(model, example_inputs, schedules, traced)
    baseline = evaluate(exfx_compile(model, example_inputs, plan=_plan(signatures), **traced), data, metric,
                        desc="exfx random search: baseline", progress=progress)
    rng = random.Random(seed)
    best: tuple[Plan, Evaluation] | None = None
    for _ in tqdm(range(evals), desc="exfx random search", disable=_quiet(progress), leave=False):
        plan = _plan(signatures, {s.name: _random_params(rng, s.fan_in, schedules) for s in sites})
        result = evaluate(exfx_compile(model, example_inputs, plan=plan, **traced), data, metric, progress=False)
        if baseline.score - result.score <= budget + 1e-12 and (best is None or result.executed < best[1].executed):
            best = (plan, result)
    if best is None:
        return _finish(_plan(signatures), baseline, baseline, evals + 1, started, budget, math.inf)
    return _finish(best[0], baseline, best[1], evals + 1, started, budget, math.inf)


def _random_params(rng: random.Random, fan_in: int, schedules: Sequence[tuple[int, ...]]) -> SiteParams:
    fitting = [s for s in schedules if s[-1] <= fan_in]
    if not fitting or rng.random() < 0.2:
        return SiteParams(enabled=False)
    schedule = rng.choice(fitting)
    if schedule[0] >= 2 and rng.random() < 0.5:
        return SiteParams(rule="ztest", alpha=rng.uniform(0.0, 0.5), samples=schedule)
    return SiteParams(rule="threshold", threshold=-(10 ** rng.uniform(-4, 1)), samples=schedule)
