"""What static pruning did: frozen records per layer and per refused ReLU, and model-level parameter/FLOP counts.

Parameters are counted as the tensors the graph actually reads (``get_attr``
targets, once each, plus the parameters of called submodules), so modules
left behind by BatchNorm folding are not counted. FLOPs are what
``torch.utils.flop_counter.FlopCounterMode`` counts for one forward pass on the
example inputs (2 per multiply-add; element-wise work not counted), the
convention of :mod:`exfx.cost.model`.

Example::

    >>> pruned, report = exfx.prune(model, (x,), loader, ratio=0.5)
    >>> print(report)
    >>> report.params_after / report.params_before
    0.31
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from exfx.cost.flops import per_examples

__all__ = ["LayerPrune", "RefusedAxis", "PruneReport", "count_parameters", "count_forward_flops"]


@dataclass(frozen=True)
class LayerPrune:
    """One pruned (or kept whole) layer.

    Attributes:
        name: the site name of the producer of the units (``features.0``).
        units_before: units of the layer before pruning.
        units_after: units kept.
        method: ``snp``, ``l1``, ``random`` or ``bias_fold`` (``magnitude`` has no per-layer record).
        kept: the original indices of the kept units, ascending.
        consumers: site names of the layers whose inputs were sliced (and folded into).
        samples: statistics samples seen (0 when no data was used).
        energy_kept: share of the layer's LDL^T energy in the kept units (None without statistics).
    """

    name: str
    units_before: int
    units_after: int
    method: str
    kept: tuple[int, ...]
    consumers: tuple[str, ...]
    samples: int = 0
    energy_kept: float | None = None


@dataclass(frozen=True)
class RefusedAxis:
    """A ReLU whose units were left alone, and why."""

    name: str
    relu: str
    reason: str


@dataclass(frozen=True)
class PruneReport:
    """The outcome of :func:`exfx.prune`.

    Attributes:
        method: the selection/fold method.
        order: the unit ordering used for statistics-based counts (``pivoted_cholesky`` or ``zca``).
        ratio: the global removal ratio asked for, or None.
        keep_variance: the global retained-energy threshold asked for, or None.
        layers: every prunable layer, in graph order.
        refused: every ReLU left alone, in graph order, with the reason.
        params_before, params_after: parameters the graph reads.
        flops_before, flops_after: forward FLOPs on the example inputs.
        seconds: wall time of the whole pruning (analysis, statistics, folding, rebuild).
        sparsity: ``method="magnitude"`` only: the share of linear/conv weights that are zero afterwards
            (nothing is removed, so ``layers`` is empty and the FLOP count is unchanged).
    """

    method: str
    order: str
    ratio: float | None
    keep_variance: float | None
    layers: tuple[LayerPrune, ...]
    refused: tuple[RefusedAxis, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    seconds: float = 0.0
    sparsity: float | None = None
    examples: int | None = None  # the batch the FLOPs were counted on (the example inputs')

    @property
    def units_removed(self) -> int:
        return sum(layer.units_before - layer.units_after for layer in self.layers)

    def layer(self, name: str) -> LayerPrune:
        """The record of one layer, by site name."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no prunable layer named {name!r}; layers: {[layer.name for layer in self.layers]}")

    def __str__(self) -> str:
        target = (f"ratio={self.ratio:g}" if self.ratio is not None else f"keep_variance={self.keep_variance:g}")
        lines = [f"static pruning: method={self.method} order={self.order} {target}",
                 f"{'layer':<28} {'units':>12} {'kept %':>7} {'energy':>7}  consumers"]
        for layer in self.layers:
            units = f"{layer.units_before}->{layer.units_after}"
            share = 100.0 * layer.units_after / max(layer.units_before, 1)
            energy = f"{layer.energy_kept:.4f}" if layer.energy_kept is not None else "-"
            lines.append(f"{layer.name:<28} {units:>12} {share:>6.1f}% {energy:>7}  {', '.join(layer.consumers)}")
        for refused in self.refused:
            lines.append(f"{refused.name:<28} {'left alone':>12}  {refused.reason}")
        if self.sparsity is not None:
            lines.append(f"global magnitude masks: {self.sparsity:.2%} of linear/conv weights are zero")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} "
                     f"({_percent(self.params_after, self.params_before)}); "
                     f"FLOPs {self.flops_before:,} -> {self.flops_after:,} {per_examples(self.examples)} "
                     f"({_percent(self.flops_after, self.flops_before)}); {self.seconds:.2f} s")
        return "\n".join(lines)


def _percent(after: int, before: int) -> str:
    return f"{100.0 * after / before:.1f}%" if before else "-"


def count_parameters(gm: fx.GraphModule) -> int:
    """Elements of every tensor the graph reads: each ``get_attr`` target once, plus called modules' parameters."""
    seen: set[str] = set()
    total = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) not in seen:
            seen.add(str(node.target))
            value = _attribute(gm, str(node.target))
            total += value.numel() if isinstance(value, torch.Tensor) else 0
        elif node.op == "call_module" and str(node.target) not in seen:
            seen.add(str(node.target))
            total += sum(p.numel() for p in gm.get_submodule(str(node.target)).parameters())
    return total


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner: Any = gm
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


def count_forward_flops(module: torch.nn.Module, inputs: tuple[Any, ...]) -> int:
    """FLOPs of one forward pass as ``FlopCounterMode`` counts them."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return int(counter.get_total_flops())
