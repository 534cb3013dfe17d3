"""Greedy LLM decoding through exfx: tokens per second against HF eager dense and dense ``torch.compile``.

Run:  python -m benchmarks.decode [--quick] [--threads 1 2] [--dtypes float32 bfloat16] [--no-inductor]

Models (random weights: synthetic, not trained; their sparsity is set, not learned):

- ``decode-opt-1.3b-s95`` / ``-s90``: ``OPTForCausalLM`` at OPT-1.3B's shape (24 layers, width 2048, FFN 8192,
  vocabulary 50,272). Each layer's fc1 biases are shifted, one layer after the other on a calibration prompt, so
  that 95% / 90% of its FFN activations are zero (trained OPT is that sparse: NimbleEdge measured OPT-2.7B at
  92-99.6% per layer).
- ``decode-relu-llama-1b-s88``: ``LlamaForCausalLM`` with ``hidden_act="relu"`` at TinyLlama's shape (22 layers,
  2048, intermediate 5632, 32 heads, 4 KV heads, vocabulary 32,000), ``mlp_bias=True`` with the gate biases
  shifted so that 88% of the gate's ReLU outputs are zero (ProSparse's figure).

Each is decoded greedily with a KV cache (``generate``, batch 1, an 8-token prompt) in one process, the variants
interleaved: HF eager (dense), ``torch.compile(model.forward, backend="exfx")`` with the default (native) lowering
and ``Config(threshold=0.0, samples=32)``, and dense ``torch.compile`` (Inductor). Each runs once untimed first (so
no compile is timed), then ``repeats`` timed generations; the median counts.

Each record: ``name, threads, batch, dtype, sparsity, dense_tok_s, exfx_tok_s, inductor_tok_s, speedup`` (exfx over
dense eager), ``limit`` (dense weight bytes read per token / exfx's, from the measured keep ratios: the speed-up
if every byte not read were time saved), ``tokens_agree`` (share of exfx's greedy tokens equal to dense's), and
what the lowering chose. Writes ``benchmarks/results/decode.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import exfx
from benchmarks.tables import markdown_table
from exfx.report import lowering_summary

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
PROMPT = 8
TARGET = 0.95


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # "opt" or "llama"
    sparsity: float


CASES = (Case("decode-opt-1.3b-s95", "opt", 0.95), Case("decode-opt-1.3b-s90", "opt", 0.90),
         Case("decode-relu-llama-1b-s88", "llama", 0.88))


def build(family: str, tiny: bool = False) -> nn.Module:
    """The random-weight model of a case (``tiny``: a few layers of small width, for smoke tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "opt":
        size = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=500,
                    word_embed_proj_dim=64) if tiny else dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                                                               num_attention_heads=32, vocab_size=50272,
                                                               word_embed_proj_dim=2048)
        return OPTForCausalLM(OPTConfig(max_position_embeddings=2048, **size)).eval()
    size = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=500) if tiny else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000)
    return LlamaForCausalLM(LlamaConfig(hidden_act="relu", mlp_bias=True, max_position_embeddings=2048,
                                        **size)).eval()


def _gated_layers(model: nn.Module, family: str) -> list[nn.Linear]:
    """The linear before each FFN ReLU: OPT's fc1, Llama's gate_proj."""
    if family == "opt":
        return [layer.fc1 for layer in model.model.decoder.layers]
    return [layer.mlp.gate_proj for layer in model.model.layers]


def set_sparsity(model: nn.Module, family: str, sparsity: float, prompt: torch.Tensor) -> list[float]:
    """Shift each gated layer's bias so that ``sparsity`` of its ReLU outputs on ``prompt`` are zero; the measured
    zero share of each layer afterwards.

    One pass sets them all: each layer's hook shifts its bias and its own output by the same amount, so the next
    layer already sees the shifted model. A second pass measures.
    """
    layers = _gated_layers(model, family)

    def shift(layer: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        amount = torch.quantile(out.detach().float().flatten()[: 1 << 24], sparsity).to(out.dtype)
        with torch.no_grad():
            layer.bias -= amount
        return out - amount

    hooks = [layer.register_forward_hook(shift) for layer in layers]
    with torch.no_grad():
        model(prompt)
    for hook in hooks:
        hook.remove()
    zeros: dict[int, float] = {}
    hooks = [layer.register_forward_hook(lambda m, _i, out: zeros.__setitem__(id(m), float((out <= 0).float().mean())))
             for layer in layers]
    with torch.no_grad():
        model(prompt)
    for hook in hooks:
        hook.remove()
    return [zeros[id(layer)] for layer in layers]


def _generate(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)


class _Forward:
    """``with`` it, ``model`` runs ``compiled`` as its ``forward`` (``generate`` keeps its own loop)."""

    def __init__(self, model: nn.Module, compiled: Callable[..., Any]) -> None:
        self.model, self.forward, self.compiled = model, model.forward, compiled

    def __enter__(self) -> _Forward:
        self.model.forward = self.compiled
        return self

    def __exit__(self, *_: Any) -> None:
        self.model.forward = self.forward


def _exfx(model: nn.Module, config: exfx.Config, graphs: list[Any]) -> _Forward:
    """``model`` decoding through the exfx backend; each compiled graph is appended to ``graphs``."""
    options = {"config": config.to_dict(), "inner": "eager"}

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        run = exfx.dynamo_backend.exfx_backend(gm, inputs, options=options)
        graphs.append(run.exfx_graph)
        return run

    return _Forward(model, torch.compile(model.forward, backend=backend))


def _weight_bytes(model: nn.Module, family: str, keep: list[float], dtype: torch.dtype) -> tuple[float, float]:
    """Weight bytes a decode step reads densely, and what exfx's kernels read at the layers' keep ratios: the
    gated linear reads its 32 sampled units for every neuron and the rest for kept ones; the linear after the ReLU
    (OPT's fc2, Llama's down_proj) reads only the rows of non-zero inputs; Llama's up_proj is read densely."""
    size = torch.finfo(dtype).bits // 8
    dense = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_positions" not in n)
    dense -= model.get_input_embeddings().weight.numel()  # an embedding row per token, not the whole table
    saved = 0.0
    for layer, kept in zip(_gated_layers(model, family), keep):
        units = layer.in_features
        saved += layer.weight.numel() * (1 - (32 / units + kept * (1 - 32 / units)))
        saved += layer.weight.numel() * (1 - kept)  # fc2 / down: same element count as fc1 / gate
    return dense * size, (dense - saved) * size


def run_case(case: Case, dtype: torch.dtype, threads: int, new: int, repeats: int, inductor: bool,
             tiny: bool = False) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = build(case.family, tiny)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    calibration = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    zeros = set_sparsity(model, case.family, case.sparsity, calibration)
    model = model.to(dtype)
    dense_tokens = _generate(model, prompt, new)
    graphs: list[Any] = []
    exfx_run = _exfx(model, exfx.Config(threshold=0.0, samples=32), graphs)
    with exfx_run:
        exfx_tokens = _generate(model, prompt, new)  # compiles (prefill and decode graphs), untimed
    runs: dict[str, Callable[[], Any]] = {"dense": lambda: _generate(model, prompt, new)}

    def with_exfx() -> Any:
        with exfx_run:
            return _generate(model, prompt, new)

    runs["exfx"] = with_exfx
    inductor_note = "skipped (--no-inductor)"
    if inductor:
        compiled = _Forward(model, torch.compile(model.forward))
        started = time.perf_counter()
        try:
            with compiled:
                _generate(model, prompt, new)
            inductor_note = f"compiled in {time.perf_counter() - started:.0f} s"

            def with_inductor() -> Any:
                with compiled:
                    return _generate(model, prompt, new)

            runs["inductor"] = with_inductor
        except Exception as error:  # noqa: BLE001 - reported in the record instead
            inductor_note = f"failed: {type(error).__name__}: {str(error)[:120]}"
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    tok_s = {name: new / statistics.median(values) for name, values in seconds.items()}
    keep = [1.0 - z for z in zeros]
    dense_bytes, exfx_bytes = _weight_bytes(model, case.family, keep, dtype)
    agree = float((exfx_tokens[0, PROMPT:] == dense_tokens[0, PROMPT:]).float().mean())
    lowering = "; ".join(dict.fromkeys(lowering_summary(g.meta["exfx_report"]) for g in graphs))
    record = {"name": case.name, "threads": threads, "batch": 1, "dtype": str(dtype).removeprefix("torch."),
              "sparsity": case.sparsity, "measured_sparsity": statistics.mean(zeros), "new_tokens": new,
              "dense_tok_s": tok_s["dense"], "exfx_tok_s": tok_s["exfx"],
              "inductor_tok_s": tok_s.get("inductor"), "inductor_note": inductor_note,
              "speedup": tok_s["exfx"] / tok_s["dense"], "limit": dense_bytes / exfx_bytes,
              "tokens_agree": agree, "graphs": len(graphs), "lowering": lowering,
              "weights": "synthetic (random init, biases shifted for the sparsity)", "repeats": repeats}
    record["meets_target"] = record["speedup"] >= TARGET
    record["share_of_limit"] = record["speedup"] / record["limit"]
    del model
    return record


def markdown(records: list[dict[str, Any]]) -> str:
    header = ("case", "dtype", "threads", "dense tok/s", "exfx tok/s", "inductor tok/s", "speedup", "limit",
              "tokens agree", "lowering")
    return markdown_table(header, ((r["name"], r["dtype"], str(r["threads"]), f"{r['dense_tok_s']:.2f}",
                                    f"{r['exfx_tok_s']:.2f}",
                                    f"{r['inductor_tok_s']:.2f}" if r["inductor_tok_s"] else "-",
                                    f"{r['speedup']:.2f}", f"{r['limit']:.2f}", f"{r['tokens_agree']:.2f}",
                                    r["lowering"][:80]) for r in records))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, float32, 8 new tokens, no Inductor")
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--cases", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small models, for a smoke test")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    threads = args.threads or ([1] if args.quick else [1, 2])
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]))]
    new, repeats = (8, 2) if args.quick else (32, 3)
    inductor = not (args.no_inductor or args.quick)
    os.environ.setdefault("EXFX_CACHE_DIR", tempfile.mkdtemp(prefix="exfx-decode-"))  # measured in this run
    records = []
    for case in (c for c in CASES if c.name in args.cases):
        for dtype in dtypes:
            for n in threads:
                torch._dynamo.reset()
                records.append(run_case(case, dtype, n, new, repeats, inductor, args.tiny))
                print(markdown(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if not args.tiny:
        command = "python -m benchmarks.decode " + " ".join(argv if argv is not None else sys.argv[1:])
        context = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                   "command": command.strip()}
        RESULTS.write_text(json.dumps([{**r, **context} for r in records], indent=1))
    print(markdown(records))
    return records


if __name__ == "__main__":
    main()
