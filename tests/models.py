"""Small eval-mode models that exercise every pattern exfx handles (shared by the tests)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from exfx import examples


class MLP(nn.Module):
    """Every ReLU spelling in one network."""

    def __init__(self, sizes: tuple[int, ...] = (20, 64, 64, 48, 40, 10)) -> None:
        super().__init__()
        self.net = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spellings = [self.act, F.relu, torch.relu, lambda t: t.relu(), lambda t: t.relu_()]
        for i, layer in enumerate(self.net[:-1]):
            x = spellings[i % len(spellings)](layer(x))
        return self.net[-1](x)


class FunctionalMLP(nn.Module):
    """Functional weights: ``F.linear`` with parameters and ``x @ W + b``."""

    def __init__(self, d_in: int = 16, hidden: int = 64, d_out: int = 5) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, d_in) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(hidden, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.w3 = nn.Parameter(torch.randn(hidden, d_out) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x, self.w1, self.b1))
        h = F.relu(F.linear(h, self.w2, self.b2))
        return h @ self.w3


def randomise_bn(model: nn.Module, seed: int = 0, spread: float = 0.1) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * spread)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * spread)
    return model


class VGGish(nn.Module):
    """VGG-style CNN with BN, max pooling, flatten and a classifier."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 4 * 4, 64), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(64, classes))
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(examples.BasicBlock):
    """:class:`exfx.examples.BasicBlock` with its ReLUs spelled as one in-place ``nn.ReLU`` module."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetish(nn.Module):
    """A CIFAR-style ResNet with basic blocks, a 1x1 shortcut and global average pooling."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, classes)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class GCN(nn.Module):
    """Dense-adjacency GCN: ``relu(adj @ (h @ W) + b)`` layers, then mean pooling."""

    def __init__(self, d_in: int = 8, hidden: int = 64, classes: int = 3, layers: int = 3) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * layers
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(a, b) / math.sqrt(a)) for a, b in zip(dims, dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(b) * 0.1) for b in dims[1:])
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = x
        for w, b in zip(self.weights, self.biases):
            h = torch.relu(adj @ (h @ w) + b)
        return self.head(h.mean(0, keepdim=True))


class OPTBlockLM(nn.Module):
    """An OPT-style decoder: embedding, pre-LN attention, ReLU FFN (fc1/fc2), LM head."""

    def __init__(self, vocab: int = 50, d: int = 48, heads: int = 4, ffn: int = 96, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d),
                "ln2": nn.LayerNorm(d), "fc1": nn.Linear(d, ffn), "fc2": nn.Linear(ffn, d)}))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        b, t, d = h.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).chunk(3, dim=-1)
            q = q.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            k = k.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            v = v.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["out"](att.transpose(1, 2).reshape(b, t, d))
            h = h + blk["fc2"](F.relu(blk["fc1"](blk["ln2"](h))))
        return self.lm_head(self.ln_f(h))


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-conv1x1 (bottleneck) then BN-ReLU-conv3x3; the caller concatenates."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNetish(nn.Module):
    """A DenseNet-style CNN: every dense layer's 1x1 conv contracts over a concat of all earlier features."""

    def __init__(self, stem: int = 16, growth: int = 8, layers: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        self.block = nn.ModuleList(DenseLayer(stem + i * growth, growth) for i in range(layers))
        width = stem + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(width // 2)
        self.fc = nn.Linear(width // 2, classes)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        for layer in self.block:
            features = torch.cat([features, layer(features)], 1)
        out = F.relu(self.norm(self.transition(features)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expand + ReLU6, depthwise 3x3 + ReLU6, 1x1 linear projection; optional
    MobileNet-V3 squeeze-excitation gate (ReLU, Hardsigmoid) on the expanded features."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4, se: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, hidden // 4, 1), nn.ReLU(),
                                nn.Conv2d(hidden // 4, hidden, 1), nn.Hardsigmoid()) if se else None
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        if self.se is not None:
            h = h * self.se(h)
        out = self.project(h)
        return x + out if self.residual else out


class MobileNetV2ish(nn.Module):
    """A MobileNet-V2-style CNN (ReLU6 everywhere), with one V3-style squeeze-excitation block."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width, width), InvertedResidual(width, 2 * width, 2),
                                    InvertedResidual(2 * width, 2 * width, se=True))
        self.head = nn.Sequential(nn.Conv2d(2 * width, 8 * width, 1, bias=False), nn.BatchNorm2d(8 * width),
                                  nn.ReLU6())
        self.fc = nn.Linear(8 * width, classes)
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TransformerEncoderClassifier(nn.Module):
    """Embedding, PyTorch's own ``nn.TransformerEncoder`` (ReLU FFN, eval fast path available), mean, head."""

    def __init__(self, vocab: int = 100, d: int = 64, heads: int = 4, ffn: int = 256, layers: int = 2,
                 classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


# ---------------------------------------------------------------------------
# Real architectures, random-initialised from small configs, no download: third-party ones (transformers, PyTorch
# Geometric; imported only when built) and the models above that stand for DenseNet, MobileNet-V2 and
# nn.TransformerEncoder. tests/test_third_party.py checks them; `python -m benchmarks.third_party` tabulates them.
# ---------------------------------------------------------------------------


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
    """A model of this module with its example inputs."""

    def factory() -> tuple[torch.nn.Module, tuple[Any, ...]]:
        generator = torch.Generator().manual_seed(3)
        if kind == "DenseNetish":
            return DenseNetish(), (torch.randn(2, 3, 16, 16, generator=generator),)
        if kind == "MobileNetV2ish":
            return MobileNetV2ish(), (torch.randn(2, 3, 32, 32, generator=generator),)
        if kind == "TransformerEncoderClassifier":
            return TransformerEncoderClassifier(), (_ids(2, 10),)
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
    """The architecture ``name`` of :data:`ARCHITECTURES`, in eval mode, with its example inputs (seed 0)."""
    torch.manual_seed(0)
    model, inputs = ARCHITECTURES[name][1]()
    return model.eval(), inputs
