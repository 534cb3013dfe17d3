"""Second-moment statistics of hidden units, accumulated in float64 over a data set.

For each requested ``(node, axis)`` the recorder keeps ``sum x x^T``, ``sum x``
and the sample count, where a *sample* is one slice of the node's tensor across
the unit axis: one row of a linear's ``(N, n)`` activations, one spatial position
of a conv's ``(N, C, H, W)`` activations (``N*H*W`` samples of ``C`` units per
batch). From those come the Gram matrix ``E[x x^T]``, the mean and the covariance
that static pruning orders, factorises and folds with.

The model is run with a ``torch.fx.Interpreter`` over the analysed GraphModule
(never the user's module), in ``torch.no_grad()``; values are read, never
changed, so the run is the model's own forward pass.

Example::

    >>> stats = collect_statistics(analysis.graph_module, {"relu": 1}, loader)
    >>> stats["relu"].covariance.shape
    torch.Size([16, 16])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from exfx.snp.errors import PruneError

logger = logging.getLogger(__name__)

__all__ = ["UnitStatistics", "collect_statistics", "batch_inputs"]


class UnitStatistics:
    """Running float64 sums over samples of ``n`` units: ``sum x x^T``, ``sum x`` and the count."""

    def __init__(self, n_units: int) -> None:
        self.n_units = n_units
        self.sum_outer = torch.zeros(n_units, n_units, dtype=torch.float64)
        self.sum = torch.zeros(n_units, dtype=torch.float64)
        self.count = 0

    def update(self, value: torch.Tensor, axis: int) -> None:
        """Add every sample of ``value`` (the unit axis is ``axis``; every other axis indexes samples)."""
        rows = value.detach().movedim(axis, -1).reshape(-1, self.n_units).to(torch.float64)
        self.sum_outer += rows.T @ rows
        self.sum += rows.sum(0)
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """``E[x]``."""
        return self.sum / max(self.count, 1)

    @property
    def gram(self) -> torch.Tensor:
        """``E[x x^T]``."""
        return self.sum_outer / max(self.count, 1)

    @property
    def covariance(self) -> torch.Tensor:
        """``E[x x^T] - E[x] E[x]^T`` (population covariance), symmetrised."""
        mean = self.mean
        cov = self.gram - torch.outer(mean, mean)
        return (cov + cov.T) / 2

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sum_outer).all() and torch.isfinite(self.sum).all())


class _Recorder(fx.Interpreter):
    """Runs the graph and adds the value of each watched node to its statistics."""

    def __init__(self, gm: fx.GraphModule, watch: Mapping[str, int], stats: Mapping[str, UnitStatistics]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.watch, self.stats = watch, stats

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.watch:
            self.stats[n.name].update(value, self.watch[n.name])
        return value


def batch_inputs(batch: Any) -> tuple[Any, ...]:
    """The positional model inputs of one ``(inputs, targets)`` batch (a bare tensor is its own input)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        inputs = batch[0]
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    raise PruneError(f"data must yield (inputs, targets) batches; got a {type(batch).__name__}")


def collect_statistics(gm: fx.GraphModule, watch: Mapping[str, int], data: Iterable[Any]) -> dict[str, UnitStatistics]:
    """Statistics of every watched node (``node name -> unit axis``) over all batches of ``data``.

    Raises:
        PruneError: ``data`` yielded no batch.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    stats = {name: UnitStatistics(int(nodes[name].meta["tensor_meta"].shape[axis])) for name, axis in watch.items()}
    recorder = _Recorder(gm, watch, stats)
    batches = 0
    with torch.no_grad():
        for batch in data:
            recorder.run(*batch_inputs(batch))
            batches += 1
    if batches == 0:
        raise PruneError("data yielded no batch: give an iterable of (inputs, targets) batches")
    logger.debug("snp: statistics of %d nodes over %d batches", len(stats), batches)
    return stats
