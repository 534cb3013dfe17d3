"""Built-in example models for the ``exfx`` command and the docs.

Each factory returns ``(model, example_inputs)`` in eval mode, randomly
initialised from a fixed seed (no download, no data). A factory is named on the
command line as ``module:function``, e.g. ``exfx.examples:small_cnn``; your own
factories follow the same convention.

The module also defines the benchmarks' architectures (:class:`VGG11` and :class:`ResNet18` for 32x32 images,
the graph model :class:`GCN` and its ``GCNConv`` spelling :class:`GCNConvGCN`), so that ``benchmarks/`` and the
tests share one definition. The graph models need PyTorch Geometric (``pip install ".[thirdparty]"``), imported
only when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["small_cnn", "mlp", "resnet_block_net", "SmallCNN", "BasicBlock", "ResNet18", "VGG11", "GCN", "GCNConvGCN",
           "Aggregation", "gather_aggregate", "mean_pool", "normalized_adjacency", "normalized_edges"]


class SmallCNN(nn.Module):
    """A VGG-style CNN for 28x28 grey images (Fashion-MNIST sized): conv-BN-ReLU x3, two linears."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class _ResidualNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(h)))
        out = F.relu(self.bn2(self.conv2(out)) + h)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _seeded(make: Callable[[], nn.Module], *shape: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``make()`` initialised from seed 0, without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
    generator = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randn(*shape, generator=generator),)


def small_cnn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`SmallCNN` with a batch of 8 random 1x28x28 images."""
    return _seeded(SmallCNN, 8, 1, 28, 28)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A 784-256-256-10 MLP with a batch of 8 random inputs."""
    return _seeded(_MLP, 8, 784)


def resnet_block_net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A stem and one residual basic block (64 channels), batch of 4 random 3x32x32 images."""
    return _seeded(_ResidualNet, 4, 3, 32, 32)


# The benchmarks' CIFAR-style architectures (benchmarks/models.py names them).


class BasicBlock(nn.Module):
    """The ResNet basic block: conv-BN-ReLU, conv-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), base width 64 by default."""

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class VGG11(nn.Module):
    """VGG-11 for 32x32 inputs with BatchNorm after every conv, as the paper's CIFAR VGG-11 (base width 64)."""

    PLAN = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in self.PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = width * int(item)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# The graph model of the ExPrune reproduction table (benchmarks/train_gcn.py trains it); needs PyTorch Geometric.


Aggregation = Literal["sparse", "gather"]


def normalized_edges(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source ids, target ids and weights of the edges of ``D^-1/2 (A + I) D^-1/2`` (self-loops added)."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    edge_index, weight = gcn_norm(edge_index, None, num_nodes, False, True)
    return edge_index[0], edge_index[1], weight


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Sparse CSR (n, n) ``D^-1/2 (A + I) D^-1/2``: row ``i`` holds the weights of the edges ``j -> i``."""
    from torch_geometric.utils import to_torch_csr_tensor

    src, dst, weight = normalized_edges(edge_index, num_nodes)
    return to_torch_csr_tensor(torch.stack([dst, src]), weight, (num_nodes, num_nodes))


# Leaf calls for torch.fx: PyG's Python control flow and size checks must not be traced through.
torch.fx.wrap("normalized_edges")
torch.fx.wrap("normalized_adjacency")


def gather_aggregate(h: Tensor, src: Tensor, dst: Tensor, weight: Tensor) -> Tensor:
    """``out[i] = sum over edges (j -> i) of weight * h[j]``, by gather and scatter."""
    messages = h.index_select(0, src) * weight.view(-1, 1)
    return torch.zeros_like(h).index_add(0, dst, messages)


def mean_pool(h: Tensor, batch: Tensor) -> Tensor:
    """Mean of the node rows of each graph; ``batch`` holds graph ids 0..B-1, every graph non-empty."""
    counts = torch.bincount(batch)
    sums = h.new_zeros((counts.size(0), h.size(1))).index_add(0, batch, h)
    return sums / counts.clamp(min=1).to(h.dtype).view(-1, 1)


class GCNLayer(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU`` on the aggregated features (the linear is exfx's site)."""

    def __init__(self, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, aggregated: Tensor) -> Tensor:
        return self.dropout(torch.relu(self.norm(self.linear(aggregated))))


class GCN(nn.Module):
    """Node embedding, ``layers`` GCN layers of width ``hidden``, mean pooling and a linear head.

    What: ``Linear(in_features, hidden)`` node embedding; ``layers`` layers of GCN-normalised neighbourhood
    aggregation (symmetric normalisation with self-loops, PyTorch Geometric's ``gcn_norm``) followed by
    ``Linear -> BatchNorm1d -> ReLU``; mean pooling per graph; a ``Linear(hidden, classes)`` head.
    ``forward(x, edge_index, batch)`` takes a disjoint-union batch (node features, edges, the graph id of each
    node) and returns logits (graphs, classes). The benchmark's is OGB-style: hidden width 300, five layers.

    Why it is written this way:

    - **Aggregate, then transform.** ``GCNConv`` computes ``A (X W)``; this model computes ``(A X) W``,
      the same function. exfx puts an early-exit site on a linear that directly feeds a ReLU (an eval-mode
      BatchNorm in between is folded into the linear), so the linear must come last in each layer. exfx also
      carries partial sums through message passing, so :class:`GCNConvGCN`, the same function written with
      ``GCNConv`` (transform, then aggregate) and loading the same checkpoint, has a site per layer too.
    - **Two spellings of the aggregation, one function.** ``aggregation="sparse"`` (the default, used for
      training) computes ``adj @ h`` with ``adj`` the normalised adjacency ``D^-1/2 (A + I) D^-1/2`` as a
      sparse CSR tensor (rows are target nodes): on one CPU thread it is about 7x faster, forward and
      backward, than the alternative. ``aggregation="gather"`` gathers the source rows (``index_select``),
      scales them by the edge weights and sums them into the target rows (``index_add``). Both give the same
      outputs (up to float reassociation) and load the same checkpoint. Use ``"gather"`` for FLOP counts:
      ``torch.utils.flop_counter`` (and so ``exfx.count_flops``) counts a sparse ``adj @ h`` as a dense
      (n, n) x (n, hidden) matmul, which would dwarf the linear layers, while it counts no FLOPs for gather
      and scatter, so the count is exactly the embedding, the linear layers and the head.
    - **Traceable by ``torch.fx``.** exfx understands the permutation symmetry of ``@``, ``index_select``,
      ``index_add`` and broadcasting, so the hidden features stay one exchangeable group. The edge
      preprocessing (PyTorch Geometric's ``gcn_norm``, plus ``to_torch_csr_tensor`` for the sparse spelling)
      is registered with ``torch.fx.wrap``: it stays one opaque call on the edge data, which exfx pins (edges
      are model inputs anyway). Mean pooling takes the number of graphs from a tensor op
      (``torch.bincount(batch)``), never from ``int(batch.max()) + 1``, which would freeze the first batch's
      graph count into the traced graph. The compiled module therefore runs on batches with any number of
      nodes, edges and graphs.
    """

    def __init__(self, in_features: int = 3, hidden: int = 300, layers: int = 5, classes: int = 10,
                 dropout: float = 0.0, aggregation: Aggregation = "sparse") -> None:
        super().__init__()
        if aggregation not in ("sparse", "gather"):
            raise ValueError(f"aggregation must be 'sparse' or 'gather', got {aggregation!r}")
        self.aggregation = aggregation
        self.embed = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(GCNLayer(hidden, dropout) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor) -> Tensor:
        h = self.embed(x)
        if self.aggregation == "sparse":
            adj = normalized_adjacency(edge_index, x.size(0))
            for layer in self.layers:
                h = layer(adj @ h)
        else:
            src, dst, weight = normalized_edges(edge_index, x.size(0))
            for layer in self.layers:
                h = layer(gather_aggregate(h, src, dst, weight))
        return self.head(mean_pool(h, batch))


class GCNConvGCN(nn.Module):
    """The benchmark :class:`GCN` spelled with PyTorch Geometric's ``GCNConv``: the same function, inference only.

    ``GCNConv`` transforms, then aggregates: ``A (h W) + b``, with the bias added after the aggregation. Each
    layer of :class:`GCN` computes ``BN(A h W_l + b_l)`` in eval mode, and an eval BatchNorm is a per-feature
    affine map ``y -> s * (y - mean) + beta`` (``s = gamma / sqrt(var + eps)``), which commutes with the
    aggregation (``A`` acts on rows, ``s`` on columns). So the layer is ``A h W + b`` with ``W = s * W_l`` (row
    ``i`` of the ``(out, in)`` weight scaled by ``s_i``) and ``b = s * (b_l - mean) + beta``: one ``GCNConv``.
    :meth:`load_gcn_state_dict` folds a :class:`GCN` checkpoint that way (``GCNConv`` normalises with the same
    ``gcn_norm``, self-loops added), so both spellings give the same outputs up to float reassociation.
    Because the BatchNorm statistics are folded in, this spelling cannot be trained; train :class:`GCN`.

    exfx carries each ReLU's partial sums through ``GCNConv``'s message passing (gather, scale by the edge
    weight, scatter-add), so every ``convs.<i>.lin`` is an early-exit site.
    """

    def __init__(self, in_features: int = 3, hidden: int = 300, layers: int = 5, classes: int = 10) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.embed = nn.Linear(in_features, hidden)
        self.convs = nn.ModuleList(GCNConv(hidden, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor) -> Tensor:
        h = self.embed(x)
        for conv in self.convs:
            h = torch.relu(conv(h, edge_index))
        return self.head(mean_pool(h, batch))

    @classmethod
    def from_gcn(cls, model: GCN) -> GCNConvGCN:
        """This spelling of ``model`` (its weights and eval BatchNorm statistics folded in), in eval mode."""
        layer = model.layers[0]
        spelled = cls(model.embed.in_features, model.embed.out_features, len(model.layers), model.head.out_features)
        spelled.load_gcn_state_dict(model.state_dict(), eps=layer.norm.eps)
        return spelled.eval()

    def load_gcn_state_dict(self, state: dict[str, Tensor], eps: float = 1e-5) -> None:
        """Load a :class:`GCN` state dict (e.g. a training checkpoint's ``state_dict``), folding each layer's
        BatchNorm (``eps`` as in :class:`GCN`'s ``BatchNorm1d``) into its ``GCNConv`` (see the class docstring)."""
        with torch.no_grad():
            for name in ("embed.weight", "embed.bias", "head.weight", "head.bias"):
                dict(self.named_parameters())[name].copy_(state[name])
            for i, conv in enumerate(self.convs):
                prefix = f"layers.{i}"
                scale = state[f"{prefix}.norm.weight"] / torch.sqrt(state[f"{prefix}.norm.running_var"] + eps)
                conv.lin.weight.copy_(scale[:, None] * state[f"{prefix}.linear.weight"])
                conv.bias.copy_(scale * (state[f"{prefix}.linear.bias"] - state[f"{prefix}.norm.running_mean"])
                                + state[f"{prefix}.norm.bias"])
