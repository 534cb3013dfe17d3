"""Unstructured global magnitude pruning: zero the smallest-|w| fraction of every linear/conv weight, as masks.

:func:`magnitude_prune` ranks the weights of every canonical linear and conv of
an analysed graph (``exfx.analyse``: BatchNorm already folded, so the ranked
values are the weights the model actually multiplies by) together, by absolute
value, and sets exactly ``round(sparsity * N)`` of them to zero, ties broken by
position. Nothing is removed: shapes, the graph and the FLOP count stay as
they were; the zeros are the mask. Biases are not pruned. The first layer and
the classifier are pruned too (the sparsity is global over all of them).

Why it is safe: only the values of ``get_attr`` weight tensors change, in a
copy of the graph module (the analysed graph is never modified); every shape
is unchanged and the graph is linted and its shapes re-propagated. A weight
shared by several layers is ranked once. At sparsity 0 nothing changes.

ExPrune on the result (``exfx.calibrate`` of the returned GraphModule) sees
ordinary dense weights with zeros in them: its partial sums take their k terms
from the first k input units of the layer, zeros included (the exfx ops read a
contiguous prefix of the input axis, shared by all output units; sampling each
output unit's own non-zero inputs would need a per-unit gather in the ops).

Example::

    >>> sparse, report = magnitude_prune(exfx.analyse(model, (x,)), (x,), sparsity=0.9)
    >>> report.sparsity
    0.9
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from exfx.analysis.opsets import is_producer
from exfx.capture import normalise_inputs
from exfx.meta import GROUPS_KEY, SITE_KEY
from exfx.passes.attributes import owner_of, replace_tensor
from exfx.snp.errors import PruneError

logger = logging.getLogger(__name__)

__all__ = ["LayerSparsity", "MagnitudeResult", "magnitude_prune", "weight_targets", "apply_magnitude_masks"]


class AnalysedGraph(Protocol):
    """What :func:`magnitude_prune` reads of an :class:`exfx.Analysis`."""

    graph_module: fx.GraphModule


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned weight tensor: its ``get_attr`` target, the layers reading it, its size and zeros after pruning."""

    target: str
    layers: tuple[str, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class MagnitudeResult:
    """What :func:`magnitude_prune` did: the asked and achieved global sparsity and every weight's own."""

    requested: float
    zeroed: int
    numel: int
    layers: tuple[LayerSparsity, ...]
    seconds: float

    @property
    def sparsity(self) -> float:
        """Share of the ranked weights that are zero after pruning (``zeros / numel``)."""
        return sum(layer.zeros for layer in self.layers) / self.numel if self.numel else 0.0

    def __str__(self) -> str:
        lines = [f"magnitude pruning: requested {self.requested:.4f}, achieved {self.sparsity:.4f} "
                 f"({self.zeroed:,} of {self.numel:,} weights zeroed), {self.seconds:.2f} s"]
        lines += [f"  {layer.target:<40} {layer.numel:>10,} {layer.sparsity:>8.2%}" for layer in self.layers]
        return "\n".join(lines)


def _tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner: Any = gm
    for part in target.split("."):
        owner = getattr(owner, part)
    if not isinstance(owner, torch.Tensor):
        raise PruneError(f"magnitude: `{target}` is a {type(owner).__name__}, not a weight tensor")
    return owner


def weight_targets(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """``get_attr`` target of each canonical linear/conv weight -> the names of the layers that read it."""
    targets: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if is_producer(node) and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            targets.setdefault(str(node.args[1].target), []).append(node.name)
    return {target: tuple(names) for target, names in targets.items()}


def apply_magnitude_masks(gm: fx.GraphModule, targets: Sequence[str], sparsity: float) -> int:
    """Zero the ``round(sparsity * N)`` smallest-|w| entries of ``targets`` together, in place; the count zeroed."""
    tensors = [_tensor(gm, target) for target in targets]
    flat = torch.cat([t.detach().reshape(-1).abs().to(torch.float64) for t in tensors])
    count = round(sparsity * flat.numel())
    if count == 0:
        return 0
    order = torch.sort(flat, stable=True).indices[:count]
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[order] = False
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            size = tensor.numel()
            tensor.mul_(mask[offset:offset + size].reshape(tensor.shape).to(tensor.dtype))
            offset += size
    return count


def _detach_weights(gm: fx.GraphModule, targets: Sequence[str]) -> None:
    """Give ``gm`` its own copy of each target (a deepcopy already has one; this is the guard)."""
    for target in targets:
        owner, leaf = owner_of(gm, target)
        replace_tensor(gm, target, getattr(owner, leaf).detach().clone())


def magnitude_prune(analysis: AnalysedGraph, example_inputs: Any, *,
                    sparsity: float) -> tuple[fx.GraphModule, MagnitudeResult]:
    """A copy of ``analysis.graph_module`` with the smallest-|w| ``sparsity`` of its linear/conv weights zeroed.

    Args:
        analysis: an :class:`exfx.Analysis` (its graph is not modified).
        example_inputs: the positional example inputs (shapes are re-propagated on them).
        sparsity: the global fraction of linear/conv weights set to zero, in ``[0, 1)``.

    Raises:
        exfx.snp.PruneError: ``sparsity`` outside ``[0, 1)``, or no linear/conv weight to prune.
    """
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise PruneError(f"magnitude: sparsity={sparsity!r} is outside [0, 1): it is the fraction of all "
                         f"linear/conv weights set to zero")
    start = time.perf_counter()
    inputs = normalise_inputs(example_inputs)
    gm = copy.deepcopy(analysis.graph_module)
    readers = weight_targets(gm)
    if not readers:
        raise PruneError("magnitude: the graph has no linear or conv with a weight tensor to prune")
    _detach_weights(gm, list(readers))
    zeroed = apply_magnitude_masks(gm, list(readers), float(sparsity))
    layers = tuple(LayerSparsity(target, names, _tensor(gm, target).numel(), int((_tensor(gm, target) == 0).sum()))
                   for target, names in readers.items())
    for node in gm.graph.nodes:
        node.meta.pop(SITE_KEY, None)  # the weights changed: re-analyse before compiling
        node.meta.pop(GROUPS_KEY, None)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    result = MagnitudeResult(requested=float(sparsity), zeroed=zeroed, numel=sum(layer.numel for layer in layers),
                             layers=layers, seconds=time.perf_counter() - start)
    logger.info("%s", result)
    return gm, result
