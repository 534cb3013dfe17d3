"""Native ENP kernels on a transformer FFN block ``fc2(relu(fc1(x)))`` at batch 1: wall clock vs dense.

Run:  python -m benchmarks.native_ffn [--quick] [--threads 1 2] [--keep 0.5 0.3 0.1]

Shapes: OPT-125m (768 -> 3072 -> 768) and OPT-1.3B (2048 -> 8192 -> 2048), random
``nn.Linear`` init, one checkpoint at k = 32 units (the paper's), threshold rule.
The fc1 threshold is calibrated on 8 random inputs so that the wanted fraction of
fc1 neurons is kept; the timed calls cycle through those inputs and the keep
ratio reported is their mean.

Variants, timed in one process, interleaved in a shuffled order each repeat so
that machine noise hits all of them (median of the repeats; spread = p10-p90).
By default the last-level cache is flushed (a 64 MiB buffer is rewritten) before
every timed call: weights are then read from memory, as in a model whose
weights exceed the cache. Without ``--no-flush`` a small keep ratio would leave
the few kept rows cache-resident across calls and overstate the gain (and
OPT-125m's 19 MB of weights would fit in a 32 MB L3 altogether).

- ``dense``: ``F.linear``, ``relu``, ``F.linear`` (eager PyTorch);
- ``reference``: exfx's reference ops (``partial_sum -> early_exit -> complete``, masked dense) + dense fc2;
- ``native+sparse``: ``exfx::enp_linear`` (fused ReLU) + ``exfx::sparse_input_linear``;
- ``native+dense``: ``exfx::enp_linear`` + dense fc2;
- ``torch-gather``: the pure-torch fallback of both (index_select of the kept rows).

``limit`` is the memory-traffic bound of ``native+sparse`` at batch 1, where every
kernel is weight-bandwidth bound: dense weight bytes / weight bytes the native
kernels must read (the head of every fc1 row, the tail of kept rows, the fc2 rows
of non-zero hidden units). ``speedup / limit`` says how much of it is realised.
Prints a markdown table and writes ``benchmarks/results/native_ffn.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import exfx  # noqa: F401  (registers the reference ops)
from exfx.ops import enp as enp_ops
from exfx.ops import native

SHAPES = {"opt-125m": (768, 3072), "opt-1.3b": (2048, 8192)}
COUNT = 32
RESULTS = Path(__file__).resolve().parent / "results" / "native_ffn.json"


def reference_fc1(x: Tensor, w: Tensor, b: Tensor, threshold: float) -> Tensor:
    n = w.shape[1]
    state = torch.ops.exfx.partial_sum(x, w, None, None, 0, COUNT, n, [], [], [], 1, False, "fc1")
    keep = torch.ops.exfx.early_exit(state, w, b, None, None, COUNT, n, "threshold", threshold, "fc1")
    return torch.ops.exfx.complete(x, w, state, b, None, keep, COUNT, n, [], [], [], 1, "fc1")


def calibrate(w: Tensor, b: Tensor, keep: float, x: Tensor) -> float:
    """The threshold that keeps a ``keep`` fraction of fc1 neurons on the inputs ``x``."""
    state = torch.ops.exfx.partial_sum(x, w, None, None, 0, COUNT, w.shape[1], [], [], [], 1, False, "fc1")
    stat = enp_ops.exit_statistic(state, w, b, None, COUNT, w.shape[1], "threshold")
    return float(torch.quantile(stat.flatten().double(), 1.0 - keep))


def interleaved(variants: dict[str, Callable[[Tensor], Tensor]], inputs: Tensor, repeats: int,
                flush: Tensor | None) -> dict[str, list[float]]:
    """Seconds per call of every variant, ``repeats`` samples each, variants shuffled each repeat.

    Repeat ``i`` feeds every variant input ``i % len(inputs)``; ``flush`` (if given) is
    rewritten before each call so that no weight stays cached from the previous one.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn(inputs[:1])
    for repeat in range(repeats):
        x = inputs[repeat % len(inputs)].unsqueeze(0)
        random.shuffle(names)
        for name in names:
            if flush is not None:
                flush.add_(1.0)
            start = time.perf_counter()
            variants[name](x)
            times[name].append(time.perf_counter() - start)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_case(shape: str, keep_target: float, threads: int, repeats: int, flush: Tensor | None) -> dict:
    d, h = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
    w1, b1, w2, b2 = fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach()
    inputs = torch.randn(8, d, generator=g)
    threshold = calibrate(w1, b1, keep_target, inputs)
    relaid, w2_t = native.relayout(w1, COUNT), native.transpose_for_sparse_input(w2)

    hidden, keep = native.enp_linear(inputs, relaid, b1, rule="threshold", param=threshold, relu=True)
    kept, nonzero = float(keep.sum(-1).double().mean()), float((hidden != 0).sum(-1).double().mean())
    expected = F.linear(torch.relu(reference_fc1(inputs, w1, b1, threshold)), w2, b2)
    error = float((native.sparse_input_linear(hidden, w2_t, b2) - expected).abs().max())

    def native_fc1(x: Tensor) -> Tensor:
        return native.enp_linear(x, relaid, b1, rule="threshold", param=threshold, relu=True)[0]

    variants: dict[str, Callable[[Tensor], Tensor]] = {
        "dense": lambda x: F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2),
        "reference": lambda x: F.linear(torch.relu(reference_fc1(x, w1, b1, threshold)), w2, b2),
        "native+sparse": lambda x: native.sparse_input_linear(native_fc1(x), w2_t, b2),
        "native+dense": lambda x: F.linear(native_fc1(x), w2, b2),
        "torch-gather": lambda x: native.sparse_input_linear_reference(
            native.enp_linear_reference(x, relaid, b1, rule="threshold", param=threshold, relu=True)[0], w2_t, b2),
    }
    torch.set_num_threads(threads)
    with torch.inference_mode():
        times = interleaved(variants, inputs, repeats, flush)
    dense_bytes = 4 * (h * d + d * h)
    native_bytes = 4 * (h * COUNT + kept * (d - COUNT) + nonzero * d)
    fc1_only_bytes = 4 * (h * COUNT + kept * (d - COUNT) + d * h)
    dense_median = statistics.median(times["dense"])
    rows = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        rows[name] = {"median_ms": 1e3 * median, "p10_ms": 1e3 * quantile(samples, 0.1),
                      "p90_ms": 1e3 * quantile(samples, 0.9), "speedup": dense_median / median}
    limit = dense_bytes / native_bytes
    return {"shape": shape, "d_model": d, "hidden": h, "threads": threads, "keep_target": keep_target,
            "keep": kept / h, "fc2_input_density": nonzero / h, "threshold": threshold, "max_abs_error": error,
            "limit": limit, "limit_native_dense": dense_bytes / fc1_only_bytes,
            "speedup_over_limit": rows["native+sparse"]["speedup"] / limit, "variants": rows,
            "repeats": repeats, "flushed": flush is not None}


def table(results: list[dict]) -> str:
    names = ["dense", "reference", "native+sparse", "native+dense", "torch-gather"]
    head = ("| shape | thr | keep | fc2 density | " + " | ".join(f"{n} ms (p10-p90)" for n in names)
            + " | speedup native+sparse | limit | speedup/limit | speedup native+dense (limit) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        v = r["variants"]
        cells = [f"{v[n]['median_ms']:.3f} ({v[n]['p10_ms']:.2f}-{v[n]['p90_ms']:.2f})" for n in names]
        lines.append(f"| {r['shape']} | {r['threads']} | {r['keep']:.2f} | {r['fc2_input_density']:.2f} | "
                     + " | ".join(cells)
                     + f" | {v['native+sparse']['speedup']:.2f}x | {r['limit']:.2f}x | {r['speedup_over_limit']:.2f}"
                     f" | {v['native+dense']['speedup']:.2f}x ({r['limit_native_dense']:.2f}x) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-flush", action="store_true", help="keep the cache warm between calls")
    args = parser.parse_args(argv)
    repeats = args.repeats or (8 if args.quick else 32)
    flush = None if args.no_flush else torch.zeros(16 * 2**20)
    start = time.perf_counter()
    available = native.native_available()
    print(f"native kernels: {'built/loaded' if available else 'UNAVAILABLE (fallback)'} in "
          f"{time.perf_counter() - start:.1f} s; cpu capability {torch.backends.cpu.get_cpu_capability()}")
    results = []
    for shape in args.shapes:
        for threads in args.threads:
            for keep in args.keep:
                result = bench_case(shape, keep, threads, repeats, flush)
                results.append(result)
                print(f"{shape} threads={threads} keep={result['keep']:.2f} done (max |err| "
                      f"{result['max_abs_error']:.2e})", flush=True)
    print()
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "native": available, "count": COUNT,
                                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                   "command": "python -m benchmarks.native_ffn " + " ".join(argv or sys.argv[1:]),
                                   "results": results}, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
