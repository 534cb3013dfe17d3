"""The ExPrune reproduction table: FLOP reduction on the test set, with plans selected on validation.

Run:  python -m benchmarks.exprune_table [--models vgg11 resnet18] [--search-factor 10]

For each benchmark model whose checkpoint exists (train it with the command it
prints), it measures:

- the baseline **test** metric and the dense FLOPs per example;
- ``exfx.calibrate`` on the **validation** split at budgets 0.001 (0.1 point)
  and 0.01 (1 point), then the FLOP reduction and metric drop of that plan on
  the **test** split;
- the oracle bound on the test split: every truly non-positive neuron stops at
  the first checkpoint calibration may use (8 units), with no loss;
- calibration wall time and full evaluations;
- the random-search baseline at the 1-point budget, with ``--search-factor``
  times calibrate's evaluations, also selected on validation and reported on test;
- the paper's published range beside each.

Selection never sees the test split: :func:`select_plan` takes only the
validation batches, and the test batches only reach :func:`exfx.calibrate.evaluate`
of plans already chosen.

Writes benchmarks/results/exprune.json (one record per model) and
benchmarks/results/exprune.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import exfx
from exfx.calibrate import DEFAULT_SCHEDULES, Evaluation, evaluate, oracle

logger = logging.getLogger("benchmarks.exprune_table")

RESULTS = Path(__file__).parent / "results"
ORACLE_SAMPLES = min(schedule[0] for schedule in DEFAULT_SCHEDULES)
#: The paper's v1 abstract, over its four models: FLOP reduction at negligible (<= 0.1 point) and <= 1 point drop.
PAPER = {"reduction_0p1": (0.1098, 0.263), "reduction_1p0": (0.2101, 0.3905)}


@dataclass
class Benchmark:
    """A trained model, its example inputs, validation and test batches, and its metric."""

    name: str
    model: torch.nn.Module
    example_inputs: tuple[Any, ...]
    val: list[Any]
    test: list[Any]
    metric: Callable[[Any, Any], float]
    metric_name: str
    note: str = ""


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(-1) == targets).float().mean().item()


def _cv(name: str, width: int) -> Callable[[], Benchmark]:
    def load() -> Benchmark:
        from benchmarks.data import batches, load_fashion_mnist
        from benchmarks.models import MODELS, build_model
        from benchmarks.train_cv import CHECKPOINTS

        path = CHECKPOINTS / f"{name}-w{width}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; train it with "
                                    f"`python -m benchmarks.train_cv --model {name} --width {width}`")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(name, width)
        model.load_state_dict(checkpoint["state_dict"])
        side = MODELS[name][1]
        data = load_fashion_mnist()
        val, test = batches(*data.val, 250, side), batches(*data.test, 250, side)
        note = f"Fashion-MNIST, base width {width} (the paper's is 64: narrowed to train on 2 CPU cores)"
        return Benchmark(name, model.eval(), (val[0][0][:8],), val, test, accuracy, "accuracy", note)

    return load


BENCHMARKS: dict[str, Callable[[], Benchmark]] = {
    "vgg11": _cv("vgg11", 32),
    "resnet18": _cv("resnet18", 32),
}


def select_plan(bench: Benchmark, budget: float) -> exfx.Plan:
    """Calibrate on the validation split only."""
    return exfx.calibrate(bench.model, bench.example_inputs, bench.val, bench.metric, budget)


def search_plan(bench: Benchmark, budget: float, evals: int) -> exfx.Plan:
    """The random-search baseline, on the validation split only."""
    return exfx.random_search(bench.model, bench.example_inputs, bench.val, bench.metric, budget, evals=evals)


def _on_test(bench: Benchmark, plan: exfx.Plan) -> Evaluation:
    return evaluate(exfx.compile(bench.model, bench.example_inputs, plan=plan), bench.test, bench.metric)


def measure(bench: Benchmark, search_factor: int) -> dict[str, Any]:
    started = time.perf_counter()
    examples = sum(len(t) for _, t in bench.test)
    baseline = evaluate(bench.model, bench.test, bench.metric)
    record: dict[str, Any] = {"model": bench.name, "metric": bench.metric_name, "baseline": baseline.score,
                              "dense_flops": baseline.dense / examples, "note": bench.note}
    for budget, key in ((0.001, "0p1"), (0.01, "1p0")):
        plan = select_plan(bench, budget)
        result = _on_test(bench, plan)
        record[f"reduction_{key}"] = result.reduction
        record[f"drop_{key}"] = baseline.score - result.score
        record[f"calib_seconds_{key}"] = plan.meta["calibration"]["seconds"]
        record[f"calib_evals_{key}"] = plan.meta["calibration"]["evals"]
        record[f"plan_{key}"] = plan.to_dict()
    record["calib_seconds"] = record["calib_seconds_1p0"]
    record["calib_evals"] = record["calib_evals_1p0"]
    record["oracle"] = oracle(bench.model, bench.example_inputs, bench.test, bench.metric,
                              samples=ORACLE_SAMPLES).reduction
    searched = search_plan(bench, 0.01, evals=search_factor * record["calib_evals"])
    found = _on_test(bench, searched)
    record.update(search_evals=searched.meta["calibration"]["evals"], search_reduction_1p0=found.reduction,
                  search_drop_1p0=baseline.score - found.score,
                  search_seconds=searched.meta["calibration"]["seconds"])
    record["seconds"] = time.perf_counter() - started
    return record


def markdown(records: list[dict[str, Any]]) -> str:
    lo1, hi1 = PAPER["reduction_0p1"]
    lo2, hi2 = PAPER["reduction_1p0"]
    lines = [
        "| model | metric (test) | dense MFLOPs/example | reduction, ≤0.1 pt (drop) | reduction, ≤1 pt (drop) "
        "| oracle | ≤1 pt / oracle | calibrate: s, evals | random search ≤1 pt: reduction, evals |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['metric']} {100 * r['baseline']:.2f}% | {r['dense_flops'] / 1e6:.1f} "
            f"| {100 * r['reduction_0p1']:.1f}% ({100 * r['drop_0p1']:+.2f}) "
            f"| {100 * r['reduction_1p0']:.1f}% ({100 * r['drop_1p0']:+.2f}) | {100 * r['oracle']:.1f}% "
            f"| {r['reduction_1p0'] / r['oracle'] if r['oracle'] else 0:.2f} "
            f"| {r['calib_seconds']:.0f} s, {r['calib_evals']} "
            f"| {100 * r['search_reduction_1p0']:.1f}% ({100 * r['search_drop_1p0']:+.2f}), {r['search_evals']} |")
    lines.append(f"| paper (4 models) | | | {100 * lo1:.1f}–{100 * hi1:.1f}% | {100 * lo2:.1f}–{100 * hi2:.1f}% "
                 f"| | | hours (2,000 Optuna trials) | |")
    notes = sorted({r["note"] for r in records if r.get("note")})
    lines += [""] + [f"- {note}" for note in notes]
    lines.append("- Drops are test-set metric drops in points (positive: worse). Plans are selected on the "
                 "validation split only; FLOPs count 2 per multiply-add with the early-exit test overhead.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--search-factor", type=int, default=10,
                        help="random search gets this many times calibrate's evaluations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    records = []
    for name in args.models:
        try:
            bench = BENCHMARKS[name]()
        except FileNotFoundError as err:
            logger.warning("skipping %s: %s", name, err)
            continue
        logger.info("measuring %s", name)
        records.append(measure(bench, args.search_factor))
        logger.info("%s: %s", name, {k: v for k, v in records[-1].items() if not k.startswith("plan_")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "exprune.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records)
    (RESULTS / "exprune.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
