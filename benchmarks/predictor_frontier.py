"""Which early-exit statistic predicts a neuron's sign best? Held-out FLOPs saved against damage, per variant.

Run:  python -m benchmarks.predictor_frontier [--models vgg11 resnet18 gcn opt] [--threads 1]

Why: at 1 point the table's plans recover 0.54-0.67 of the oracle on three models and 0.08 on the GCN.
What limits them is how well the first k of n terms predict the sign of the whole sum. This script
compares variants of the threshold rule's statistic on the footing :func:`exfx.calibrate` prices its
candidates on, with no full evaluation:

1. One instrumented pass of calibrate over the **validation** split: the same neuron sample, the same
   statistics at checkpoints 8, 16, 32 and 64, the same gains (output sensitivity).
2. Per variant, every site's candidates (every schedule, thresholds at quantiles of the statistic) are
   priced on the **even** batches, and calibrate's Lagrangian allocation is swept along its price grid.
3. Each allocation is priced again on the **odd** batches: held-out FLOPs saved, as a share of the sites'
   dense FLOPs, and damage, in calibrate's unit (the share of the model's first-order output energy that
   false prunes remove). calibrate's 1-point plans sit at a damage of about 0.01-0.03.

Variants (``m = S_k / k + shift / n``, the mean term, with ``shift`` the bias plus residual):

- ``paper``: prune when ``m < T``: exfx's threshold rule, the paper's.
- ``paper_both_rules``: each site takes the threshold rule or the z-test, as calibrate searches them.
- ``channel_scale``: prune when ``m / sigma_c < T``, with ``sigma_c`` the standard deviation over the even
  batches of the prediction error ``n m - z`` of the neuron's channel ``c`` (a static z-score).
- ``shift_weight``: prune when ``m + (w - 1) shift / n < T``, with ``w`` chosen per site from
  ``SHIFT_WEIGHTS``: a shrunken extrapolation of ``S_k`` (the best linear predictor of ``z`` from ``S_k``
  is ``shift + beta S_k`` with ``beta < n / k`` when ``S_k`` is noisy).
- ``importance_order`` (VGG-11 and the GCN, whose hidden layers form a chain): each hidden layer's units
  permuted, which leaves the function unchanged, so that the first k are those with the largest
  ``E[x_i ** 2] * sum_j (s_j W_ji) ** 2`` for the consuming layer (``s_j``: its BatchNorm scale).

Writes benchmarks/results/predictor_frontier/<model>.json (so models can be measured one command at a time,
or side by side), then benchmarks/results/predictor_frontier.md from every record present.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import exfx
from benchmarks.exprune_table import (RECORDS, RESULTS, Benchmark, benchmark_parser, measure_models,
                                      parse_benchmark_args, read_records)
from exfx.capture import normalise_inputs
from exfx.cost.model import op_arguments, site_cost
from exfx.ops.enp import bias_and_residual
from exfx.tune.calibration import DEFAULT_ALPHAS, DEFAULT_SCHEDULES
from exfx.tune.evaluation import tunable_sites
from exfx.tune.instrument import Recorder, SiteSample, instrument as instrument_sites, on_cpu, record_gains
from exfx.tune.pricing import LAMBDA_GRID, candidates, harm_scales, replay

logger = logging.getLogger("benchmarks.predictor_frontier")

DAMAGES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SHIFT_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
MAX_NEURONS = 200_000
OUT = RESULTS / "predictor_frontier"
#: the Lagrangian price grid of calibrate, every 4th price (the frontier's resolution)
PRICES = LAMBDA_GRID[::4]


# ---------------------------------------------------------------------------
# Recording: calibrate's instrumented pass, plus each sampled neuron's channel and shift / n
# ---------------------------------------------------------------------------


class _ChannelRecorder(Recorder):
    """calibrate's recorder; also keeps, per batch and site, the sampled neurons' channels and ``shift / n``."""

    def __init__(self, *args: Any, extras: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        super().__init__(*args)
        self.extras = extras

    def run_node(self, n: Any) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.exfx.complete.default:
            a = op_arguments(n.target, *self.fetch_args_kwargs_from_env(n))
            picked = self.index[a["site"]]
            shift = bias_and_residual(a["state"], a["weight"], a["bias"], a["residual"])
            shift_per_term = (torch.zeros(len(picked), dtype=torch.double) if shift is None
                              else on_cpu(torch.broadcast_to(shift, result.shape), picked))
            shift_per_term = shift_per_term / site_cost(a["x"], a["weight"], a["n_units"]).fan_in
            self.extras.setdefault(a["site"], []).append((channel_of(picked, result.shape, a["weight"].dim() == 2),
                                                          shift_per_term))
        return result


def channel_of(flat: torch.Tensor, shape: Sequence[int], linear: bool) -> torch.Tensor:
    """The output channel of each flat index into a site's output: last axis for linear, axis 1 for conv."""
    if linear:
        return flat % shape[-1]
    return (flat // math.prod(shape[2:])) % shape[1]


def instrument(bench: Benchmark, model: nn.Module) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, float]]:
    """Calibrate's instrumented pass and gains over the validation split: samples, extras, harm scales."""
    analysis = exfx.analyse(model, bench.example_inputs)
    checkpoints = {s.name: tuple(sorted({k for schedule in DEFAULT_SCHEDULES
                                         if schedule[-1] <= (s.fan_in or 0) for k in schedule}))
                   for s in tunable_sites(analysis, DEFAULT_SCHEDULES)}
    extras: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    samples = instrument_sites(analysis, bench.val, checkpoints, MAX_NEURONS, 0, None,
                               recorder=functools.partial(_ChannelRecorder, extras=extras))
    record_gains(analysis, bench.val, samples, 0, None)
    return samples, extras, harm_scales(samples)


# ---------------------------------------------------------------------------
# Variants: a transform of each batch's threshold statistic at checkpoint k
# ---------------------------------------------------------------------------

Transform = Callable[[torch.Tensor, int, int], torch.Tensor]  # (statistic, batch, k) -> statistic


def _subset(sample: Any, batches: Sequence[int], transform: Transform) -> Any:
    """The site sample restricted to ``batches``, with its threshold statistic transformed."""
    out = SiteSample(cost=sample.cost, neurons=sample.neurons)
    for k, per_rule in sample.checkpoints.items():
        out.checkpoints[k] = {"threshold": [transform(per_rule["threshold"][b], b, k) for b in batches],
                              "ztest": [per_rule["ztest"][b] for b in batches]}
    out.pre = [sample.pre[b] for b in batches]
    out.gains = [sample.gains[b] for b in batches]
    out.picks = [sample.picks[b] for b in batches]
    return out


def _identity(statistic: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    return statistic


def channel_scales(sample: Any, extras: list[Any], batches: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per checkpoint, each channel's sd of the prediction error ``n m - z`` over ``batches``, over its median.

    Channels with fewer than 5 sampled neurons get the median (scale 1).
    """
    channels = torch.cat([extras[b][0] for b in batches])
    pre = torch.cat([sample.pre[b] for b in batches])
    count = int(max(int(e[0].max()) for e in extras if e[0].numel())) + 1
    scales = {}
    for k, per_rule in sample.checkpoints.items():
        error = torch.cat([per_rule["threshold"][b] for b in batches]) * sample.fan_in - pre
        finite = torch.isfinite(error)
        seen = torch.bincount(channels[finite], minlength=count).double()
        mean = torch.bincount(channels[finite], weights=error[finite], minlength=count) / seen.clamp_min(1)
        square = torch.bincount(channels[finite], weights=error[finite] ** 2, minlength=count) / seen.clamp_min(1)
        sd = (square - mean ** 2).clamp_min(1e-12).sqrt()
        enough = seen >= 5
        median = sd[enough].median() if enough.any() else torch.tensor(1.0, dtype=sd.dtype)
        sd = torch.where(enough, sd, median)
        scales[k] = sd / median
    return scales


def variant_transforms(name: str, sample: Any, extras: list[Any], fit: Sequence[int]) -> list[Transform]:
    """The transforms a site may choose from under variant ``name``, fitted on the batches ``fit``."""
    if name in ("paper", "paper_both_rules", "importance_order"):
        return [_identity]
    if name == "channel_scale":
        scales = channel_scales(sample, extras, fit)
        return [lambda statistic, b, k: statistic / scales[k][extras[b][0]]]
    if name == "shift_weight":
        return [lambda statistic, b, k, w=w: statistic + (w - 1) * extras[b][1] for w in SHIFT_WEIGHTS]
    raise ValueError(f"unknown variant {name!r}")


Prepared = tuple[Any, dict[int, dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]


def _prepare(sample: Any) -> Prepared:
    """What :func:`exfx.tune.pricing.replay` reads of a sample, computed once: the sample, its statistics, the
    positive part of its pre-activations and its harm."""
    stats, pre = sample.tensors()
    return sample, stats, pre.clamp_min(0.0), sample.harm()


def _price(prepared: Prepared, params: Any) -> tuple[float, float]:
    """Executed FLOPs per neuron and the summed harm of the false prunes of ``params`` on a prepared sample."""
    sample, stats, positive, harm = prepared
    return replay(stats, positive, harm, sample, params)


def frontier(samples: dict[str, Any], extras: dict[str, list[Any]], scales: dict[str, float],
             variant: str) -> list[tuple[float, float]]:
    """(held-out damage, held-out share of the sites' FLOPs saved) along the price grid, for ``variant``."""
    batches = len(next(iter(samples.values())).pre)
    fit, held_out = list(range(0, batches, 2)), list(range(1, batches, 2))
    total = sum(s.cost.dense * s.neurons for s in samples.values())
    rules = ("threshold", "ztest") if variant == "paper_both_rules" else ("threshold",)
    options: dict[str, list[tuple[Prepared, Any]]] = {}  # per site: (held-out sample, candidate priced on fit)
    held_out_scale: dict[str, float] = {}  # harm of the held-out sample -> damage, in calibrate's unit
    for name, sample in samples.items():
        options[name] = []
        for transform in variant_transforms(variant, sample, extras[name], fit):
            priced = candidates(_subset(sample, fit, transform), DEFAULT_SCHEDULES, DEFAULT_ALPHAS, rules,
                                scales[name])
            held = _prepare(_subset(sample, held_out, transform))
            options[name] += [(held, candidate) for candidate in priced]
        held_out_scale[name] = scales[name] * sum(len(p) for p in sample.pre) / len(options[name][0][0][2])
    points = []
    for lam in PRICES:
        saved = damage = 0.0
        for name, choices in options.items():
            held, best = max(choices, key=lambda choice: choice[1].saved / total - lam * choice[1].damage)
            if not best.params.enabled:
                continue
            flops, harm = _price(held, best.params)
            sample = held[0]
            saved += (sample.cost.dense - flops) * sample.neurons
            damage += harm * held_out_scale[name]
        points.append((damage, saved / total))
    return points


def saved_within(points: list[tuple[float, float]], damage: float) -> float:
    return max([saved for spent, saved in points if spent <= damage] or [0.0])


# ---------------------------------------------------------------------------
# Importance order: permute hidden units (function-preserving) for chain models
# ---------------------------------------------------------------------------


def _bn_scale(norm: nn.Module | None, rows: int) -> torch.Tensor:
    if norm is None:
        return torch.ones(rows, dtype=torch.double)
    return (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().double()


def _input_second_moments(model: nn.Module, consumers: list[nn.Module], bench: Benchmark) -> list[torch.Tensor]:
    """``E[x_i ** 2]`` of each consumer's input units, over the first 8 validation batches."""
    sums: list[Any] = [0.0] * len(consumers)

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().double()
            dims = [0, 2, 3] if x.dim() == 4 else list(range(x.dim() - 1))
            sums[index] = sums[index] + (x ** 2).mean(dim=dims)
        return record

    handles = [consumer.register_forward_hook(hook(i)) for i, consumer in enumerate(consumers)]
    with torch.no_grad():
        for inputs, _ in bench.val[:8]:
            model(*normalise_inputs(inputs))
    for handle in handles:
        handle.remove()
    return [s / 8 for s in sums]


def _permute(producer: nn.Module, norm: nn.Module | None, consumer: nn.Module, order: torch.Tensor) -> None:
    producer.weight.data = producer.weight.data[order]
    if producer.bias is not None:
        producer.bias.data = producer.bias.data[order]
    if norm is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).data = getattr(norm, name).data[order]
    consumer.weight.data = consumer.weight.data[:, order]


def importance_ordered(bench: Benchmark) -> nn.Module | None:
    """A copy of the model whose hidden units come in decreasing importance; None where not a chain."""
    model = copy.deepcopy(bench.model)
    if bench.name == "vgg11":
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
        links = [(convs[i], norms[i], convs[i + 1], norms[i + 1]) for i in range(len(convs) - 1)]
    elif bench.name == "gcn":
        producers = [(model.embed, None)] + [(layer.linear, layer.norm) for layer in model.layers[:-1]]
        links = [(p, n, layer.linear, layer.norm) for (p, n), layer in zip(producers, model.layers)]
    else:
        return None
    moments = _input_second_moments(model, [consumer for _, _, consumer, _ in links], bench)
    for (producer, norm, consumer, consumer_norm), second_moment in zip(links, moments):
        weight = consumer.weight.detach().double()
        weight = weight * _bn_scale(consumer_norm, weight.shape[0]).view(-1, *([1] * (weight.dim() - 1)))
        column_energy = (weight ** 2).sum(dim=[d for d in range(weight.dim()) if d != 1])
        _permute(producer, norm, consumer, torch.argsort(second_moment * column_energy, descending=True))
    return model


# ---------------------------------------------------------------------------


def plan_damage(samples: dict[str, Any], scales: dict[str, float], plan: exfx.Plan) -> float:
    """A plan's damage on the whole validation sample, in calibrate's unit (its pricing of the plan)."""
    return sum(_price(_prepare(sample), plan.sites[name])[1] * scales[name]
               for name, sample in samples.items() if plan.sites[name].enabled)


def table_plans_damage(bench: Benchmark, samples: dict[str, Any], scales: dict[str, float]) -> dict[str, float]:
    """The damage of the reproduction table's 0.1- and 1-point plans, where its record exists."""
    path = RECORDS / f"{bench.name}.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return {key: plan_damage(samples, scales, exfx.Plan.from_dict(record[f"plan_{key}"])) for key in ("0p1", "1p0")}


def measure(bench: Benchmark) -> dict[str, Any]:
    """The model's record: one row per variant, with the held-out savings at each damage level."""
    rows = []
    samples, extras, scales = instrument(bench, bench.model)
    table_damage = table_plans_damage(bench, samples, scales)
    for variant in ("paper", "paper_both_rules", "channel_scale", "shift_weight"):
        points = frontier(samples, extras, scales, variant)
        rows.append({"model": bench.name, "variant": variant,
                     "saved": {f"{d:g}": saved_within(points, d) for d in DAMAGES}})
        if variant == "paper" and table_damage:
            rows[-1]["table_plans_damage"] = table_damage
        logger.info("%s %s: %s", bench.name, variant, rows[-1]["saved"])
    ordered = importance_ordered(bench)
    if ordered is not None:
        samples, extras, scales = instrument(bench, ordered)
        points = frontier(samples, extras, scales, "importance_order")
        rows.append({"model": bench.name, "variant": "importance_order",
                     "saved": {f"{d:g}": saved_within(points, d) for d in DAMAGES}})
        logger.info("%s importance_order: %s", bench.name, rows[-1]["saved"])
    return {"model": bench.name, "rows": rows}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | " + " | ".join(f"damage ≤ {d:g}" for d in DAMAGES) + " |",
             "|---|---|" + "---|" * len(DAMAGES)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['variant']} | "
                     + " | ".join(f"{100 * row['saved'][f'{d:g}']:.1f}%" for d in DAMAGES) + " |")
    lines += ["", "- Held-out share of the sites' dense FLOPs saved within each damage level (see "
              "`benchmarks/predictor_frontier.py`): candidates priced and allocated on the even validation "
              "batches, measured on the odd ones. Threshold rule only, except `paper_both_rules`."]
    lines += [f"- {row['model']}: the reproduction table's plans cost damage {row['table_plans_damage']['0p1']:.2g} "
              f"(0.1 pt) and {row['table_plans_damage']['1p0']:.2g} (1 pt) on the whole validation sample"
              for row in rows if "table_plans_damage" in row]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_benchmark_args(benchmark_parser(__doc__), argv)
    measure_models(args.models, OUT, measure, "comparing early-exit statistics on")
    text = markdown([row for record in read_records(OUT) for row in record["rows"]])
    (RESULTS / "predictor_frontier.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
