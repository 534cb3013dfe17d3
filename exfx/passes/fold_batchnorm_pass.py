"""Fold eval-mode BatchNorm into the linear or conv that produces its input.

``bn(conv(x, W, b))`` with running statistics ``mu, var``, affine ``gamma, beta``
and ``s = gamma / sqrt(var + eps)`` equals ``conv(x, W * s, (b - mu) * s + beta)``
(``s`` scaling each output channel). The pass rewrites the producer's weight and
bias in exfx's private copy of the model and removes the BatchNorm node. The
fold is computed in float64 and cast back, so it is exact up to one rounding.

It applies to ``nn.BatchNorm1d``/``nn.BatchNorm2d`` modules and to
``F.batch_norm(..., training=False)`` with constant statistics, when

- the input is a canonical producer (see :mod:`canonicalize_pass`) whose only
  user is the BatchNorm, with a ``get_attr`` weight (and bias) used by nothing
  else, through any ``get_attr`` node (a module called twice is not folded), and
- the BatchNorm's channel axis is the producer's output axis (axis 1 of a conv;
  a linear's output must be 2-D for ``BatchNorm1d``).

Anything else is left in place; the exchangeability analysis treats a remaining
BatchNorm as a per-channel affine map.

Why it is safe: the model is in eval mode (capture refuses training mode), so
BatchNorm is a fixed affine map per channel, and composing two affine maps is
exact algebra.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.opsets import is_producer
from exfx.meta import producer_name
from exfx.passes.attributes import free_bias_target, replace_tensor

logger = logging.getLogger(__name__)

__all__ = ["FoldBatchNormPass"]

_BN_MODULES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)


class _BatchNormStats:
    """Running statistics and affine parameters of one eval-mode BatchNorm."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> None:
        self.mean, self.var, self.weight, self.bias, self.eps = mean, var, weight, bias, eps

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(self.var.double() + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.double()
        shift = -self.mean.double() * scale
        if self.bias is not None:
            shift = shift + self.bias.double()
        return scale, shift


class FoldBatchNormPass(PassBase):
    """Fold every foldable eval-mode BatchNorm into its producer (see module docstring)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes):
            stats = _batchnorm_stats(graph_module, node)
            if stats is not None and self._fold(graph_module, node, stats):
                modified = True
        if modified:
            graph_module.graph.eliminate_dead_code()
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)

    def _fold(self, gm: fx.GraphModule, bn: fx.Node, stats: _BatchNormStats) -> bool:
        producer = bn.args[0]
        if not (isinstance(producer, fx.Node) and is_producer(producer) and len(producer.users) == 1):
            return False
        weight_node, bias_node = producer.args[1], producer.args[2]
        if not _sole_use(weight_node):
            return False
        if bias_node is not None and not _sole_use(bias_node):
            return False
        out_meta = producer.meta.get("tensor_meta")
        if producer.target is F.linear and (out_meta is None or len(out_meta.shape) != 2):
            return False
        weight = operator.attrgetter(str(weight_node.target))(gm)
        if weight.shape[0] != stats.mean.shape[0]:
            return False
        scale, shift = stats.scale_and_shift()
        view = (-1,) + (1,) * (weight.dim() - 1)
        new_weight = (weight.double() * scale.reshape(view)).to(weight.dtype)
        old_bias = operator.attrgetter(str(bias_node.target))(gm).double() if bias_node is not None else 0.0
        new_bias = (old_bias * scale + shift).to(weight.dtype)
        replace_tensor(gm, str(weight_node.target), new_weight)
        if bias_node is None:
            bias_target = free_bias_target(gm, str(weight_node.target), "_folded_bias")
            replace_tensor(gm, bias_target, new_bias)
            with gm.graph.inserting_before(producer):
                bias_node = gm.graph.get_attr(bias_target)
            producer.args = (producer.args[0], weight_node, bias_node)
        else:
            replace_tensor(gm, str(bias_node.target), new_bias)
        bn.replace_all_uses_with(producer)
        gm.graph.erase_node(bn)
        logger.debug("folded %s into %s", bn.name, producer_name(producer))
        return True


def _sole_use(node: Any) -> bool:
    """A ``get_attr`` whose tensor has exactly one use in the graph.

    A module called twice reads its weight through two ``get_attr`` nodes, so
    counting the users of one node is not enough: folding would rescale the
    other call's weight too.
    """
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    reads = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == node.target]
    return sum(len(n.users) for n in reads) == 1


def _batchnorm_stats(gm: fx.GraphModule, node: fx.Node) -> _BatchNormStats | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, _BN_MODULES) or module.training or module.running_mean is None:
            return None
        return _BatchNormStats(module.running_mean, module.running_var, module.weight, module.bias, module.eps)
    if node.op == "call_function" and node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        values = {n: node.args[i] if len(node.args) > i else node.kwargs.get(n, defaults.get(n))
                  for i, n in enumerate(names)}
        if values["training"] is not False:
            return None
        tensors = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            value = values[key]
            if value is None and key in ("weight", "bias"):
                tensors[key] = None
            elif isinstance(value, fx.Node) and value.op == "get_attr":
                tensors[key] = operator.attrgetter(str(value.target))(gm)
            else:
                return None
        return _BatchNormStats(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                               tensors["bias"], float(values["eps"]))
    return None
