"""The lossless ``exact`` rule on the trained VGG-11: FLOPs it saves alone, on top of the calibrated 0.1-point plan,
against the oracle, and against SnaPEA's exact mode.

Run:  python -m benchmarks.exact_rule [--threads 1] [--snapea-images 1000] [--select-images 1000]

What it measures (FLOP reductions: executed FLOPs, 2 per multiply-add, decision overhead included, on the
**test** split unless said otherwise):

- ``exact`` alone: ``rule="exact"`` at every conv site (every site's input is proven non-negative). Its
  schedule, one of :data:`SCHEDULES` (late checkpoints: the bound proves little before the last 1/16 of
  the fan-in), is chosen on the first ``--select-images`` validation images; it costs no accuracy, so no
  guard is needed.
- its share of the oracle (:func:`exfx.tune.evaluation.oracle`, 8 units: every truly non-positive neuron
  stops after 8 units at no test cost).
- the calibrated 0.1-point plan of the reproduction table (``benchmarks/results/records/vgg11.json``), and
  the same plan with exact added: ``exact=True`` with the chosen schedule as ``exact_samples`` at its enabled
  sites, ``rule="exact"`` at the sites it disabled. The predictions must not change (it checks).
- SnaPEA's exact mode: per output neuron, the weights are ordered positive first, then the negative ones
  by decreasing magnitude; with ``x >= 0`` the running sum (bias included) can only fall once the positive
  terms are in, so the neuron stops at the first negative running sum. Its FLOPs (a compare per negative
  term processed included) are counted exactly on the first ``--snapea-images`` test images, beside exfx's
  exact rule on the same images.

Writes benchmarks/results/exact_rule.json and prints the table (also benchmarks/results/exact_rule.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

import exfx
from benchmarks.exprune_table import BENCHMARKS, ORACLE_SAMPLES, RECORDS, RESULTS, Benchmark
from exfx.cost.model import op_arguments
from exfx.tune.evaluation import Evaluation, evaluate, oracle

logger = logging.getLogger("benchmarks.exact_rule")

#: Candidate exact schedules, as functions of a site's fan-in ``n``: checkpoints late in the sum.
SCHEDULES: dict[str, Callable[[int], tuple[int, ...]]] = {
    "15/16, 31/32": lambda n: (n - n // 16, n - n // 32),
    "15/16, 63/64": lambda n: (n - n // 16, n - n // 64),
    "7/8, 15/16, 31/32": lambda n: (n - n // 8, n - n // 16, n - n // 32),
}


def _checkpoints(schedule: Callable[[int], tuple[int, ...]], n: int) -> tuple[int, ...]:
    return tuple(sorted({k for k in schedule(n) if 1 <= k < n})) or (max(1, n - 1),)


def exact_plan(analysis: exfx.Analysis, schedule: Callable[[int], tuple[int, ...]]) -> exfx.Plan:
    """``rule="exact"`` with ``schedule`` at every site where it is available; every other site disabled."""
    sites = {s.name: exfx.SiteParams(rule="exact", samples=_checkpoints(schedule, s.fan_in or 1))
             if s.exact_available else exfx.SiteParams(enabled=False) for s in analysis.sites if s.eligible}
    return exfx.Plan(sites=sites, signatures=analysis.signatures)


def with_exact(plan: exfx.Plan, analysis: exfx.Analysis, schedule: Callable[[int], tuple[int, ...]]) -> exfx.Plan:
    """``plan`` with the exact test added late at every site where it is available (``rule="exact"`` where the
    plan disabled the site)."""
    sites = dict(plan.sites)
    for site in analysis.sites:
        if not (site.eligible and site.exact_available):
            continue
        late = _checkpoints(schedule, site.fan_in or 1)
        params = sites.get(site.name)
        if params is None or not params.enabled:
            sites[site.name] = exfx.SiteParams(rule="exact", samples=late)
        else:
            extra = tuple(k for k in late if k > params.samples[-1])
            sites[site.name] = replace(params, exact=True, exact_samples=extra or params.samples)
    return exfx.Plan(sites=sites, signatures=dict(plan.signatures), meta=dict(plan.meta))


# ---------------------------------------------------------------------------
# SnaPEA's exact mode
# ---------------------------------------------------------------------------


def snapea_conv_counts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                       padding: list[int], dilation: list[int]) -> tuple[int, int, int]:
    """(executed multiply-adds, sign checks, dense multiply-adds) of one ungrouped conv2d under SnaPEA's exact
    mode (see module docstring): a sign check follows every negative term processed."""
    kernel = list(weight.shape[2:])
    patches = F.unfold(x, kernel, dilation, padding, stride)  # (N, C*K, L)
    executed = checks = 0
    for o in range(weight.shape[0]):
        w = weight[o].flatten()
        positive = torch.nonzero(w >= 0).flatten()
        negative = torch.nonzero(w < 0).flatten()
        negative = negative[torch.argsort(w[negative])]  # most negative first
        start = torch.einsum("ncl,c->nl", patches[:, positive], w[positive])
        if bias is not None:
            start = start + bias[o]
        running = start.unsqueeze(1) + torch.cumsum(patches[:, negative] * w[negative].view(1, -1, 1), 1)
        below = running < 0
        processed = torch.where(below.any(1), below.int().argmax(1) + 1, negative.numel())
        processed = torch.where(start < 0, 0, processed)  # the positive part alone is already negative
        executed += positive.numel() * start.numel() + int(processed.sum())
        checks += int(processed.sum())
    return executed, checks, weight[0].numel() * weight.shape[0] * patches.shape[0] * patches.shape[2]


class _SiteInputs(fx.Interpreter):
    """Runs a never-pruning compiled module; hands every site's producer operands to ``visit``."""

    def __init__(self, gm: fx.GraphModule, visit: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(gm)
        self.visit = visit

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.exfx.complete.default:
            self.visit(op_arguments(n.target, *self.fetch_args_kwargs_from_env(n)))
        return result


def snapea(analysis: exfx.Analysis, batches: list[Any]) -> tuple[int, int, int]:
    """SnaPEA exact mode over ``batches``, for the whole model (non-site layers dense): FLOPs saved on
    multiply-adds, FLOPs of its sign checks (one per negative term processed), dense FLOPs."""
    never = analysis.compile(exfx.Config(threshold=-math.inf, samples=1))
    saved = checks = dense_total = 0

    def visit(a: dict[str, Any]) -> None:
        nonlocal saved, checks
        if a["residual"] is not None or a["groups"] != 1 or a["weight"].dim() != 4:
            raise ValueError(f"site {a['site']}: this SnaPEA count handles plain conv2d sites only")
        executed, tests, dense = snapea_conv_counts(a["x"], a["weight"], a["bias"], a["stride"], a["padding"],
                                                    a["dilation"])
        saved += 2 * (dense - executed)
        checks += tests

    with torch.no_grad():
        for inputs, _ in batches:
            _SiteInputs(never, visit).run(inputs)
            dense_total += exfx.count_flops(analysis.graph_module, inputs).executed
    return saved, checks, dense_total


# ---------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------


def _predictions_changed(a: Evaluation, b: Evaluation) -> int:
    return int((a.outputs.argmax(-1) != b.outputs.argmax(-1)).sum())


def measure(bench: Benchmark, snapea_images: int, select_images: int) -> dict[str, Any]:
    started = time.perf_counter()
    analysis = exfx.analyse(bench.model, bench.example_inputs)
    refused = {s.name: s.exact_reason for s in analysis.sites if s.eligible and not s.exact_available}
    record: dict[str, Any] = {"model": bench.name, "sites": [s.name for s in analysis.sites if s.eligible],
                              "refused": refused}
    select = bench.val[: max(1, select_images // len(bench.val[0][1]))]
    choice = {}
    for label, schedule in SCHEDULES.items():
        choice[label] = evaluate(analysis.compile(exact_plan(analysis, schedule)), select, bench.metric).reduction
        logger.info("exact %s on %d validation images: %.4f", label, select_images, choice[label])
    label = max(choice, key=lambda key: choice[key])
    schedule = SCHEDULES[label]
    record.update(schedule=label, validation_reductions=choice)

    dense = evaluate(bench.model, bench.test, bench.metric)
    bound = oracle(analysis, bench.example_inputs, bench.test, bench.metric, samples=ORACLE_SAMPLES)
    exact = evaluate(analysis.compile(exact_plan(analysis, schedule)), bench.test, bench.metric)
    record.update(dense_accuracy=dense.score, oracle=bound.reduction, exact=exact.reduction,
                  exact_accuracy=exact.score, exact_share=exact.reduction / bound.reduction,
                  exact_changed=_predictions_changed(dense, exact))

    stored = json.loads((RECORDS / f"{bench.name}.json").read_text())
    plan = exfx.Plan.from_dict(stored["plan_0p1"])
    calibrated = evaluate(analysis.compile(plan), bench.test, bench.metric)
    combined = evaluate(analysis.compile(with_exact(plan, analysis, schedule)), bench.test, bench.metric)
    record.update(plan=calibrated.reduction, plan_accuracy=calibrated.score, plan_exact=combined.reduction,
                  plan_exact_accuracy=combined.score, plan_exact_changed=_predictions_changed(calibrated, combined))
    if combined.score != calibrated.score or record["plan_exact_changed"]:
        raise AssertionError(f"adding the exact rule changed {record['plan_exact_changed']} predictions")

    subset = bench.test[: max(1, snapea_images // len(bench.test[0][1]))]
    images = sum(len(t) for _, t in subset)
    saved, checks, dense_flops = snapea(analysis, subset)
    on_subset = evaluate(analysis.compile(exact_plan(analysis, schedule)), subset, bench.metric)
    record.update(snapea_images=images, snapea=(saved - checks) / dense_flops,
                  snapea_without_checks=saved / dense_flops, exact_on_snapea_images=on_subset.reduction,
                  seconds=time.perf_counter() - started)
    return record


def markdown(r: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    rows = [
        "| configuration | FLOP reduction (test) | share of oracle | test accuracy | predictions changed |",
        "|---|---|---|---|---|",
        f"| dense | 0.00% | - | {pct(r['dense_accuracy'])} | - |",
        f"| oracle (first 8 units, no test cost) | {pct(r['oracle'])} | 1.00 | {pct(r['dense_accuracy'])} | 0 |",
        f"| exact alone ({r['schedule']} of the fan-in) | {pct(r['exact'])} | {r['exact_share']:.3f} "
        f"| {pct(r['exact_accuracy'])} | {r['exact_changed']} vs dense |",
        f"| calibrated 0.1-point plan | {pct(r['plan'])} | {r['plan'] / r['oracle']:.3f} "
        f"| {pct(r['plan_accuracy'])} | - |",
        f"| calibrated 0.1-point plan + exact | {pct(r['plan_exact'])} | {r['plan_exact'] / r['oracle']:.3f} "
        f"| {pct(r['plan_exact_accuracy'])} | {r['plan_exact_changed']} vs the plan |",
        f"| SnaPEA exact mode (first {r['snapea_images']} test images) | {pct(r['snapea'])} "
        f"| {r['snapea'] / r['oracle']:.3f} | (lossless) | 0 |",
        f"| SnaPEA exact mode, sign checks not counted | {pct(r['snapea_without_checks'])} "
        f"| {r['snapea_without_checks'] / r['oracle']:.3f} | (lossless) | 0 |",
        f"| exfx exact alone, same {r['snapea_images']} images | {pct(r['exact_on_snapea_images'])} | - | - | - |",
    ]
    notes = [
        "",
        f"- {r['model']}: FLOP reductions count executed FLOPs (2 per multiply-add, decision overhead included: "
        "the exact rule's bound and tests, SnaPEA's compare per negative term). Schedule chosen on validation: "
        + ", ".join(f"{k}: {pct(v)}" for k, v in r["validation_reductions"].items()) + ".",
        f"- Sites where the analysis refused exact: {r['refused'] or 'none'}.",
    ]
    return "\n".join(rows + notes) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--snapea-images", type=int, default=1000, help="test images SnaPEA's FLOPs are counted on")
    parser.add_argument("--select-images", type=int, default=1000, help="validation images that pick the schedule")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    record = measure(BENCHMARKS["vgg11"](), args.snapea_images, args.select_images)
    (RESULTS / "exact_rule.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    (RESULTS / "exact_rule.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
