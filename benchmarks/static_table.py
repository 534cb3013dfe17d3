"""The static pruning table: SNP against L1, random, bias-fold and global magnitude pruning, with and without a short
fine-tune, and ExPrune composed on top (SNP-50% and magnitude-pruned models).

Run:  python -m benchmarks.static_table --models vgg11 [--quick]

For each model (trained checkpoint under benchmarks/checkpoints/; ResNet-18 has none here and is skipped with the
command that trains it) it writes one record per (method, removed fraction):

- ``acc_no_ft``: test accuracy right after one-shot pruning; ``acc_ft``: after ``--ft-steps`` SGD steps
  (batch 128, flips and 2-pixel shifts, as benchmarks/train_cv.py) on the *training* split (null where not
  fine-tuned);
- ``params``, ``flops`` (per example, FlopCounterMode, dense count: magnitude pruning keeps every FLOP),
  ``speedup_b1``/``speedup_b64`` against the BN-folded dense graph, all variants interleaved in each repeat,
  median of the repeats; ``prune_seconds``;
- ``snp+exprune`` / ``magnitude+exprune``: ``exfx.calibrate_budgets`` of the pruned GraphModule on the
  **validation** split at 0.1 and 1 point (``confidence=0.99``, the reproduction table's protocol), then the
  plan's FLOP reduction *relative to the pruned model* and its drop on **test** (``reduction_0p1``,
  ``reduction_1p0``, ``drop_*``); and, labelled ``test_selected_*``, the paper's protocol (calibrated on the test
  split itself, no guard: optimistic by construction).

SNP/bias-fold statistics: the first 8 validation batches (2,000 images). Accuracy: the test split. A
``round8`` comparison measures latency of SNP at 47% removal with kept counts as they fall and rounded to a
multiple of 8 (at 25/50/75% VGG-11's counts are already multiples of 8).

Fine-tunes and calibrations are cached under benchmarks/checkpoints/static/ (keyed by model, method, fraction,
steps, quick), so a rerun only re-measures accuracy and latency; ``--fresh`` ignores the cache. ``--warm KEY...``
only fills the cache for the named jobs (``ft:snp@0.5``, ``xp:snp@0.5``, ``ts:snp@0.5``, ``ft:magnitude@0.9``, ...)
so several processes can share the long work.

Writes benchmarks/results/static.json (a list of records), static.md and static_<model>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import exfx
from benchmarks.data import load_fashion_mnist, to_float
from benchmarks.exprune_table import BENCHMARKS, CONFIDENCE, Benchmark
from benchmarks.models import MODELS
from benchmarks.train_cv import _augment
from exfx.pruning import prune
from exfx.snp.finetune import finetune
from exfx.snp.magnitude import magnitude_prune
from exfx.snp.report import count_forward_flops, count_parameters
from exfx.tune.calibration import calibrate_budgets
from exfx.tune.evaluation import evaluate

logger = logging.getLogger("benchmarks.static_table")

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / "checkpoints" / "static"
RATIOS = (0.25, 0.5, 0.75)
METHODS = ("snp", "l1", "random", "bias_fold")
#: Global magnitude sparsities: 0.5 (still accurate unpruned), 0.9 (needs the fine-tune; ExPrune composes on it).
SPARSITIES = (0.5, 0.9)
#: Always fine-tuned (the rest report acc_ft = null).
FINETUNED = (("snp", 0.5), ("l1", 0.5), ("magnitude", 0.9))
#: Fine-tuned where the cache already holds them (fill it with --warm ft:...), or always with --ft-all.
FINETUNED_OPTIONAL = (("bias_fold", 0.5), ("random", 0.5), ("snp", 0.25), ("l1", 0.25), ("snp", 0.75),
                      ("l1", 0.75))
#: ExPrune is composed on these: the SNP-50% and the 90%-sparse magnitude-pruned model.
COMPOSED = (("snp", 0.5), ("magnitude", 0.9))
BUDGETS = ((0.001, "0p1"), (0.01, "1p0"))
FT_BATCH, FT_LR = 128, 0.01
#: Drop (accuracy points / 100) beyond which ExPrune is composed on the fine-tuned model, not the one-shot one.
FT_FIRST_DROP = 0.01
ROUND_RATIO = 0.47
PAPER_MAGNITUDE_EXPRUNE = {"reduction_0p1": (0.1024, 0.1111), "reduction_1p0": (0.1391, 0.1439)}


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def test_metric(bench: Benchmark, module: torch.nn.Module, batches: list[Any]) -> float:
    """The metric over ``batches``, weighted by batch size."""
    total, seen = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            total += bench.metric(module(inputs), targets) * len(targets)
            seen += len(targets)
    return total / seen


def latencies(modules: dict[str, torch.nn.Module], inputs: torch.Tensor, repeats: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each module on ``inputs``; every repeat runs all modules, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for module in modules.values():  # warm-up
            module(inputs)
        for _ in range(repeats):
            for name, module in modules.items():
                start = time.perf_counter()
                for _ in range(iters):
                    module(inputs)
                times[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in times.items()}


def _cache_path(key: str, suffix: str) -> Path:
    return CACHE / f"{key.replace('@', '_').replace(':', '-')}{suffix}"


def cached_json(key: str, fresh: bool, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = _cache_path(key, ".json")
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    value = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def train_batches(side: int, steps: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` augmented training batches of ``FT_BATCH`` (reshuffled each epoch, seeded)."""
    images, labels = load_fashion_mnist().train
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(order), FT_BATCH):
            if done == steps:
                return
            index = order[i:i + FT_BATCH]
            yield _augment(to_float(images[index], side), generator), labels[index]
            done += 1


def tag(method: str, fraction: float) -> str:
    return f"{method}@{fraction:g}"


# ---------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------


class Variants:
    """Every pruned variant of one model, built lazily from one analysis, fine-tunes cached."""

    def __init__(self, bench: Benchmark, quick: bool, ft_steps: int, fresh: bool, cached_only: bool = False) -> None:
        self.bench, self.quick, self.ft_steps, self.fresh = bench, quick, ft_steps, fresh
        self.cached_only = cached_only
        self.stat_batches = bench.val[: 2 if quick else 8]
        self.test = bench.test[: 8 if quick else len(bench.test)]
        self.val = bench.val[: 4 if quick else len(bench.val)]
        start = time.perf_counter()
        self.analysis = exfx.analyse(bench.model, bench.example_inputs)
        self.analyse_seconds = time.perf_counter() - start
        self.pruned: dict[str, tuple[fx.GraphModule, dict[str, Any]]] = {}

    def key(self, kind: str, method: str, fraction: float) -> str:
        return f"{self.bench.name}-{kind}:{tag(method, fraction)}-s{self.ft_steps}{'-quick' if self.quick else ''}"

    def one_shot(self, method: str, fraction: float, round_to: int = 1) -> tuple[fx.GraphModule, dict[str, Any]]:
        """The pruned GraphModule (no fine-tune) and its facts; memoised."""
        name = tag(method, fraction) + (f"-r{round_to}" if round_to > 1 else "")
        if name not in self.pruned:
            batch = self.bench.example_inputs[0].shape[0]
            if method == "magnitude":
                gm, result = magnitude_prune(self.analysis, self.bench.example_inputs, sparsity=fraction)
                facts = {"prune_seconds": result.seconds, "sparsity": result.sparsity,
                         "sparsity_by_layer": {layer.target: layer.sparsity for layer in result.layers}}
            else:
                gm, report = prune(self.analysis, self.bench.example_inputs, self.stat_batches, method=method,
                                   ratio=fraction, round_to=round_to)
                facts = {"prune_seconds": report.seconds,
                         "layers": {layer.name: [layer.units_before, layer.units_after] for layer in report.layers},
                         "refused": {r.name: r.reason for r in report.refused}}
            facts["params"] = count_parameters(gm)
            if method == "magnitude":
                facts["params_nonzero"] = facts["params"] - result.zeroed
            facts["flops"] = count_forward_flops(gm, self.bench.example_inputs) / batch
            self.pruned[name] = (gm, facts)
        return self.pruned[name]

    def fine_tuned(self, method: str, fraction: float) -> tuple[fx.GraphModule, dict[str, Any]]:
        """A fine-tuned copy of the one-shot model (weights cached) and the fine-tune's facts."""
        gm = copy.deepcopy(self.one_shot(method, fraction)[0])
        key = self.key("ft", method, fraction)
        weights = _cache_path(key, ".pt")
        if weights.exists() and not self.fresh:
            gm.load_state_dict(torch.load(weights, weights_only=True))
            return gm.eval(), json.loads(_cache_path(key, ".json").read_text())
        side = MODELS[self.bench.name][1]
        result = finetune(gm, train_batches(side, self.ft_steps), steps=self.ft_steps, lr=FT_LR,
                          keep_zeros=method == "magnitude")
        facts = {"ft_steps": result.steps, "ft_examples": result.examples, "ft_seconds": result.seconds,
                 "ft_loss": [result.first_loss, result.final_loss], "ft_lr": FT_LR, "ft_batch": FT_BATCH}
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(gm.state_dict(), weights)
        _cache_path(key, ".json").write_text(json.dumps(facts) + "\n")
        return gm, facts

    def composed_base(self, method: str, fraction: float) -> tuple[fx.GraphModule, bool]:
        """The model ExPrune is composed on: the fine-tuned one if one-shot pruning lost over FT_FIRST_DROP."""
        dense = self.dense_accuracy()
        one_shot = self.one_shot(method, fraction)[0]
        if dense - test_metric(self.bench, one_shot, self.val) > FT_FIRST_DROP:
            return self.fine_tuned(method, fraction)[0], True
        return one_shot, False

    def dense_accuracy(self) -> float:
        """Validation accuracy of the dense model (the composition rule reads validation, never test)."""
        if not hasattr(self, "_dense_val"):
            self._dense_val = test_metric(self.bench, self.bench.model, self.val)
        return self._dense_val

    def exprune(self, method: str, fraction: float) -> dict[str, Any]:
        """Validation-selected plans of the composed model, reported on test (cached)."""
        def compute() -> dict[str, Any]:
            gm, fine_tuned = self.composed_base(method, fraction)
            return {"exprune_on": "fine-tuned" if fine_tuned else "one-shot",
                    **calibrated(self.bench, gm, self.val, self.test, self.quick)}
        return cached_json(self.key("xp", method, fraction), self.fresh, compute)

    def test_selected(self, method: str, fraction: float) -> dict[str, Any]:
        """The paper's protocol: plans calibrated on the test split itself, no guard (cached)."""
        def compute() -> dict[str, Any]:
            gm, _ = self.composed_base(method, fraction)
            return selected_on_test(self.bench, gm, self.test, self.quick)
        return cached_json(self.key("ts", method, fraction), self.fresh, compute)

    def has_fine_tune(self, method: str, fraction: float) -> bool:
        return self.has("ft", method, fraction)

    def has(self, kind: str, method: str, fraction: float) -> bool:
        """Whether the cache holds job ``kind`` (``ft``, ``xp``, ``ts``) for this pair (never, with --fresh)."""
        suffix = ".pt" if kind == "ft" else ".json"
        return _cache_path(self.key(kind, method, fraction), suffix).exists() and not self.fresh


def _max_evals(quick: bool) -> int:
    return 2 if quick else 10


def calibrated(bench: Benchmark, gm: fx.GraphModule, val: list[Any], test: list[Any], quick: bool) -> dict[str, Any]:
    """``calibrate_budgets`` on validation (guarded), each plan's reduction and drop on test."""
    analysis = exfx.analyse(gm, bench.example_inputs)
    base = evaluate(gm, test, bench.metric)
    plans = calibrate_budgets(analysis, None, val, bench.metric, [b for b, _ in BUDGETS], confidence=CONFIDENCE,
                              max_evals=_max_evals(quick))
    out: dict[str, Any] = {"base_test": base.score}
    for budget, key in BUDGETS:
        plan = plans[budget]
        result = evaluate(analysis.compile(plan), test, bench.metric)
        out.update({f"reduction_{key}": result.reduction, f"drop_{key}": base.score - result.score,
                    f"val_reduction_{key}": plan.meta["calibration"]["reduction"],
                    "calib_seconds": plan.meta["calibration"]["seconds"],
                    "calib_evals": plan.meta["calibration"]["evals"], f"plan_{key}": plan.to_dict()})
    return out


def selected_on_test(bench: Benchmark, gm: fx.GraphModule, test: list[Any], quick: bool) -> dict[str, Any]:
    analysis = exfx.analyse(gm, bench.example_inputs)
    base = evaluate(gm, test, bench.metric).score
    plans = calibrate_budgets(analysis, None, test, bench.metric, [b for b, _ in BUDGETS],
                              max_evals=_max_evals(quick))
    out: dict[str, Any] = {}
    for budget, key in BUDGETS:
        calibration = plans[budget].meta["calibration"]
        out[f"test_selected_reduction_{key}"] = calibration["reduction"]
        out[f"test_selected_drop_{key}"] = base - calibration["score"]
    out["test_selected_seconds"] = calibration["seconds"]
    return out


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def warm(variants: Variants, jobs: list[str]) -> None:
    """Fill the cache for ``jobs`` (``ft:``/``xp:``/``ts:`` + ``method@fraction``), nothing else."""
    for job in jobs:
        kind, rest = job.split(":")
        method, fraction = rest.split("@")
        logger.info("warming %s", job)
        {"ft": variants.fine_tuned, "xp": variants.exprune, "ts": variants.test_selected}[kind](method,
                                                                                             float(fraction))


def pairs(quick: bool) -> list[tuple[str, float]]:
    ratios = (0.5,) if quick else RATIOS
    methods = [(m, r) for m in METHODS for r in ratios]
    return methods + [("magnitude", s) for s in SPARSITIES]


def base_records(v: Variants, quick: bool, ft_all: bool) -> list[dict[str, Any]]:
    name = v.bench.name
    dense_facts = {"params": count_parameters(v.analysis.graph_module),
                   "flops": count_forward_flops(v.analysis.graph_module, v.bench.example_inputs)
                   / v.bench.example_inputs[0].shape[0]}
    records = [{"model": name, "method": "dense", "removed": 0.0,
                "acc_no_ft": test_metric(v.bench, v.bench.model, v.test), "acc_ft": None, **dense_facts,
                "analyse_seconds": v.analyse_seconds}]
    finetuned = FINETUNED + tuple(p for p in FINETUNED_OPTIONAL if ft_all or v.has_fine_tune(*p))
    for method, fraction in pairs(quick):
        gm, facts = v.one_shot(method, fraction)
        record = {"model": name, "method": method, "removed": fraction,
                  "acc_no_ft": test_metric(v.bench, gm, v.test), "acc_ft": None, **facts}
        if (method, fraction) in finetuned:
            tuned, ft_facts = v.fine_tuned(method, fraction)
            record.update(acc_ft=test_metric(v.bench, tuned, v.test), **ft_facts)
        records.append(record)
        logger.info("%s %s: %s", name, tag(method, fraction),
                    {k: record[k] for k in ("acc_no_ft", "acc_ft", "params", "flops")})
    return records


def composed_records(v: Variants, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method, fraction in COMPOSED:
        base = next(r for r in records if r["method"] == method and r["removed"] == fraction)
        if v.cached_only and not v.has("xp", method, fraction):
            logger.warning("%s: no cached ExPrune calibration (--cached-only): record skipped", tag(method, fraction))
            continue
        xp = {k: val for k, val in v.exprune(method, fraction).items() if not k.startswith("plan_")}
        ts = v.test_selected(method, fraction) if not v.cached_only or v.has("ts", method, fraction) else \
            {f"test_selected_{m}_{k}": None for m in ("reduction", "drop") for _, k in BUDGETS}
        accuracy = base["acc_ft"] if xp["exprune_on"] == "fine-tuned" else base["acc_no_ft"]
        out.append({"model": v.bench.name, "method": f"{method}+exprune", "removed": fraction,
                    "acc_no_ft": base["acc_no_ft"], "acc_ft": base["acc_ft"], "params": base["params"],
                    "flops": base["flops"], "base_accuracy": accuracy,
                    "flops_executed_1p0": base["flops"] * (1 - xp["reduction_1p0"]),
                    "speedup_b1": None, "speedup_b64": None, **xp, **ts,
                    "note": f"ExPrune on the {xp['exprune_on']} {tag(method, fraction)} model; reductions are of "
                            f"executed FLOPs relative to that model, plans selected on validation "
                            f"(confidence {CONFIDENCE}), figures on test; test_selected_*: calibrated on test (the "
                            f"paper's protocol, optimistic)."
                            + (" Partial sums take the first k input units, zeros included (see "
                               "exfx.snp.magnitude)." if method == "magnitude" else "")})
    return out


def round_comparison(v: Variants) -> dict[str, fx.GraphModule]:
    """SNP at ROUND_RATIO with counts as they fall and rounded to a multiple of 8, plus the 50% reference."""
    return {"snp@0.47": v.one_shot("snp", ROUND_RATIO)[0], "snp@0.47-r8": v.one_shot("snp", ROUND_RATIO, 8)[0],
            "snp@0.5": v.one_shot("snp", 0.5)[0]}


def measure_latency(v: Variants, records: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    modules: dict[str, torch.nn.Module] = {"eager": v.bench.model, "dense": v.analysis.graph_module}
    for r in records:
        if r["method"] != "dense":
            modules[tag(r["method"], r["removed"])] = v.one_shot(r["method"], r["removed"])[0]
    rounding = round_comparison(v)
    modules.update(rounding)
    x = torch.cat([inputs for inputs, _ in v.bench.test[:1]])
    timed = {size: latencies(modules, x[:size], repeats=5 if quick else 11, iters=20 if size == 1 else 3)
             for size in (1, 64)}
    for r in records:
        name = "dense" if r["method"] == "dense" else tag(r["method"], r["removed"])
        for size in (1, 64):
            r[f"latency_b{size}_s"] = timed[size][name]
            r[f"speedup_b{size}"] = timed[size]["dense"] / timed[size][name]
    return {"eager_latency_b1_s": timed[1]["eager"], "eager_latency_b64_s": timed[64]["eager"],
            "round8": {name: {"latency_b1_s": timed[1][name], "latency_b64_s": timed[64][name],
                              "params": count_parameters(gm),
                              "layers": v.one_shot("snp", ROUND_RATIO, 8 if name.endswith("r8") else 1)[1]
                              .get("layers") if name != "snp@0.5" else v.one_shot("snp", 0.5)[1]["layers"]}
                       for name, gm in rounding.items()}}


def measure(name: str, quick: bool, ft_steps: int, fresh: bool, jobs: list[str] | None,
            ft_all: bool, cached_only: bool, compose_only: bool = False) -> list[dict[str, Any]]:
    bench = BENCHMARKS[name]()
    v = Variants(bench, quick, ft_steps, fresh, cached_only)
    if jobs:
        warm(v, jobs)
        return []
    if compose_only:  # the last full run's records, with the ExPrune compositions rebuilt from the cache
        previous = json.loads((out_dir(quick) / "static.json").read_text())
        records = [r for r in previous if r["model"] == name and "+" not in r["method"]]
        return records + composed_records(v, records)
    started = time.perf_counter()
    records = base_records(v, quick, ft_all)
    extra = measure_latency(v, records, quick)
    records += composed_records(v, records)
    for r in records:
        r.update(quick=quick, test_examples=sum(len(t) for _, t in v.test), note=r.get("note", bench.note))
    records[0].update(extra, total_seconds=time.perf_counter() - started)
    return records


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def _acc(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _cell(reduction: float | None, drop: float | None) -> str:
    return "not measured" if reduction is None or drop is None else f"{100 * reduction:.1f}% ({100 * drop:+.2f})"


def markdown(records: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        dense = rows[0]
        lines += [f"### {model} (test n={dense['test_examples']}{', quick' if dense['quick'] else ''})", "",
                  f"dense: accuracy {dense['acc_no_ft']:.4f}, params {dense['params']:,}, "
                  f"MFLOPs/example {dense['flops'] / 1e6:.2f}, batch-1 {dense['latency_b1_s'] * 1e3:.2f} ms, "
                  f"batch-64 {dense['latency_b64_s'] * 1e3:.1f} ms (eager {dense['eager_latency_b1_s'] * 1e3:.2f} / "
                  f"{dense['eager_latency_b64_s'] * 1e3:.1f} ms)", "",
                  "| removed | method | acc (no FT) | acc (FT) | params | FLOPs | b1 speedup | b64 speedup | "
                  "prune s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows[1:] if "+" not in r["method"]), key=lambda r: (r["method"] == "magnitude",
                                                                                       r["removed"], r["method"])):
            removed = f"{r['removed']:.0%}" + (" of weights" if r["method"] == "magnitude" else "")
            lines.append(f"| {removed} | {r['method']} | {_acc(r['acc_no_ft'])} | {_acc(r['acc_ft'])} | "
                         f"{r.get('params_nonzero', r['params']) / dense['params']:.1%} | "
                         f"{r['flops'] / dense['flops']:.1%} | "
                         f"{_x(r['speedup_b1'])} | {_x(r['speedup_b64'])} | {r['prune_seconds']:.1f} |")
        lines += ["", "ExPrune composed (reduction of executed FLOPs relative to the pruned model; drop in points "
                  "vs the pruned model, on test):", "",
                  "| base | accuracy | ≤0.1 pt: val-selected (test drop) | ≤1 pt: val-selected (test drop) | "
                  "≤0.1 pt: test-selected | ≤1 pt: test-selected | total FLOPs at ≤1 pt vs dense |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if "+" in r["method"]):
            cells = [_cell(r.get(f"{p}reduction_{k}"), r.get(f"{p}drop_{k}"))
                     for p, k in (("", "0p1"), ("", "1p0"), ("test_selected_", "0p1"), ("test_selected_", "1p0"))]
            lines.append(f"| {r['exprune_on']} {tag(r['method'].split('+')[0], r['removed'])} | "
                         f"{r['base_accuracy']:.4f} | " + " | ".join(cells) +
                         f" | {r['flops_executed_1p0'] / dense['flops']:.1%} |")
        lines += [""] + [f"- {r['method']}: {r['note']}" for r in rows if "+" in r["method"]]
        if any("+" in r["method"] and r.get("test_selected_reduction_1p0") is None for r in rows):
            lines.append("- not measured: the test-selected calibration was not in the cache (--cached-only); "
                         "run `--warm ts:<method>@<fraction>` to fill it.")
        if "round8" in dense:
            lines += ["", f"Rounding kept channels to a multiple of 8 (SNP, {ROUND_RATIO:.0%} removed; median "
                      "latency, interleaved):", "", "| variant | kept per layer | b1 ms | b64 ms |",
                      "|---|---|---|---|"]
            for name, facts in dense["round8"].items():
                kept = ", ".join(str(after) for _, after in facts["layers"].values())
                lines.append(f"| {name} | {kept} | {facts['latency_b1_s'] * 1e3:.2f} | "
                             f"{facts['latency_b64_s'] * 1e3:.1f} |")
        lines += ["", f"- {dense['note']}",
                  "- FT: one fine-tune per row (steps, batch and lr in static.json), SGD with Nesterov momentum, "
                  "cosine lr, flips and shifts, on the training split; magnitude keeps its zeros.",
                  "- Magnitude: global over every conv/linear weight of the BN-folded graph; params column: non-zero "
                  "weights; no FLOP is removed (dense kernels), so its FLOPs are 100% and its speedups ~1x.",
                  "- Paper (ExPrune on ~98%-sparse magnitude-pruned CIFAR VGG-11): +10.24–11.11% (negligible) "
                  "and +13.91–14.39% (≤1%), test-selected.", ""]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["model"] == model and "+" not in r["method"]]
    dense = rows[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in [*METHODS, "magnitude"]:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["removed"])
        if not mine:
            continue
        line, = left.plot([r["removed"] for r in mine], [r["acc_no_ft"] for r in mine], "o-", label=method)
        tuned = [r for r in mine if r["acc_ft"] is not None]
        left.plot([r["removed"] for r in tuned], [r["acc_ft"] for r in tuned], "*", ms=11, color=line.get_color())
        right.plot([r["latency_b64_s"] * 1e3 for r in mine], [r["acc_no_ft"] for r in mine], "o-",
                   color=line.get_color(), label=method)
        right.plot([r["latency_b64_s"] * 1e3 for r in tuned], [r["acc_ft"] for r in tuned], "*", ms=11,
                   color=line.get_color())
    for axis in (left, right):
        axis.axhline(dense["acc_no_ft"], color="gray", ls="--", lw=1, label="dense")
        axis.set_ylabel("test accuracy (o: no fine-tune, *: fine-tuned)")
        axis.grid(alpha=0.3)
    right.plot([dense["latency_b64_s"] * 1e3], [dense["acc_no_ft"]], "ks")
    left.set_xlabel("fraction removed (units per layer; magnitude: weights)")
    right.set_xlabel("batch-64 latency, ms (1 CPU thread, median)")
    left.legend(fontsize=8)
    fig.suptitle(f"{model}: static pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def out_dir(quick: bool) -> Path:
    """Where the table goes: benchmarks/results/, or benchmarks/results/quick/ for --quick."""
    return RESULTS / "quick" if quick else RESULTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["vgg11"], choices=["vgg11", "resnet18"])
    parser.add_argument("--quick", action="store_true",
                        help="50%% only, 2 statistics / 4 val / 8 test batches, 20 fine-tune steps, max_evals=2")
    parser.add_argument("--ft-steps", type=int, default=None, help="fine-tune steps (default: 1 epoch, 430)")
    parser.add_argument("--fresh", action="store_true", help="ignore the fine-tune and calibration cache")
    parser.add_argument("--warm", nargs="*", default=None, help="only fill the cache for these jobs")
    parser.add_argument("--cached-only", action="store_true",
                        help="compose ExPrune only where its calibration is cached; test-selected null where not")
    parser.add_argument("--compose-only", action="store_true",
                        help="reuse the last static.json's rows; rebuild only the +exprune records (from the cache)")
    parser.add_argument("--ft-all", action="store_true",
                        help="also fine-tune FINETUNED_OPTIONAL (default: only where the cache has them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("exfx").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ft_steps = args.ft_steps or (20 if args.quick else math.ceil(55_000 / FT_BATCH))
    records: list[dict[str, Any]] = []
    for name in args.models:
        try:
            records += measure(name, args.quick, ft_steps, args.fresh, args.warm, args.ft_all,
                               args.cached_only, args.compose_only)
        except FileNotFoundError as err:
            logger.warning("skipping %s: no trained checkpoint (%s)", name, err)
    if args.warm is not None or not records:
        return
    folder = out_dir(args.quick)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "static.json").write_text(json.dumps(records, indent=1) + "\n")
    (folder / "static.md").write_text(markdown(records))
    for model in dict.fromkeys(r["model"] for r in records):
        plot(records, folder / f"static_{model}.png", model)
    print(markdown(records))
    print(f"wrote {folder / 'static.json'}, static.md, static_<model>.png")


if __name__ == "__main__":
    main()
