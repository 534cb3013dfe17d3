"""Pareto plots for the reproduction table: test metric against executed FLOPs, both rules, the oracle point.

Run after the table:  python -m benchmarks.exprune_pareto [--models vgg11 ...] [--threads N]

For each model in benchmarks/results/exprune.json it sweeps each rule uniformly
over all sites (descriptive curves, nothing is selected here), and marks the
dense model, the table's two calibrated plans and the oracle bound, all on the
test split. Writes benchmarks/results/pareto_<model>.png.
"""

from __future__ import annotations

import argparse
import json

import torch

import exfx
from benchmarks.exprune_table import BENCHMARKS, ORACLE_SAMPLES, RESULTS
from exfx.tune import pareto
from exfx.tune.evaluation import evaluate, oracle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every model in exprune.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = json.loads((RESULTS / "exprune.json").read_text())
    for record in records:
        if args.models is not None and record["model"] not in args.models:
            continue
        bench = BENCHMARKS[record["model"]]()
        examples = sum(len(t) for _, t in bench.test)
        analysis = exfx.analyse(bench.model, bench.example_inputs)  # once: both plans, the oracle and the sweep
        points = {"dense": evaluate(bench.model, bench.test, bench.metric)}
        labels = (("0p1", "calibrated, ≤0.1 pt on validation"), ("1p0", "calibrated, ≤1 pt on validation"))
        for key, label in labels:
            plan = exfx.Plan.from_dict(record[f"plan_{key}"])
            points[label] = evaluate(analysis.compile(plan), bench.test, bench.metric)
        points["oracle bound"] = oracle(analysis, None, bench.test, bench.metric, samples=ORACLE_SAMPLES)
        curves = pareto.sweep(analysis, None, bench.test, bench.metric)
        path = RESULTS / f"pareto_{record['model']}.png"
        pareto.plot(path, f"exfx: {record['model']}, test split", curves, points, examples,
                    f"test {record['metric']}")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
