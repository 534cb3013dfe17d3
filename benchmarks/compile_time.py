"""Compile time and reference-execution overhead of exfx on a CIFAR-style ResNet-18.

Run:  python -m benchmarks.compile_time [--repeats 5] [--batch 64]

Prints, as medians over repeated runs in this process:
- ``exfx.compile`` wall time (capture + passes + rewrite, no calibration); target < 2 s;
- the compiled module's (reference, masked) execution time relative to dense eager
  PyTorch at batch 64, for the threshold rule and the z-test; target <= 2.5x.

The ratio is measured in the same run, alternating dense and compiled calls so
that machine noise hits both. Random weights: the timing does not depend on them
beyond the pruned fraction, which is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import exfx
from exfx.examples import ResNet18


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18().eval()
    example = torch.randn(2, 3, 32, 32)
    x = torch.randn(args.batch, 3, 32, 32)
    print(f"ResNet-18 (CIFAR, width 64), torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch}, median of {args.repeats}")

    exfx.compile(model, (example,))  # warm-up: imports, op registration
    compile_s, compile_all = _median_time(lambda: exfx.compile(model, (example,)), args.repeats)
    print(f"compile time: {compile_s:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in compile_all)}; target < 2 s)")

    configs = {"threshold T=0, k=32": exfx.Config(), "ztest alpha=0.05, k=32": exfx.Config(rule="ztest", alpha=0.05)}
    with torch.no_grad():
        for label, config in configs.items():
            compiled = exfx.compile(model, (example,), config)
            model(x), compiled(x)  # warm-up
            dense_t, compiled_t = [], []
            for _ in range(args.repeats):
                dense_t.append(_median_time(lambda: model(x), 1)[0])
                compiled_t.append(_median_time(lambda: compiled(x), 1)[0])
            dense, comp = statistics.median(dense_t), statistics.median(compiled_t)
            flops = exfx.count_flops(compiled, x)
            spread = (max(dense_t) - min(dense_t)) / dense
            print(f"{label:<24} dense {1000 * dense:8.1f} ms  exfx reference {1000 * comp:8.1f} ms  "
                  f"ratio {comp / dense:5.2f}x  (target <= 2.5x; dense run-to-run spread {100 * spread:.0f}%)  "
                  f"FLOPs saved {100 * flops.reduction:.1f}%")


if __name__ == "__main__":
    main()
