"""Dominance prediction on the 8k-BPE OPT's head: top-1 agreement, head FLOPs, batch-1 head and decoding speed.

Run:
    python -m benchmarks.train_lm --tokenizer bpe8k --steps 3000 --batch-size 8  # the model (committed)
    python -m benchmarks.dominance_head                                          # the table (~10 min, 1 thread)
    python -m benchmarks.dominance_head --quick                                  # fewer windows and repeats

What it does, on one CPU thread (``torch.set_num_threads(1)``):

1. The head analysis of the whole model (``exfx.analysis.heads.match_head``): the head's contraction axis must
   be in an exchangeable group.
2. The head's input (the final LayerNorm's output) on the validation windows: per-dimension RMS, the ratio of
   the largest to the median, and how many dimensions exceed 6x the median (magnitude outliers; the
   ``always_sampled`` set is chosen from these, on validation data).
3. For each setting (samples ``k`` or a schedule, ``alpha``, with or without the outlier set), on the hidden
   states of all test windows (256 x 128 tokens): top-1 agreement with the dense head, classes kept per token,
   and the head's FLOPs (2 per multiply-add, tests and second moments included) against dense.
   The head is compiled alone (``hidden_inputs``), so the body runs once for all settings; a check compiles the
   whole model with the first setting and compares its argmax on a few test windows.
4. Batch-1 wall clock, interleaved, median of the rounds (spread = p10-p90 of the rounds over the median):
   the head alone (dense ``F.linear`` + argmax against the compiled head + argmax, per token over test
   positions), and greedy decoding with the KV-cached OPT body followed by each head (tokens/s).

Writes ``benchmarks/results/dominance_head.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

import exfx
from exfx.analysis.heads import head_input_rms, match_head
from exfx.cost.flops import run_counting
from exfx.cost.model import DOMINANCE_TEST_FLOPS, dominance_sample_flops
from exfx.passes.dominance_pass import outlier_units

logger = logging.getLogger("benchmarks.dominance_head")

RESULTS = Path(__file__).resolve().parent / "results" / "dominance_head.md"
OUTLIER_FACTOR = 6.0
AGREEMENT_TARGET = 0.999
FLOPS_TARGET = 0.40
CHUNK = 256  # hidden rows per compiled-head call when counting (the state is 3 x rows x 8192 floats)


class Head(nn.Module):
    """The LM head alone: ``hidden (..., d) -> logits (..., V)`` with the model's (tied) weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


@dataclass
class Setting:
    label: str
    params: exfx.DominanceParams


@dataclass
class Quality:
    agreement: float
    kept_mean: float
    kept_p99: float
    kept_max: int
    executed: int
    dense: int

    @property
    def saved(self) -> float:
        return 1.0 - self.executed / self.dense


#: (samples, alpha, variance) of the settings; the ones marked True are repeated with the always-sampled set.
SETTINGS = [((32,), 1e-3, "sample", False), ((64,), 1e-2, "sample", False), ((64, 128), 1e-3, "sample", True),
            ((64,), 1e-3, "pooled", False), ((128,), 1e-3, "pooled", False), ((32, 128), 1e-3, "pooled", False),
            ((64, 128), 1e-3, "pooled", True), ((64, 128), 1e-4, "pooled", False)]
#: The setting the whole model is compiled with, as a check of the head-only measurements.
FULL_MODEL_SETTING = exfx.DominanceParams(samples=(64, 128), alpha=1e-3, variance="pooled")


def _settings(always: tuple[int, ...], note: str) -> list[Setting]:
    settings = []
    for samples, alpha, variance, with_always in SETTINGS:
        label = f"{variance} k={','.join(map(str, samples))} a={alpha:g}"
        settings.append(Setting(label, exfx.DominanceParams(samples=samples, alpha=alpha, variance=variance)))
        if with_always and always:
            settings.append(Setting(f"{label} +{len(always)} {note}", exfx.DominanceParams(
                samples=samples, alpha=alpha, variance=variance, always_sampled=always)))
    return settings


def hidden_states(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The head's input (the body's last hidden state, after the final LayerNorm) at every position: (N, d)."""
    body = model.model.model
    rows = []
    with torch.no_grad():
        for inputs, _ in batches:
            rows.append(body(input_ids=inputs).last_hidden_state.reshape(-1, model.model.config.hidden_size))
    return torch.cat(rows)


def quality(head_gm: nn.Module, weight: torch.Tensor, hidden: torch.Tensor) -> Quality:
    """Agreement, kept classes per token and head FLOPs of a compiled head over all rows of ``hidden``."""
    agree, kept_counts, executed, dense = 0, [], 0, 0
    with torch.no_grad():
        for chunk in hidden.split(CHUNK):
            out, report = run_counting(head_gm, chunk)
            reference = F.linear(chunk, weight).argmax(-1)
            agree += int((out.argmax(-1) == reference).sum())
            kept_counts.append(torch.isfinite(out).sum(-1))
            executed += report.executed
            dense += report.dense
    kept = torch.cat(kept_counts).double()
    return Quality(agreement=agree / hidden.shape[0], kept_mean=float(kept.mean()),
                   kept_p99=float(kept.quantile(0.99)), kept_max=int(kept.max()), executed=executed, dense=dense)


@dataclass
class Timing:
    """Median per-unit wall-clock and thread CPU seconds over the rounds, and the wall spread (p10-p90 / median)."""

    wall: float
    cpu: float
    spread: float


def _interleaved(variants: dict[str, Callable[[], Any]], rounds: int, per_round: int) -> dict[str, Timing]:
    """Time each variant ``rounds`` times, alternating the order every round; per-unit medians.

    Thread CPU time is reported next to wall clock: on a shared machine it leaves out the time the thread waited
    for a core (it still counts cache misses caused by the neighbours).
    """
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for variant in variants.values():  # warm up
        variant()
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.thread_time()
            variants[name]()
            cpus[name].append((time.thread_time() - cpu) / per_round)
            walls[name].append((time.perf_counter() - wall) / per_round)
    timings = {}
    for name in names:
        ordered = sorted(walls[name])
        median = statistics.median(ordered)
        low, high = ordered[int(0.1 * (len(ordered) - 1))], ordered[int(math.ceil(0.9 * (len(ordered) - 1)))]
        timings[name] = Timing(wall=median, cpu=statistics.median(cpus[name]), spread=(high - low) / median)
    return timings


def time_heads(weight: torch.Tensor, head_gm: nn.Module, rows: torch.Tensor, rounds: int) -> dict[str, Timing]:
    """Per-token time of the head at batch 1, argmax included: the model's ``F.linear``, the dense product with
    a pre-transposed weight (the fastest dense form here), and the compiled dominance head."""
    singles = [row.view(1, -1) for row in rows]
    transposed = weight.t().contiguous()
    heads: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "F.linear": lambda h: F.linear(h, weight), "h @ W.T": lambda h: h @ transposed, "dominance": head_gm}

    def loop(head: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for h in singles:
                head(h).argmax(-1)
        return run

    with torch.no_grad():
        return _interleaved({name: loop(head) for name, head in heads.items()}, rounds, len(singles))


def time_breakdown(weight: torch.Tensor, head_gm: Any, rows: torch.Tensor, rounds: int) -> dict[str, Timing]:
    """Where the compiled head's batch-1 time goes: the first checkpoint's weight block alone (the floor of any
    implementation that reads it), the ``exfx::dominance_linear`` call alone, and the whole compiled module
    (which also checks its inputs), against the dense ``h @ W.T``."""
    node = next(n for n in head_gm.graph.nodes if n.target is torch.ops.exfx.dominance_linear.default)
    args = [getattr(head_gm, a.target) if isinstance(a, fx.Node) else a for a in node.args[1:]]
    block, first, exact = args[0], args[4][0], args[5]
    reorder = node.args[0]  # the input in sample order, as the module feeds the op (always-sampled units first)
    order = getattr(head_gm, reorder.args[2].target) if reorder.target is torch.index_select else None
    raw = [row.view(1, -1) for row in rows]
    ordered = raw if order is None else [h.index_select(-1, order) for h in raw]
    transposed = weight.t().contiguous()
    parts: dict[str, tuple[Callable[[torch.Tensor], Any], list[torch.Tensor]]] = {
        "h @ W.T": (lambda h: h @ transposed, raw),
        "first block": (lambda h: h[:, exact:exact + first] @ block[exact:], ordered),
        "op": (lambda h: torch.ops.exfx.dominance_linear.default(h, *args), ordered), "module": (head_gm, raw)}

    def loop(part: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for h in inputs:
                part(h)
        return run

    with torch.no_grad():
        return _interleaved({name: loop(*part) for name, part in parts.items()}, rounds, len(raw))


def greedy(body: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
           new_tokens: int) -> torch.Tensor:
    """Greedy decoding at batch 1 with the KV-cached body and ``head`` on the last hidden state."""
    output = body(input_ids=prompt, use_cache=True)
    generated = []
    for _ in range(new_tokens):
        token = head(output.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
        generated.append(token)
        output = body(input_ids=token, cache=output.past_key_values, use_cache=True)
    return torch.cat(generated, dim=1)


def time_decoding(model: nn.Module, head_gm: nn.Module, prompts: list[torch.Tensor], new_tokens: int,
                  rounds: int) -> tuple[dict[str, Timing], float]:
    """Seconds per generated token of greedy decoding with each head, and the share of prompts whose generated
    tokens are identical with the dense and the dominance head."""
    body, weight = model.model.model, model.model.lm_head.weight
    transposed = weight.t().contiguous()
    heads: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "F.linear": lambda h: F.linear(h, weight), "h @ W.T": lambda h: h @ transposed, "dominance": head_gm}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in heads}

    def run(name: str) -> Callable[[], None]:
        def decode() -> None:
            outputs[name] = [greedy(body, heads[name], prompt, new_tokens) for prompt in prompts]
        return decode

    with torch.no_grad():
        timings = _interleaved({name: run(name) for name in heads}, rounds, new_tokens * len(prompts))
    same = sum(int(torch.equal(a, b)) for a, b in zip(outputs["F.linear"], outputs["dominance"]))
    return timings, same / len(prompts)


def full_model_check(model: nn.Module, params: exfx.DominanceParams, windows: torch.Tensor) -> tuple[Any, float]:
    """Compile the whole LM with dominance; its head match and its argmax agreement with dense on ``windows``."""
    analysis = exfx.analyse(model, (windows,))
    head = match_head(analysis.graph_module, analysis.groups)
    gm = analysis.compile(exfx.Config(threshold=-math.inf), dominance=params)
    with torch.no_grad():
        agree = float((gm(windows).argmax(-1) == model(windows).argmax(-1)).double().mean())
    return head, agree


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmarks import bpe_data
    from benchmarks.train_lm import BPE_CHECKPOINT, EVAL_SEQUENCES, load_trained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=BPE_CHECKPOINT)
    parser.add_argument("--windows", type=int, default=EVAL_SEQUENCES, help="test windows of 128 tokens")
    parser.add_argument("--timed-tokens", type=int, default=256, help="test positions timed at batch 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="32 windows, 64 timed tokens, 3 rounds, 2 prompts")
    parser.add_argument("--settings", type=int, default=0, help="run only the first N settings (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.timed_tokens, args.rounds, args.prompts = 32, 64, 3, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("exfx").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = load_trained(args.checkpoint)
    weight = model.model.lm_head.weight.detach()
    classes, width = weight.shape
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    val = bpe_data.lm_batches("val", min(64, EVAL_SEQUENCES), 128, 8)
    test = bpe_data.lm_batches("test", args.windows, 128, 8)
    started = time.perf_counter()
    val_hidden, test_hidden = hidden_states(model, val), hidden_states(model, test)
    logger.info("hidden states: %d val and %d test positions in %.0f s", len(val_hidden), len(test_hidden),
                time.perf_counter() - started)

    head_analysis = exfx.analyse(Head(weight).eval(), (test_hidden[:4],), hidden_inputs=("hidden",))
    head = match_head(head_analysis.graph_module, head_analysis.groups)
    rms = head_input_rms(head_analysis.graph_module, head, [(chunk,) for chunk in val_hidden.split(1024)])
    median = float(rms.median())
    outliers = outlier_units(rms, OUTLIER_FACTOR)
    top = torch.argsort(rms, descending=True)[:5].tolist()

    # The always-sampled set: the dimensions above 6x the median RMS; when there are none, the 8 largest above 2x,
    # to measure whether summing the largest dimensions exactly helps at all.
    always, note = (outliers, f"outliers (>{OUTLIER_FACTOR:g}x)") if outliers else (
        outlier_units(rms, 2.0, limit=8), "largest-RMS dims (>2x)")
    settings = _settings(always, note)
    settings = settings[:args.settings] if args.settings else settings
    lines = [f"# Dominance prediction on the 8k-BPE OPT head ({args.checkpoint.name})", "",
             f"Model: OPT {model.model.config.num_hidden_layers} layers x {width}, vocabulary {classes} (BPE, "
             f"`benchmarks.bpe_data`), {checkpoint.get('steps', '?')} training steps; test perplexity "
             f"{checkpoint.get('test_perplexity', float('nan')):.2f}, next-token accuracy "
             f"{100 * checkpoint.get('test_accuracy', float('nan')):.2f}%. Test: {args.windows} windows x 128 "
             f"tokens = {len(test_hidden):,} positions. One CPU thread.", ""]
    results: list[tuple[Setting, Quality]] = []
    for setting in settings:
        gm = head_analysis.compile(exfx.Config(threshold=-math.inf), dominance=setting.params)
        result = quality(gm, weight, test_hidden)
        results.append((setting, result))
        logger.info("%s: agreement %.5f, kept %.1f/token (p99 %.0f), FLOPs saved %.1f%%", setting.label,
                    result.agreement, result.kept_mean, result.kept_p99, 100 * result.saved)

    full_head, full_agree = full_model_check(model, FULL_MODEL_SETTING, test[0][0][:4])
    lines += ["## Head analysis and magnitude outliers", "",
              f"- Whole-model analysis: head `{full_head.name}`, eligible={full_head.eligible}, contraction axis "
              f"in exchangeable group `{full_head.group}` ({full_head.n_units} units -> {full_head.classes} "
              f"classes){'' if full_head.eligible else ': ' + full_head.reason}. Whole model compiled with "
              f"`{FULL_MODEL_SETTING}`: argmax agreement {100 * full_agree:.2f}% on 4 test windows.",
              f"- Head input (final LayerNorm output) on {len(val_hidden):,} validation positions: per-dimension "
              f"RMS median {median:.3f}, max {float(rms.max()):.3f} (dim {top[0]}), ratio "
              f"{float(rms.max()) / median:.1f}x; dimensions above {OUTLIER_FACTOR:g}x the median: "
              f"{len(outliers)} {list(outliers)}; top 5 dims {top} with ratios "
              f"{[round(float(rms[d]) / median, 1) for d in top]}. Always-sampled set of the `+` settings "
              f"below ({note}, chosen on validation): {list(always)}.", ""]

    timed_rows = test_hidden[torch.linspace(0, len(test_hidden) - 1, args.timed_tokens).long()]
    prompts = [window[:32].view(1, -1) for window in torch.cat([b[0] for b in test])[:args.prompts]]
    table, breakdown = [], []
    for setting, result in results:
        gm = head_analysis.compile(exfx.Config(threshold=-math.inf), dominance=setting.params)
        parts = time_breakdown(weight, gm, timed_rows, args.rounds)
        breakdown.append([setting.label] + [f"{1e6 * parts[name].cpu:.0f}"
                                            for name in ("h @ W.T", "first block", "op", "module")])
        head_times = time_heads(weight, gm, timed_rows, args.rounds)
        decode, same = time_decoding(model, gm, prompts, 96, max(3, args.rounds // 2))
        base, best, dom = head_times["F.linear"], head_times["h @ W.T"], head_times["dominance"]
        d_base, d_best, d_dom = decode["F.linear"], decode["h @ W.T"], decode["dominance"]
        table.append([setting.label, f"{100 * result.agreement:.3f}%",
                      f"{result.kept_mean:.1f} / {result.kept_p99:.0f} / {result.kept_max}",
                      f"{result.dense / len(test_hidden) / 1e6:.2f} -> {result.executed / len(test_hidden) / 1e6:.2f}"
                      f" ({100 * result.saved:.1f}%)",
                      f"{1e6 * base.wall:.0f} / {1e6 * best.wall:.0f} / {1e6 * dom.wall:.0f} "
                      f"({best.wall / dom.wall:.2f}x; spread {100 * max(best.spread, dom.spread):.0f}%)",
                      f"{1e6 * base.cpu:.0f} / {1e6 * best.cpu:.0f} / {1e6 * dom.cpu:.0f} "
                      f"({best.cpu / dom.cpu:.2f}x)",
                      f"{1 / d_base.wall:.0f} / {1 / d_best.wall:.0f} / {1 / d_dom.wall:.0f} "
                      f"({d_best.wall / d_dom.wall:.2f}x; spread {100 * max(d_best.spread, d_dom.spread):.0f}%)",
                      f"{1 / d_base.cpu:.0f} / {1 / d_best.cpu:.0f} / {1 / d_dom.cpu:.0f} "
                      f"({d_best.cpu / d_dom.cpu:.2f}x)",
                      f"{100 * same:.0f}%"])
        logger.info("%s timed: head %s, decode %s", setting.label, head_times, decode)
    lines += ["## Settings", "",
              _table(table, ["setting", "top-1 agreement", "kept classes/token (mean / p99 / max)",
                             "head MFLOPs/token dense -> dominance (saved)",
                             "head us/token, wall: F.linear / h @ W.T / dominance (vs h @ W.T)",
                             "head us/token, thread CPU", "greedy tokens/s, wall: F.linear / h @ W.T / dominance",
                             "greedy tokens/s, thread CPU", "same 96 tokens"]), "",
              "Timing: batch 1, one thread, variants interleaved (order alternating), medians of the rounds; spread "
              "= p10-p90 of the wall-clock rounds over the median. Thread CPU time leaves out the time the thread "
              f"waited for a core (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end of "
              "the run). `h @ W.T` is the dense head with the weight transposed once (the fastest dense form "
              "measured here; the model's own `F.linear` at batch 1 is slower). Greedy decoding: 32-token test "
              "prompts, 96 new tokens, KV-cached body (transformers OPT) + each head.", ""]
    lines += ["## Where the batch-1 time goes (thread CPU us/token)", "",
              _table(breakdown, ["setting", "dense h @ W.T", "first checkpoint's block alone", "exfx op alone",
                                 "compiled module"]), "",
              "The first block is the weight the first test must read for every class; the op adds the test's "
              "element-wise passes over all classes, the gathers of later checkpoints and the completion, and one "
              "torch.library dispatch; the compiled module adds its input checks.", ""]
    lines += _verdict(results, width)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    logger.info("wrote %s", args.out)


def _verdict(results: list[tuple[Setting, Quality]], width: int) -> list[str]:
    """Which settings meet both targets, or the measured reason none does."""
    lines = ["## Targets", "", f"Top-1 agreement >= {100 * AGREEMENT_TARGET:.1f}% and head FLOPs saved >= "
             f"{100 * FLOPS_TARGET:.0f}%."]
    meeting = [s.label for s, q in results if q.agreement >= AGREEMENT_TARGET and q.saved >= FLOPS_TARGET]
    lines.append(f"Met by: {', '.join(meeting)}." if meeting else "Met by no setting; per setting:")
    for setting, q in results:
        params = setting.params  # every class pays the first test: exact units, sampled terms, moments, bounds
        first = dominance_sample_flops(params.samples[0], params.variance == "pooled") + DOMINANCE_TEST_FLOPS
        floor = (first + 2 * len(params.always_sampled)) / (2 * width)
        lines.append(f"- {setting.label}: agreement {100 * q.agreement:.3f}%, saved {100 * q.saved:.1f}%; kept "
                     f"{q.kept_mean:.1f} classes/token (p99 {q.kept_p99:.0f}); the first test alone costs "
                     f"{100 * floor:.1f}% of the dense head")
    return lines

if __name__ == "__main__":
    main()
