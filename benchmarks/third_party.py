"""Coverage of real architectures: what exfx finds in each, random-initialised from small configs, no download.

Run:  python -m benchmarks.third_party        (needs `pip install ".[thirdparty]"`)

Prints a Markdown table and writes it to ``benchmarks/results/coverage.md`` (and the
rows to ``coverage.json``): for each architecture, how it was captured, its
ReLU-family activations (ReLU, ReLU6, clamp at 0), the ENP sites among them (eligible
for some schedule; a site whose fan-in is below the default 32 samples is left dense by
the default config), the never-prune equivalence error, and the FLOPs saved under the
default config (threshold 0 at 32 samples; random weights, so the figure shows the
mechanism works end to end, not what a trained model saves). The architectures are
the third-party ``transformers`` and PyTorch Geometric models, and the DenseNet-,
MobileNet-V2- and ``nn.TransformerEncoder``-style models of ``tests/models.py``.
tests/test_third_party.py checks the same models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import exfx
from exfx.meta import INPUT_SIZES_KEY

__all__ = ["ARCHITECTURES", "CoverageRow", "build", "coverage", "main"]

RESULTS = Path(__file__).parent / "results"


class _Logits(torch.nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns its logits."""

    def __init__(self, model: torch.nn.Module, *names: str) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


class _GraphClassifier(torch.nn.Module):
    """A PyG encoder, mean pooling and a linear head."""

    def __init__(self, body: torch.nn.Module, hidden: int = 64, classes: int = 3) -> None:
        super().__init__()
        self.body, self.head = body, torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x, edge_index).mean(0, keepdim=True))


def _ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(1))


def _opt() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, activation_function="relu")
    return _Logits(OPTForCausalLM(config), "input_ids"), (_ids(2, 12),)


def _bert() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, hidden_act="relu", max_position_embeddings=64, num_labels=3)
    return _Logits(BertForSequenceClassification(config), "input_ids"), (_ids(2, 12),)


def _t5() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="relu", decoder_start_token_id=0)
    return _Logits(T5ForConditionalGeneration(config), "input_ids", "decoder_input_ids"), (_ids(2, 12), _ids(2, 5))


def _graph(kind: str) -> Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]:
    def factory() -> tuple[torch.nn.Module, tuple[Any, ...]]:
        from torch_geometric.nn.models import GCN, GIN, GraphSAGE

        body = {"GCN": GCN, "GIN": GIN, "GraphSAGE": GraphSAGE}[kind](8, 64, num_layers=3, act="relu")
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(30, 8, generator=generator)
        edge_index = torch.randint(0, 30, (2, 90), generator=generator)
        return _GraphClassifier(body), (x, edge_index)

    return factory


def _local(kind: str) -> Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]:
    """A model of ``tests/models.py`` with its example inputs."""

    def factory() -> tuple[torch.nn.Module, tuple[Any, ...]]:
        from tests import models

        generator = torch.Generator().manual_seed(3)
        if kind == "DenseNetish":
            return models.DenseNetish(), (torch.randn(2, 3, 16, 16, generator=generator),)
        if kind == "MobileNetV2ish":
            return models.MobileNetV2ish(), (torch.randn(2, 3, 32, 32, generator=generator),)
        if kind == "TransformerEncoderClassifier":
            return models.TransformerEncoderClassifier(), (_ids(2, 10),)
        layer = torch.nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), (
            torch.randn(2, 10, 64, generator=generator),)

    return factory


#: name -> (pip package, factory returning (model, example_inputs))
ARCHITECTURES: dict[str, tuple[str, Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]]] = {
    "OPT (transformers)": ("transformers", _opt),
    "BERT, hidden_act=relu (transformers)": ("transformers", _bert),
    "T5, ReLU feed-forward (transformers)": ("transformers", _t5),
    "GCN (PyTorch Geometric)": ("torch_geometric", _graph("GCN")),
    "GIN (PyTorch Geometric)": ("torch_geometric", _graph("GIN")),
    "GraphSAGE (PyTorch Geometric)": ("torch_geometric", _graph("GraphSAGE")),
    "DenseNet-style (concat blocks)": ("torch", _local("DenseNetish")),
    "MobileNet-V2-style (ReLU6, Hardsigmoid SE)": ("torch", _local("MobileNetV2ish")),
    "nn.TransformerEncoder with an embedding": ("torch", _local("TransformerEncoderClassifier")),
    "nn.TransformerEncoder on raw features": ("torch", _local("TransformerEncoder")),
}


def build(name: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    model, inputs = ARCHITECTURES[name][1]()
    return model.eval(), inputs


@dataclass(frozen=True)
class CoverageRow:
    """What exfx finds in one architecture (``status`` holds the error or skip reason, if any)."""

    name: str
    captured_by: str = "-"
    activations: int = 0
    sites: int = 0
    never_prune_error: float = math.nan
    flops_saved: float = math.nan
    status: str = ""

    def markdown(self) -> str:
        if self.captured_by == "-":
            return f"| {self.name} | - | - | - | - | - | {self.status} |"
        return (f"| {self.name} | {self.captured_by} | {self.activations} | {self.sites} | "
                f"{self.never_prune_error:.1e} | {self.flops_saved:.1%} | {self.status} |")


HEADER = ("| architecture | captured by | ReLU-family activations | ENP sites | "
          "never-prune max error | FLOPs saved (default config) | notes |\n|---|---|---|---|---|---|---|")


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def coverage(name: str) -> CoverageRow:
    """Capture, analyse, compile (never-prune and default config) and count one architecture."""
    try:
        model, inputs = build(name)
    except ImportError as err:
        return CoverageRow(name, status=f"skipped: {err.name} not installed")
    analysis = exfx.analyse(model, inputs)
    captured = "Dynamo (fallback)" if INPUT_SIZES_KEY in analysis.graph_module.meta else "torch.fx"
    try:
        never = analysis.compile(exfx.Config(threshold=-math.inf))
        default = analysis.compile(exfx.Config())
    except exfx.ExfxError as err:
        return CoverageRow(name, captured, status=f"failed: {type(err).__name__}: {err}")
    with torch.no_grad():
        error = (_first(never(*inputs)) - model(*inputs)).abs().max().item()
    flops = exfx.count_flops(default, *inputs)
    dense = exfx.count_flops(model, *inputs).dense
    family = [s for s in analysis.sites if s.relu_family]
    eligible = [s for s in family if s.eligible]
    if eligible:
        kinds = sorted({".".join(s.name.split(".")[-2:]) for s in eligible})
        status = f"sites in {', '.join(kinds)}"
    else:
        status = f"no site: {family[0].reason}" if family else "no ReLU-family activation"
    saved = 1 - flops.executed / dense if dense else math.nan
    return CoverageRow(name, captured, len(family), len(eligible), error, saved, status)


def main() -> None:
    rows = [coverage(name) for name in ARCHITECTURES]
    table = "\n".join([HEADER, *(row.markdown() for row in rows)])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coverage.md").write_text(table + "\n")
    (RESULTS / "coverage.json").write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
