"""Wall clock of exfx's lowerings against dense PyTorch: is ``lowering="native"`` ever slower than dense?

Run:  python -m benchmarks.latency [--quick] [--threads 1 2] [--no-inductor] [--no-flush]

Cases (all in one process):

- FFN blocks ``fc2(relu(fc1(x)))`` at OPT-1.3B (2048 -> 8192 -> 2048) and OPT-125m
  (768 -> 3072 -> 768) shapes, random ``nn.Linear`` init, batch 1, one checkpoint
  at k = 32 units, threshold rule. The threshold is set on 8 random inputs so that
  fc1 keeps 50% or 30% of its neurons (``keep`` is what the timed input keeps).
  ``x`` is declared a hidden input, so fc1 is a site and fc2 its consumer.
- ``ffn-net``: a token embedding and 3 pre-LN FFN blocks (1024 -> 4096 -> 1024, residual, random init) that no
  one tuned,
  through the *default* ``exfx.compile`` (no ``lowering`` argument, the default ``Config``), compiled at batch 1
  and at batch 64, each run at batches 1, 8, 64 and 256 (per-call dispatch: "never slower at any batch").
- ``digits-mlp``: a new user's own MLP (64 -> 512 -> 512 -> 512 -> 10) trained here on scikit-learn's digits
  (bundled with scikit-learn, no download), with a plan calibrated for 1 point on a validation split, through
  the default compile at batch 1 and at batch 64, each run at batches 1, 8, 64 and 256: a small model, where
  per-op overhead dominates.
- the trained VGG-11 (Fashion-MNIST, width 32) with its 1%-budget plan from
  ``benchmarks/results/records/vgg11.json`` at batch 1 and 64. Its sites are
  convolutions, which have no native kernel: ``native`` runs them dense.

Variants, timed interleaved in a shuffled order each repeat (median of the
repeats; ``spread`` = p10-p90 / median): dense eager (the model itself),
``exfx.compile(..., lowering="native")``, ``lowering="reference"`` (the masked
FLOP simulation), and dense ``torch.compile`` (Inductor; ``--no-inductor`` skips
it). ``exfx native`` measures its own kernel choices at compile time, at the
example batch, with a fresh timing cache. By default the last-level cache is
flushed (a 64 MiB buffer is rewritten) before every timed call, as in
``benchmarks/native_ffn.py``.

``limit`` (FFN at batch 1 only, where every kernel is weight-bandwidth bound) is
the memory-traffic bound: dense weight bytes / weight bytes the chosen native
kernels must read. The "never slower" target: ``speedup >= 0.95`` everywhere.
Writes ``benchmarks/results/latency.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import exfx
from benchmarks.tables import markdown_table
from exfx.ops import enp as enp_ops
from exfx.report import lowering_summary

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
RECORDS = Path(__file__).resolve().parent / "results" / "records" / "vgg11.json"
SHAPES = {"opt-1.3b": (2048, 8192), "opt-125m": (768, 3072)}
COUNT = 32
TARGET = 0.95  # never more than 5% slower than dense eager


class FFN(nn.Module):
    """A transformer feed-forward block without its residual: ``fc2(relu(fc1(x)))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _threshold_for_keep(model: FFN, samples: torch.Tensor, keep: float) -> float:
    """The fc1 threshold that keeps a fraction ``keep`` of the neurons over ``samples`` (count = 32)."""
    w, b, n = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc1.in_features
    with torch.no_grad():
        state = torch.ops.exfx.partial_sum(samples, w, None, None, 0, COUNT, n, [], [], [], 1, False, "fc1")
        statistic = enp_ops.exit_statistic(state, w, b, None, COUNT, n, "threshold")
    return float(torch.quantile(statistic.flatten().double(), 1.0 - keep))


class _Flush:
    def __init__(self, enabled: bool) -> None:
        self.buffer = torch.empty(16 << 20) if enabled else None  # 64 MiB of float32

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.add_(1.0)


def _time(variants: dict[str, Callable[[], Any]], repeats: int, flush: _Flush) -> dict[str, dict[str, float]]:
    """Median, p10, p90 milliseconds per variant; each repeat calls every variant once in a shuffled order."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                flush()
                start = time.perf_counter()
                variants[name]()
                samples[name].append(1e3 * (time.perf_counter() - start))
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
        out[name] = {"median": statistics.median(values), "p10": q[0], "p90": q[-1]}
    return out


def _inductor(model: nn.Module, x: torch.Tensor, enabled: bool) -> tuple[Callable[[], Any] | None, str]:
    if not enabled:
        return None, "skipped (--no-inductor)"
    start = time.perf_counter()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
    except Exception as error:  # noqa: BLE001 - reported in the table instead
        return None, f"failed: {type(error).__name__}"
    return (lambda: compiled(x)), f"compiled in {time.perf_counter() - start:.0f} s"


def _ffn_case(shape: str, keep: float, threads: int, repeats: int, flush: _Flush,
              inductor: bool) -> dict[str, Any]:
    d_model, hidden = SHAPES[shape]
    torch.manual_seed(0)
    model = FFN(d_model, hidden).eval()
    threshold = _threshold_for_keep(model, torch.randn(8, d_model), keep)
    x = torch.randn(1, d_model)
    config = exfx.Config(samples=COUNT, threshold=threshold)
    analysis = exfx.analyse(model, (x,), hidden_inputs=["x"])
    native = analysis.compile(config, lowering="native")
    reference = analysis.compile(config, lowering="reference")
    flops = exfx.count_flops(reference, x)
    kept = 1.0 - flops.sites["fc1"].pruned_fraction
    report = native.meta["exfx_report"].site("fc1")
    density = _fc2_density(reference, x)
    sparse = "sparse_input" in report.lowering_reason and "consumer fc2: sparse_input" in report.lowering_reason
    head = hidden * COUNT
    needed = head + kept * hidden * (d_model - COUNT) if report.lowering == "native" else hidden * d_model
    needed += density * hidden * d_model if sparse else hidden * d_model
    limit = 2 * hidden * d_model / needed
    return _measure(f"ffn {shape}", model, native, reference, x, threads, repeats, flush, inductor,
                    keep=kept, limit=limit, lowering=f"{report.lowering}: {report.lowering_reason}")


def _fc2_density(reference: torch.fx.GraphModule, x: torch.Tensor) -> float:
    """The fraction of non-zero fc2 inputs (the site's ReLU output) on ``x``."""
    seen: list[float] = []

    class Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and n.target is torch.relu:
                seen.append(float((out != 0).float().mean()))
            return out

    with torch.no_grad():
        Probe(reference).run(x)
    return seen[-1] if seen else 1.0


def _vgg_cases(threads: int, repeats: int, flush: _Flush, inductor: bool,
               batches: tuple[int, ...]) -> list[dict[str, Any]]:
    from benchmarks.exprune_table import BENCHMARKS

    try:
        bench = BENCHMARKS["vgg11"]()
    except FileNotFoundError as missing:  # a fresh clone without the checkpoint: skip, saying how to get it
        print(f"skipped vgg11: {missing}", file=sys.stderr)
        return []
    data = bench.val[0][0]
    plan = exfx.Plan.from_dict(json.loads(RECORDS.read_text())["plan_1p0"])
    results = []
    for batch in batches:
        x = data[:batch].contiguous()
        analysis = exfx.analyse(bench.model, (x,))
        if plan.fingerprint != analysis.fingerprint:
            print("note: the VGG-11 plan's fingerprint does not match; using Plan.from_report", file=sys.stderr)
            plan = exfx.Plan.from_report(analysis.report)
        native = analysis.compile(plan, lowering="native")
        reference = analysis.compile(plan, lowering="reference")
        with torch.no_grad():
            flops = exfx.count_flops(reference, x)
        forms = sorted({s.lowering for s in native.meta["exfx_report"].eligible})
        results.append(_measure("vgg11", bench.model, native, reference, x, threads, repeats, flush, inductor,
                                keep=1.0 - flops.reduction, limit=None, lowering=", ".join(forms),
                                keep_note="1 - FLOP reduction of the plan"))
    return results


def _measure(name: str, model: nn.Module, native: nn.Module, reference: nn.Module, x: torch.Tensor, threads: int,
             repeats: int, flush: _Flush, inductor: bool, *, keep: float, limit: float | None, lowering: str,
             keep_note: str = "fc1 keep ratio") -> dict[str, Any]:
    compiled, inductor_note = _inductor(model, x, inductor)
    variants: dict[str, Callable[[], Any]] = {"dense": lambda: model(x), "native": lambda: native(x),
                                              "reference": lambda: reference(x)}
    if compiled is not None:
        variants["inductor"] = compiled
    t = _time(variants, repeats, flush)
    with torch.no_grad():
        error = float((native(x) - reference(x)).abs().max())
    dense_ms, exfx_ms = t["dense"]["median"], t["native"]["median"]
    return {"name": name, "batch": x.shape[0], "threads": threads, "dense_ms": dense_ms, "exfx_ms": exfx_ms,
            "reference_ms": t["reference"]["median"],
            "inductor_ms": t["inductor"]["median"] if "inductor" in t else None, "inductor_note": inductor_note,
            "speedup": dense_ms / exfx_ms, "limit": limit, "keep": keep, "keep_note": keep_note,
            "lowering": lowering, "max_abs_diff_native_vs_reference": error,
            "spread": {k: (v["p90"] - v["p10"]) / v["median"] for k, v in t.items()},
            "meets_target": dense_ms / exfx_ms >= TARGET}


class FFNNet(nn.Module):
    """A token embedding, ``blocks`` pre-LN residual FFN blocks ``h + fc2(relu(fc1(ln(h))))`` and a small head.

    The embedding makes the residual stream a hidden layer (its features exchangeable), as in a language model;
    a raw model input would pin fc1's contraction axis.
    """

    def __init__(self, d_model: int = 1024, hidden: int = 4096, blocks: int = 3, classes: int = 10,
                 vocabulary: int = 1000) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(d_model, hidden) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, d_model) for _ in range(blocks))
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(torch.relu(fc1(norm(h))))
        return self.head(h)


#: The batches every "any batch" case is run at, and the example batches it is compiled at.
CALL_BATCHES = (1, 8, 64, 256)
COMPILE_BATCHES = (1, 64)


def _any_batch_cases(name: str, model: nn.Module, make: Callable[[int], torch.Tensor], plan: Any, threads: int,
                     repeats: int, flush: _Flush, note: str) -> list[dict[str, Any]]:
    """``model`` through the default ``exfx.compile`` at each compile batch, timed against dense at each call batch."""
    records = []
    for compiled_at in COMPILE_BATCHES:
        compiled = exfx.compile(model, (make(compiled_at),), plan=plan)  # the default: what a user gets
        report = compiled.meta["exfx_report"]
        summary = lowering_summary(report)
        for batch in CALL_BATCHES:
            x = make(batch)
            t = _time({"dense": lambda: model(x), "exfx": lambda: compiled(x)}, repeats, flush)
            dense_ms, exfx_ms = t["dense"]["median"], t["exfx"]["median"]
            records.append({"name": name, "compiled_at": compiled_at, "batch": batch, "threads": threads,
                            "dense_ms": dense_ms, "exfx_ms": exfx_ms, "reference_ms": None, "inductor_ms": None,
                            "inductor_note": "not timed", "speedup": dense_ms / exfx_ms, "limit": None,
                            "keep": None, "keep_note": note, "lowering": summary,
                            "spread": {k: (v["p90"] - v["p10"]) / v["median"] for k, v in t.items()},
                            "meets_target": dense_ms / exfx_ms >= TARGET})
            print(markdown(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return records


def _ffn_net_cases(threads: int, repeats: int, flush: _Flush) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = FFNNet().eval()
    return _any_batch_cases("ffn-net 3x(1024->4096)", model, lambda b: torch.randint(0, 1000, (b,)), None, threads,
                            repeats, flush, "default Config (threshold 0, 32 samples)")


def _digits_cases(threads: int, repeats: int, flush: _Flush) -> list[dict[str, Any]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("skipped digits-mlp: scikit-learn is missing (pip install scikit-learn)", file=sys.stderr)
        return []
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    order = torch.randperm(len(y))
    train, val = order[:1200], order[1200:1500]
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                          nn.ReLU(), nn.Linear(512, 10))
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(20):
        for i in range(0, len(train), 64):
            batch = train[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()

    def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return (outputs.argmax(-1) == targets).float().mean().item()

    plan = exfx.calibrate(model, (x[:8],), [(x[val], y[val])], accuracy, 0.01, progress=False)
    saved = plan.meta["calibration"]["reduction"]
    pool = x[order[1500:]]
    return _any_batch_cases("digits-mlp 64->512x3->10", model,
                            lambda b: pool[torch.arange(b) % len(pool)].contiguous(), plan, threads, repeats,
                            flush, f"calibrated plan, 1 point, {100 * saved:.1f}% FLOPs saved")


def markdown(records: list[dict[str, Any]]) -> str:
    header = ("case", "compiled at", "batch", "threads", "keep", "dense ms", "exfx ms", "reference ms", "inductor ms",
              "speedup", "limit", "lowering")

    def cells(r: dict[str, Any]) -> tuple[str, ...]:
        optional = {key: f"{r[key]:.2f}" if r.get(key) is not None else "-"
                    for key in ("inductor_ms", "limit", "keep", "reference_ms")}
        flag = "" if r["meets_target"] else " **(>5% slower)**"
        return (r["name"], str(r.get("compiled_at", r["batch"])), str(r["batch"]), str(r["threads"]),
                optional["keep"], f"{r['dense_ms']:.2f}", f"{r['exfx_ms']:.2f}", optional["reference_ms"],
                optional["inductor_ms"], f"{r['speedup']:.2f}{flag}", optional["limit"], r["lowering"][:90])

    return markdown_table(header, (cells(r) for r in records))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 1 thread, under 6 minutes")
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--no-flush", action="store_true")
    parser.add_argument("--no-vgg", action="store_true")
    args = parser.parse_args(argv)
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = 9 if args.quick else 25
    flush = _Flush(not args.no_flush)
    os.environ.setdefault("EXFX_CACHE_DIR", tempfile.mkdtemp(prefix="exfx-latency-"))  # measured in this run
    records: list[dict[str, Any]] = []
    for n in threads:
        torch.set_num_threads(n)
        for shape in SHAPES:
            for keep in (0.5, 0.3):
                records.append(_ffn_case(shape, keep, n, repeats, flush, not args.no_inductor))
                print(markdown(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        records += _ffn_net_cases(n, repeats, flush)
        records += _digits_cases(n, repeats, flush)
        if not args.no_vgg:
            vgg = _vgg_cases(n, repeats, flush, not args.no_inductor, (1, 64))
            records += vgg
            if vgg:
                print("\n".join(markdown(vgg).splitlines()[2:]), file=sys.stderr, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:])
    context = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "command": command.strip(),
               "flush": not args.no_flush, "repeats": repeats}
    RESULTS.write_text(json.dumps([{**r, **context} for r in records], indent=1))
    print(markdown(records))
    return records


if __name__ == "__main__":
    main()
