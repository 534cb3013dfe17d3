"""Third-party architectures through exfx: random-initialised from small configs, no download.

Run:  python -m benchmarks.third_party        (needs `pip install ".[thirdparty]"`)

Prints a Markdown table: architecture, how it was captured, the ENP sites found,
the never-prune equivalence error, and the status. tests/test_third_party.py
checks the same models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import exfx

__all__ = ["ARCHITECTURES", "build", "main"]


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


#: name -> (pip package, factory returning (model, example_inputs))
ARCHITECTURES: dict[str, tuple[str, Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]]] = {
    "OPT (transformers)": ("transformers", _opt),
    "BERT, hidden_act=relu (transformers)": ("transformers", _bert),
    "T5, ReLU feed-forward (transformers)": ("transformers", _t5),
    "GCN (PyTorch Geometric)": ("torch_geometric", _graph("GCN")),
    "GIN (PyTorch Geometric)": ("torch_geometric", _graph("GIN")),
    "GraphSAGE (PyTorch Geometric)": ("torch_geometric", _graph("GraphSAGE")),
}


def build(name: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    model, inputs = ARCHITECTURES[name][1]()
    return model.eval(), inputs


def _row(name: str) -> str:
    try:
        model, inputs = build(name)
    except ImportError as err:
        return f"| {name} | - | - | - | skipped: {err.name} not installed |"
    try:
        exfx.compile(model, inputs, capture="fx")
        captured = "torch.fx"
    except exfx.CaptureError:
        captured = "Dynamo (fallback)"
    try:
        gm = exfx.compile(model, inputs, exfx.Config(threshold=-math.inf, samples=16))
    except exfx.ExfxError as err:
        return f"| {name} | failed | - | - | {type(err).__name__}: {err} |"
    with torch.no_grad():
        out = gm(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        error = (out - model(*inputs)).abs().max().item()
    report = gm.meta["exfx_report"]
    sites = [s for s in report.sites if s.eligible]
    if sites:
        kinds = sorted({".".join(s.name.split(".")[-2:]) for s in sites})
        status = f"compiles; sites in {', '.join(kinds)}"
    else:
        status = f"compiles, no site: {report.sites[0].reason}" if report.sites else "compiles, no ReLU"
    return f"| {name} | {captured} | {len(sites)} of {len(report.sites)} | {error:.1e} | {status} |"


def main() -> None:
    print("| architecture | captured by | ENP sites (samples 16) | never-prune max error | status |")
    print("|---|---|---|---|---|")
    for name in ARCHITECTURES:
        print(_row(name))


if __name__ == "__main__":
    main()
