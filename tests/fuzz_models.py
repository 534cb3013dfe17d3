"""A hypothesis strategy for random eval-mode ReLU architectures.

``architectures()`` draws a :class:`Spec` (plain data, printed by hypothesis
when a property fails) and :func:`build` turns it into a model and inputs.
Covered: MLPs, CNNs with and without BN, residual blocks, concat branches of
unequal widths (with BN after the concat; the next conv contracts over both blocks),
grouped convs, flatten -> linear, average-pool -> linear, mixed ReLU spellings,
random widths, depths, batch sizes and input shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from models import randomise_bn

RELU_SPELLINGS = ("module", "module_inplace", "F.relu", "F.relu_inplace", "torch.relu", "torch.relu_",
                  "method", "method_", "ReLU6", "F.relu6", "Hardtanh(0,6)", "clamp(min=0)", "clamp(0,6)",
                  "clamp_min(0)", "clamp_(0,6)")
#: The ReLU family spelled as a clamp (ReLU6 and its kin): sites too, canonicalized to clamp(x, 0.0, t) or relu.
_CLAMP_SPELLINGS = {
    "F.relu6": lambda x: F.relu6(x),
    "clamp(min=0)": lambda x: torch.clamp(x, min=0),
    "clamp(0,6)": lambda x: torch.clamp(x, 0, 6),
    "clamp_min(0)": lambda x: x.clamp_min(0),
    "clamp_(0,6)": lambda x: x.clamp_(0.0, 6.0),
}


def relu_module(spelling: str) -> nn.Module:
    """The module a ``module``-style spelling calls (``ReLU``, ``ReLU6``, ``Hardtanh(0, 6)``)."""
    if spelling == "ReLU6":
        return nn.ReLU6()
    if spelling == "Hardtanh(0,6)":
        return nn.Hardtanh(0.0, 6.0)
    return nn.ReLU(inplace=spelling == "module_inplace")


def apply_relu(spelling: str, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if spelling in ("module", "module_inplace", "ReLU6", "Hardtanh(0,6)"):
        return module(x)
    if spelling in _CLAMP_SPELLINGS:
        return _CLAMP_SPELLINGS[spelling](x)
    if spelling == "F.relu":
        return F.relu(x)
    if spelling == "F.relu_inplace":
        return F.relu(x, inplace=True)
    if spelling == "torch.relu":
        return torch.relu(x)
    if spelling == "torch.relu_":
        return torch.relu_(x)
    if spelling == "method":
        return x.relu()
    return x.relu_()


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear" | "conv" | "residual" | "concat" | "pool"
    width: int = 0
    kernel: int = 3
    groups: int = 1
    bias: bool = True
    bn: bool = False
    relu: str = "F.relu"
    width2: int = 0  # concat only: the second branch's width (0: same as ``width``)


@dataclass(frozen=True)
class Spec:
    family: str  # "mlp" | "cnn"
    in_features: int
    spatial: int
    batch: int
    layers: tuple[Layer, ...]
    head: str = "flatten"  # cnn only: "flatten" | "avgpool"
    out_features: int = 3
    seed: int = 0


class FuzzNet(nn.Module):
    """A network built from a :class:`Spec`; its forward is static Python over the spec."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList()
        width = spec.in_features
        spatial = spec.spatial
        for layer in spec.layers:
            block = nn.ModuleDict()
            if layer.kind == "linear":
                block["op"] = nn.Linear(width, layer.width, bias=layer.bias)
                if layer.bn:
                    block["bn"] = nn.BatchNorm1d(layer.width)
                width = layer.width
            elif layer.kind == "conv":
                block["op"] = nn.Conv2d(width, layer.width, layer.kernel, padding=layer.kernel // 2,
                                        groups=layer.groups, bias=layer.bias)
                if layer.bn:
                    block["bn"] = nn.BatchNorm2d(layer.width)
                width = layer.width
            elif layer.kind == "residual":
                conv = spec.family == "cnn"
                make = (lambda: nn.Conv2d(width, width, 3, padding=1, bias=layer.bias)) if conv else (
                    lambda: nn.Linear(width, width, bias=layer.bias))
                block["op"], block["op2"] = make(), make()
                if layer.bn:
                    norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
                    block["bn"], block["bn2"] = norm(width), norm(width)
            elif layer.kind == "concat":
                block["op"] = nn.Conv2d(width, layer.width, 3, padding=1, bias=layer.bias)
                block["op2"] = nn.Conv2d(width, layer.width2 or layer.width, 1, bias=layer.bias)
                width = layer.width + (layer.width2 or layer.width)
                if layer.bn:  # DenseNet's BN-ReLU after the concat: it cannot fold into two producers
                    block["bn"] = nn.BatchNorm2d(width)
            elif layer.kind == "pool":
                spatial //= 2
            block["relu"] = relu_module(layer.relu)
            self.blocks.append(block)
        if spec.family == "mlp":
            self.head = nn.Linear(width, spec.out_features)
        elif spec.head == "flatten":
            self.head = nn.Linear(width * spatial * spatial, spec.out_features)
        else:
            self.head = nn.Linear(width, spec.out_features)
        randomise_bn(self, spec.seed, spread=0.2)

    def _norm(self, block: nn.ModuleDict, key: str, x: torch.Tensor) -> torch.Tensor:
        return block[key](x) if key in block else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, block in zip(self.spec.layers, self.blocks):
            if layer.kind in ("linear", "conv"):
                x = apply_relu(layer.relu, self._norm(block, "bn", block["op"](x)), block["relu"])
            elif layer.kind == "residual":
                h = apply_relu(layer.relu, self._norm(block, "bn", block["op"](x)), block["relu"])
                x = apply_relu(layer.relu, self._norm(block, "bn2", block["op2"](h)) + x, block["relu"])
            elif layer.kind == "concat":
                x = torch.cat([block["op"](x), block["op2"](x)], dim=1)
                x = apply_relu(layer.relu, self._norm(block, "bn", x), block["relu"])
            elif layer.kind == "pool":
                x = F.max_pool2d(x, 2)
        if self.spec.family == "cnn":
            x = x.flatten(1) if self.spec.head == "flatten" else F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(spec.seed)
    model = FuzzNet(spec).eval()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    if spec.family == "mlp":
        x = torch.randn(spec.batch, spec.in_features, generator=generator)
    else:
        x = torch.randn(spec.batch, spec.in_features, spec.spatial, spec.spatial, generator=generator)
    return model, x


_widths = st.integers(1, 72)
_relus = st.sampled_from(RELU_SPELLINGS)


@st.composite
def _mlp_layer(draw: st.DrawFn, width: int) -> Layer:
    kind = draw(st.sampled_from(("linear", "linear", "residual")))
    return Layer(kind=kind, width=draw(_widths) if kind == "linear" else width, bias=draw(st.booleans()),
                 bn=draw(st.booleans()), relu=draw(_relus))


@st.composite
def _cnn_layer(draw: st.DrawFn, width: int, spatial: int) -> Layer:
    kinds = ["conv", "conv", "residual", "concat"] + (["pool"] if spatial >= 4 else [])
    kind = draw(st.sampled_from(kinds))
    relu, bias, bn = draw(_relus), draw(st.booleans()), draw(st.booleans())
    if kind == "conv":
        out = draw(st.integers(1, 48))
        common = [g for g in range(1, min(width, out) + 1) if width % g == 0 and out % g == 0]
        groups = draw(st.sampled_from(common))
        return Layer("conv", width=out, kernel=draw(st.sampled_from((1, 3))), groups=groups, bias=bias, bn=bn,
                     relu=relu)
    if kind == "concat":
        return Layer("concat", width=draw(st.integers(1, 24)), width2=draw(st.integers(1, 24)), bias=bias, bn=bn,
                     relu=relu)
    return Layer(kind, width=width, bias=bias, bn=bn, relu=relu)


@st.composite
def architectures(draw: st.DrawFn) -> Spec:
    """A random eval-mode architecture (see module docstring)."""
    family = draw(st.sampled_from(("mlp", "cnn")))
    batch = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    depth = draw(st.integers(1, 4))
    layers: list[Layer] = []
    if family == "mlp":
        width = draw(st.integers(1, 48))
        in_features = width
        for _ in range(depth):
            layer = draw(_mlp_layer(width))
            layers.append(layer)
            width = layer.width
        return Spec("mlp", in_features, 0, batch, tuple(layers), seed=seed)
    in_channels = draw(st.integers(1, 4))
    spatial = initial_spatial = draw(st.integers(2, 8))
    width = in_channels
    for _ in range(depth):
        layer = draw(_cnn_layer(width, spatial))
        layers.append(layer)
        if layer.kind == "pool":
            spatial //= 2
        elif layer.kind == "concat":
            width = layer.width + (layer.width2 or layer.width)
        elif layer.kind == "conv":
            width = layer.width
    head = draw(st.sampled_from(("flatten", "avgpool")))
    return Spec("cnn", in_channels, initial_spatial, batch, tuple(layers), head=head, seed=seed)
