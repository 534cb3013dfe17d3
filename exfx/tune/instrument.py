"""Instrumentation: one never-pruning pass that records, per site, what every candidate plan would see.

The probe is the analysed model compiled never-pruning (z-test at alpha 0) with
every candidate checkpoint. :class:`Recorder` interprets it over the calibration
data and keeps, for a seeded random sample of each site's neurons, both rules'
test statistics at every checkpoint and the true pre-activation at completion.
:func:`record_gains` then runs the analysed graph with autograd for the
first-order gain of the same neurons on the outputs. :mod:`.pricing` replays
candidate plans on these records offline.

Each batch draws its neuron sample and its output projection from its own
generator (:func:`batch_generator`), seeded by ``seed`` and the batch's index in
the whole data, so a batch records the same neurons whichever process reads it:
:mod:`.distributed` shards the batches over ranks and still gets one process's records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from exfx.analysis.opsets import activation_ceiling, is_site_activation
from exfx.api import Analysis
from exfx.config import RULES, SiteParams
from exfx.cost.model import SiteCost, op_arguments, site_cost
from exfx.errors import ExfxError
from exfx.meta import site_of
from exfx.ops import exit_statistic
from exfx.tune.evaluation import Batch, plan_for, quiet, split_batch

logger = logging.getLogger(__name__)

__all__ = ["SiteSample", "Recorder", "GainProbe", "instrument", "record_gains", "on_cpu", "batch_generator",
           "NEURON_STREAM", "PROJECTION_STREAM"]

#: The :func:`batch_generator` streams: the neuron sample, and the gains' random output projection.
NEURON_STREAM, PROJECTION_STREAM = 0, 1


def batch_generator(seed: int, batch: int, stream: int = NEURON_STREAM) -> torch.Generator:
    """A CPU generator for one batch, seeded by (``seed``, the batch's index in the whole data, ``stream``).

    What a batch draws depends on nothing read before it, so any split of the
    batches over processes draws the same numbers as one process reading them all.
    """
    word = np.random.SeedSequence((seed % 2**64, batch, stream)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(word))


@dataclass
class SiteSample:
    """What the instrumented pass saw at one site, for a sample of its neurons."""

    cost: SiteCost = SiteCost(fan_in=0, unit_flops=0)  # per-neuron costs, from the cost model
    neurons: int = 0  # all neurons seen, not just the sample
    checkpoints: dict[int, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    pre: list[torch.Tensor] = field(default_factory=list)
    picks: list[torch.Tensor] = field(default_factory=list)  # the sampled indices, one tensor per batch
    gains: list[torch.Tensor] = field(default_factory=list)  # d(r . outputs) / d(activation), per sampled neuron
    ceiling: float | None = None  # the upper bound t of a capped-ReLU site (ReLU6: clamp(pre, 0, t)); None: ReLU

    @property
    def fan_in(self) -> int:
        return self.cost.fan_in

    def tensors(self) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]:
        stats = {k: {rule: torch.cat(v) for rule, v in per_rule.items()} for k, per_rule in self.checkpoints.items()}
        return stats, torch.cat(self.pre)

    def harm(self) -> torch.Tensor:
        """Per sampled neuron, the harm of zeroing it: first-order output energy ``(gain * activation) ** 2``,
        or, without gains, its activation as a share of the site's activation mass."""
        positive = torch.cat(self.pre).clamp(0.0, self.ceiling)  # the activation a prune zeroes
        if self.gains:
            return (torch.cat(self.gains) * positive) ** 2
        mass = float(positive.sum())
        return positive / mass if mass > 0 else positive


def on_cpu(values: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The sampled neurons ``picked`` (flat indices, on the CPU) of ``values``, as float64 on the CPU.

    Recording moves every sample to the CPU, so pricing (quantiles, replays) runs
    there whatever the model's device.
    """
    return values.reshape(-1)[picked.to(values.device)].double().cpu()


class Recorder(fx.Interpreter):
    """Interprets a never-pruning compiled module with moments, sampling neurons at every site."""

    def __init__(self, gm: fx.GraphModule, samples: dict[str, SiteSample], per_batch: int,
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
            a = op_arguments(n.target, *self.fetch_args_kwargs_from_env(n))
            picked = self._pick(a["site"], a["state"][0].numel())
            per_rule = self.samples.setdefault(a["site"], SiteSample()).checkpoints.setdefault(
                a["count"], {r: [] for r in RULES})
            for rule in RULES:
                statistic = exit_statistic(a["state"], a["weight"], a["bias"], a["residual"], a["count"],
                                           a["fan_in"], rule)
                per_rule[rule].append(on_cpu(statistic, picked))
        elif n.target is torch.ops.exfx.complete.default:
            a = op_arguments(n.target, *self.fetch_args_kwargs_from_env(n))
            sample = self.samples.setdefault(a["site"], SiteSample())
            sample.cost = site_cost(a["x"], a["weight"], a["n_units"])
            sample.ceiling = next((activation_ceiling(user) for user in n.users), None)
            picked = self._pick(a["site"], result.numel())
            sample.pre.append(on_cpu(result, picked))
            sample.picks.append(picked)
            sample.neurons += result.numel()
        return result


def instrument(analysis: Analysis, data: Iterable[Batch], checkpoints: Mapping[str, tuple[int, ...]],
               max_neurons: int, seed: int, progress: bool | None = None,
               recorder: Callable[..., Recorder] = Recorder, *, first_batch: int = 0,
               total_batches: int | None = None) -> dict[str, SiteSample]:
    """Run the never-pruning probe over ``data``, recording each site's sampled neurons (``recorder`` builds
    the :class:`Recorder` of each batch; a subclass may record more, e.g. :mod:`benchmarks.predictor_frontier`).

    ``checkpoints`` maps each site to record to every checkpoint any candidate schedule uses. When ``data`` is
    one shard of a larger set, ``first_batch`` is the index of its first batch in the whole set and
    ``total_batches`` the set's length (default: ``data``'s); the records are then that shard's part of
    the whole set's."""
    # Never-pruning (alpha 0) at the searched sites, dense at the others, as in every trial.
    never = {name: SiteParams(rule="ztest", alpha=0.0, samples=ks) for name, ks in checkpoints.items()}
    probe = analysis.compile(plan_for(analysis.signatures, never), lowering="reference")
    samples: dict[str, SiteSample] = {}
    batches = list(data) if not isinstance(data, (list, tuple)) else data
    per_batch = max(1, max_neurons // max(1, total_batches or len(batches)))
    with torch.no_grad():
        for index, batch in enumerate(tqdm(batches, desc="exfx calibrate: instrument", disable=quiet(progress),
                                           leave=False)):
            inputs, _ = split_batch(batch)
            recorder(probe, samples, per_batch, batch_generator(seed, first_batch + index)).run(*inputs)
    return samples


class GainProbe(fx.Interpreter):
    """Interprets the analysed (pre-rewrite) graph with autograd, keeping each site's ReLU output."""

    def __init__(self, gm: fx.GraphModule, sites: set[str]) -> None:
        super().__init__(gm)
        self.sites = sites
        self.activations: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        site = site_of(n) if is_site_activation(n) else None
        if site in self.sites and isinstance(result, torch.Tensor):
            if not result.requires_grad:
                result = result.detach().requires_grad_()
            self.activations[site] = result
        return result


def record_gains(analysis: Analysis, batches: Sequence[Batch], samples: dict[str, SiteSample], seed: int,
                 progress: bool | None = None, *, first_batch: int = 0) -> None:
    """Fill each sample's ``gains``: the gradient of a random projection ``r . outputs`` at its neurons.

    Zeroing a neuron with activation ``a`` moves the outputs by about ``-a * J``;
    over random ``r``, ``E[(r . J a) ** 2] = |J a| ** 2``, so ``(gain * a) ** 2`` is a
    first-order estimate of the output energy a false prune costs, comparable
    across sites. Uses ``torch.autograd.grad``, so no parameter's ``.grad`` changes.
    On a graph that autograd cannot run, it logs a warning and leaves the gains
    empty (damage then falls back to each site's share of activation mass). ``first_batch``: as for
    :func:`instrument`.
    """
    gm = analysis.graph_module
    try:
        for index, batch in enumerate(tqdm(batches, desc="exfx calibrate: gains", disable=quiet(progress),
                                           leave=False)):
            inputs, _ = split_batch(batch)
            generator = batch_generator(seed, first_batch + index, PROJECTION_STREAM)
            with torch.enable_grad():
                probe = GainProbe(gm, set(samples))
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
                gain = torch.zeros(len(picked), dtype=torch.double) if grad is None else on_cpu(grad, picked)
                samples[name].gains.append(gain.detach())
    except (RuntimeError, TypeError, ExfxError) as err:
        logger.warning("calibrate: no output gradients (%s); damage falls back to activation mass per site", err)
        for sample in samples.values():
            sample.gains.clear()
