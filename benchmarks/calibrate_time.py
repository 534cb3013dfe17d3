"""Wall time of ``exfx.calibrate`` on the demo CNN and on VGG-11, and what it chose.

Run:  python -m benchmarks.calibrate_time [--models demo vgg11] [--threads 1] [--repeats 1]

It calls only ``exfx.calibrate`` with a model (the public API of every exfx
release), so the same script times two checkouts: run it with ``PYTHONPATH``
pointing at each and compare. Settings:

- ``demo``: the bundled SmallCNN, images 0-499 of the bundled 1,000, 1-point
  budget at 99% bootstrap confidence (what ``exfx demo`` runs);
- ``vgg11``: the reproduction table's VGG-11 (width 32; train it with the
  command ``benchmarks.exprune_table`` prints), its 5,000 validation images, 1-point
  budget at 99% confidence (the table's 1-point call).

Per repeat it prints the wall time, the number of full evaluations, the
calibration-data reduction and the plan's fingerprint plus a hash of its
parameters, so two checkouts can be checked to choose the same plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from typing import Any

import torch

import exfx
from benchmarks.exprune_table import BENCHMARKS, CONFIDENCE, parse_benchmark_args


def _demo() -> tuple[torch.nn.Module, tuple[Any, ...], list[Any], Any]:
    from exfx.demo import load_demo_images, load_demo_model

    x, y = load_demo_images()
    data = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 500, 100)]
    return load_demo_model(), (x[:8],), data, _accuracy


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(-1) == targets).float().mean().item()


def _vgg11() -> tuple[torch.nn.Module, tuple[Any, ...], list[Any], Any]:
    bench = BENCHMARKS["vgg11"]()
    return bench.model, bench.example_inputs, bench.val, bench.metric


TASKS = {"demo": _demo, "vgg11": _vgg11}


def time_calibrate(name: str, repeats: int) -> dict[str, Any]:
    model, example, data, metric = TASKS[name]()
    seconds, plan = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        plan = exfx.calibrate(model, example, data, metric, 0.01, confidence=CONFIDENCE, progress=False)
        seconds.append(time.perf_counter() - started)
    assert plan is not None
    sites = json.dumps({k: v.to_dict() for k, v in sorted(plan.sites.items())}, sort_keys=True)
    return {"model": name, "seconds": seconds, "median_s": statistics.median(seconds),
            "evals": plan.meta["calibration"]["evals"], "reduction": plan.meta["calibration"]["reduction"],
            "fingerprint": plan.fingerprint, "params_sha": hashlib.sha256(sites.encode()).hexdigest()[:12]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1)
    args = parse_benchmark_args(parser, argv)
    for name in args.models:
        result = time_calibrate(name, args.repeats)
        print(f"{exfx.__file__}: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
