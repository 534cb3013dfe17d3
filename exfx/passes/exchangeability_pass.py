"""Exchangeability analysis: which hidden axes may be permuted without changing the function.

An analysis pass; it changes no node. It builds a ``networkx`` graph whose
vertices are ``(node, axis)`` pairs, one per axis of every tensor in the graph,
and whose edges join axes that must be permuted together for the model's
function to stay the same: a linear's input axis with its weight's column axis,
its output axis with the weight's rows and the bias, an element-wise op's axes
with its operands', both operands of a residual add, every read of one parameter
(tied weights), and so on. Connected
components are the *groups*.

A group is **pinned** (not exchangeable) when one of its axes

- belongs to a model input or a model output (permuting it changes what the
  user sees), or
- passes through an op not known to be permutation-equivariant on that axis
  (conv and pooling windows pin spatial axes; unknown ops pin every axis).

Every other group is exchangeable: the units along it came from an i.i.d.
initialisation, so a prefix of them is a fair sample (ExPrune, arXiv 2506.02210).

Blocks: ``flatten`` after a conv joins the channel axis to the flattened feature
axis, which then holds one *block* of ``H*W`` features per channel; a linear
consuming it contracts ``C`` units of ``H*W`` features. ``cat`` joins the inputs'
axes to the output axis as separate blocks; a contraction over a mix of blocks is
refused (the sample would not be from one exchangeable population).

Every canonical ReLU then gets a verdict (:class:`~exfx.report.SiteInfo`). It is a
*site* when its input is ``[A @] producer(x) [+ shift ...]`` with a linear or
conv producer (``A`` a non-parameter left matmul, as in a GCN's ``adj @ (x W)``;
when both operands of an add lead to a producer, as with a 1x1 shortcut conv, the
costlier producer is the site and the other operand a shift),
the producer's output feeds only that chain, the contraction axis of ``x`` is in
an exchangeable group, and the fan-in is at least the sample count.

Labels land in ``node.meta["exfx"]["groups"]`` (one group name or None per axis)
and, on ReLU and producer nodes, ``node.meta["exfx"]["site"]``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import TensorMetadata

from exfx.passes.canonicalize_pass import is_producer, is_relu
from exfx.report import SiteInfo

logger = logging.getLogger(__name__)

__all__ = ["ExchangeabilityPass", "Layout"]

Axis = tuple[str, int]

_UNARY_FUNCTIONS = {
    torch.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.relu6, F.softplus, F.mish, F.hardswish,
    torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square,
    operator.neg, F.sigmoid, F.tanh, torch.clone, torch.nn.functional.dropout, torch.erf, torch.log, torch.pow,
    operator.pow,
}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "contiguous", "clone", "pow",
                  "float", "half", "double", "bfloat16", "to", "type_as", "square", "erf", "log", "detach"}
_UNARY_MODULES = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ELU, torch.nn.LeakyReLU, torch.nn.Sigmoid, torch.nn.Tanh,
                  torch.nn.Hardtanh, torch.nn.ReLU6, torch.nn.Softplus, torch.nn.Mish, torch.nn.Hardswish)
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.div, torch.maximum, torch.minimum, torch.where, torch.masked_fill, operator.iadd,
                     operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "add_", "mul_", "maximum", "minimum", "where"}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool1d,
                   torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d}
_POOL_MODULES = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.AvgPool1d, torch.nn.AvgPool2d,
                 torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool1d,
                 torch.nn.AdaptiveMaxPool2d)
_NORM_MODULES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_NON_TENSOR_METHODS = {"size", "dim"}
_NON_TENSOR_FUNCTIONS = {getattr}
_GATHER_METHODS = {"index_select"}
_SCATTER_METHODS = {"scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add", "index_add_"}
_SCATTER_FUNCTIONS = {torch.scatter_add, torch.scatter_reduce, torch.index_add}
# Constant-valued tensors: every permutation leaves them unchanged, so they constrain nothing.
_CONSTANT_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}
_CONSTANT_FUNCTIONS = {torch.zeros, torch.ones, torch.full, torch.empty, torch.zeros_like, torch.ones_like,
                       torch.full_like, torch.empty_like}


@dataclass(frozen=True)
class Layout:
    """How units are laid out along one axis.

    ``units`` exchangeable units of ``unit`` consecutive elements each, or
    ``blocks > 1`` concat blocks (not one population).
    """

    units: int
    unit: int = 1
    blocks: int = 1


def _meta(node: Any) -> TensorMetadata | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def _rank(node: Any) -> int | None:
    meta = _meta(node)
    return len(meta.shape) if meta is not None else None


def _shape(node: Any) -> tuple[int, ...]:
    meta = _meta(node)
    assert meta is not None
    return tuple(int(s) for s in meta.shape)


def _tensor_args(node: fx.Node) -> Iterator[fx.Node]:
    """Tensor-valued inputs of ``node``, in argument order."""
    for arg in node.all_input_nodes:
        if _meta(arg) is not None:
            yield arg


def _describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__} module `{node.target}`"
    if node.op == "call_method":
        return f"method `.{node.target}()`"
    return f"`{getattr(node.target, '__name__', str(node.target))}`"


class _AxisGraph:
    """The (node, axis) graph with pins and layouts, built node by node."""

    def __init__(self) -> None:
        self.graph = nx.Graph()
        self.pins: dict[Axis, str] = {}
        self.layouts: dict[Axis, Layout] = {}
        # Tuple-valued nodes whose elements are fresh tensors (no axis tied to any input).
        self.fresh_tuples: set[str] = set()
        # First get_attr node of each parameter: later reads of the same tensor share its axes.
        self.attrs: dict[str, fx.Node] = {}

    def add(self, node: fx.Node) -> None:
        rank = _rank(node)
        for axis in range(rank or 0):
            self.graph.add_node((node.name, axis))

    def join(self, a: fx.Node, a_axis: int, b: fx.Node, b_axis: int) -> None:
        ra, rb = _rank(a), _rank(b)
        if ra is None or rb is None:
            return
        a_axis, b_axis = a_axis % ra if ra else 0, b_axis % rb if rb else 0
        if a_axis < ra and b_axis < rb:
            self.graph.add_edge((a.name, a_axis), (b.name, b_axis))

    def pin(self, node: fx.Node, axes: Any, reason: str) -> None:
        rank = _rank(node) or 0
        for axis in (range(rank) if axes is None else axes):
            self.pins.setdefault((node.name, axis % rank), reason)

    def layout(self, node: fx.Node, axis: int) -> Layout:
        rank = _rank(node) or 1
        key = (node.name, axis % rank)
        if key in self.layouts:
            return self.layouts[key]
        return Layout(units=_shape(node)[axis % rank])

    def inherit_layout(self, dst: fx.Node, dst_axis: int, src: fx.Node, src_axis: int) -> None:
        rs, rd = _rank(src), _rank(dst)
        if rs is None or rd is None:
            return
        key = (src.name, src_axis % rs)
        if key in self.layouts and (dst.name, dst_axis % rd) not in self.layouts:
            if _shape(src)[src_axis % rs] == _shape(dst)[dst_axis % rd]:
                self.layouts[(dst.name, dst_axis % rd)] = self.layouts[key]


class ExchangeabilityPass(PassBase):
    """Label exchangeable groups and give every ReLU a verdict.

    Args:
        samples: the last checkpoint of the default schedule, used for the
            ``fan-in < samples`` verdict. Per-site schedules are checked later.
        hidden_inputs: names of graph inputs that carry hidden activations
            (a backbone's features, or a value live across a graph break); their
            axes are not pinned as model inputs.

    After ``call``, ``self.sites`` holds one :class:`SiteInfo` per ReLU in graph
    order and ``self.groups`` maps each exchangeable group to its axes.
    """

    def __init__(self, samples: int = 32, hidden_inputs: Collection[str] = ()) -> None:
        super().__init__()
        self.samples = samples
        self.hidden_inputs = frozenset(hidden_inputs)
        self.sites: list[SiteInfo] = []
        self.groups: dict[str, list[str]] = {}

    # -- building the axis graph --------------------------------------------

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        axes = _AxisGraph()
        for node in graph_module.graph.nodes:
            axes.add(node)
            self._rule(graph_module, node, axes)
        group_of, pin_of = self._components(graph_module, axes)
        self._label(graph_module, group_of)
        self.sites = self._verdicts(graph_module, axes, group_of, pin_of)
        return PassResult(graph_module, False)

    def _rule(self, gm: fx.GraphModule, node: fx.Node, g: _AxisGraph) -> None:  # noqa: C901 - a dispatch table
        if node.op == "placeholder":
            if str(node.target) not in self.hidden_inputs:
                g.pin(node, None, f"model input (`{node.name}`)")
            return
        if node.op == "output":
            for arg in node.all_input_nodes:
                g.pin(arg, None, "model output")
            return
        if node.op == "get_attr":
            # A tensor read twice (tied weights) is one tensor: permuting it permutes every use.
            first = g.attrs.setdefault(str(node.target), node)
            for axis in range(_rank(node) or 0):
                g.join(first, axis, node, axis)
            return
        if _meta(node) is None and node.op != "call_module":
            if not self._is_non_tensor(node):
                for arg in _tensor_args(node):
                    g.pin(arg, None, f"op {_describe_target(gm, node)} is not known to be permutation-equivariant")
            return
        target = node.target
        if node.op == "call_module":
            module = gm.get_submodule(str(target))
            if isinstance(module, _UNARY_MODULES):
                return self._pointwise(node, g)
            if isinstance(module, _NORM_MODULES):
                return self._channelwise(node, g)
            if isinstance(module, torch.nn.LayerNorm):
                return self._pointwise(node, g)
            if isinstance(module, _POOL_MODULES):
                return self._pool(node, g)
            if isinstance(module, (torch.nn.Softmax, torch.nn.LogSoftmax)):
                return self._pointwise(node, g)
            if isinstance(module, torch.nn.Flatten):
                return self._reshape(node, g)
            if isinstance(module, torch.nn.Embedding):
                return self._embedding(node, g)
            if isinstance(module, torch.nn.MultiheadAttention):
                # in_proj contracts the inputs' embedding axis and out_proj makes a fresh one, so
                # neither is constrained from outside; the token and batch axes are pinned anyway.
                g.fresh_tuples.add(node.name)
                return
        elif node.op == "call_function":
            if target is F.linear:
                return self._linear(node, g)
            if is_producer(node):
                return self._conv(node, g)
            if target in _UNARY_FUNCTIONS or target in _SOFTMAX_FUNCTIONS:
                return self._pointwise(node, g)
            if target in _BINARY_FUNCTIONS:
                return self._broadcast(node, g)
            if target is F.batch_norm:
                return self._channelwise(node, g)
            if target is F.layer_norm:
                return self._pointwise(node, g)  # normalising over an axis is symmetric in it
            if target in _POOL_FUNCTIONS:
                return self._pool(node, g)
            if target in _REDUCE_FUNCTIONS:
                return self._reduce(node, g)
            if target in _RESHAPE_FUNCTIONS:
                return self._reshape(node, g)
            if target in _MATMUL_FUNCTIONS:
                return self._matmul(node, g)
            if target is torch.cat:
                return self._cat(node, g)
            if target in (torch.transpose, torch.permute, torch.t):
                return self._permute(node, g)
            if target is F.embedding:
                return self._embedding(node, g)
            if target is operator.getitem and isinstance(node.args[0], fx.Node) and (
                    node.args[0].name in g.fresh_tuples):
                return
            if target is operator.getitem and self._getitem(node, g):
                return
        elif node.op == "call_method":
            if target in _UNARY_METHODS or target in ("softmax", "log_softmax"):
                return self._pointwise(node, g)
            if target in _BINARY_METHODS:
                return self._broadcast(node, g)
            if target in _REDUCE_METHODS:
                return self._reduce(node, g)
            if target in _RESHAPE_METHODS:
                return self._reshape(node, g)
            if target in ("transpose", "permute", "t"):
                return self._permute(node, g)
            if target == "matmul":
                return self._matmul(node, g)
            if target in _GATHER_METHODS:
                return self._gather(node, g)
            if target in _SCATTER_METHODS:
                return self._scatter(node, g)
            if target in _CONSTANT_METHODS:
                return
            if target in ("expand", "expand_as", "broadcast_to"):
                return self._expand(node, g)
        if node.op == "call_function":
            if target is torch.index_select:
                return self._gather(node, g)
            if target in _SCATTER_FUNCTIONS:
                return self._scatter(node, g)
            if target in _CONSTANT_FUNCTIONS:
                return
        reason = f"op {_describe_target(gm, node)} is not known to be permutation-equivariant"
        for arg in _tensor_args(node):
            g.pin(arg, None, reason)
        g.pin(node, None, reason)

    @staticmethod
    def _is_non_tensor(node: fx.Node) -> bool:
        return (node.op == "call_method" and node.target in _NON_TENSOR_METHODS) or (
            node.op == "call_function" and node.target in _NON_TENSOR_FUNCTIONS)

    @staticmethod
    def _pointwise(node: fx.Node, g: _AxisGraph) -> None:
        source = next(_tensor_args(node), None)
        if source is None or _rank(source) != _rank(node):
            g.pin(node, None, "shape-changing op")
            return
        for axis in range(_rank(node) or 0):
            g.join(source, axis, node, axis)
            g.inherit_layout(node, axis, source, axis)
        for other in list(_tensor_args(node))[1:]:  # e.g. LayerNorm weight passed positionally
            ExchangeabilityPass._align(other, node, g)

    @staticmethod
    def _align(operand: fx.Node, out: fx.Node, g: _AxisGraph) -> None:
        """Join the axes of a broadcast operand with the output axes they align with (from the right)."""
        op_shape, out_shape = _shape(operand), _shape(out)
        for back in range(1, min(len(op_shape), len(out_shape)) + 1):
            if op_shape[-back] == out_shape[-back]:
                g.join(operand, -back, out, -back)
                g.inherit_layout(out, -back, operand, -back)

    def _broadcast(self, node: fx.Node, g: _AxisGraph) -> None:
        for operand in _tensor_args(node):
            self._align(operand, node, g)

    @staticmethod
    def _channelwise(node: fx.Node, g: _AxisGraph) -> None:
        source = node.all_input_nodes[0]
        for axis in range(_rank(node) or 0):
            g.join(source, axis, node, axis)
            g.inherit_layout(node, axis, source, axis)
        for stat in node.all_input_nodes[1:]:
            if _rank(stat) == 1:
                g.join(stat, 0, node, 1)

    @staticmethod
    def _linear(node: fx.Node, g: _AxisGraph) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        rank = _rank(node) or 1
        for axis in range(rank - 1):
            g.join(x, axis, node, axis)  # type: ignore[arg-type]
        g.join(x, -1, weight, 1)  # type: ignore[arg-type]
        g.join(node, -1, weight, 0)  # type: ignore[arg-type]
        if isinstance(bias, fx.Node):
            g.join(bias, 0, weight, 0)

    @staticmethod
    def _conv(node: fx.Node, g: _AxisGraph) -> None:
        x, weight, bias = node.args[0], node.args[1], node.args[2]
        g.join(x, 0, node, 0)  # type: ignore[arg-type]
        g.join(x, 1, weight, 1)  # type: ignore[arg-type]
        g.join(node, 1, weight, 0)  # type: ignore[arg-type]
        if isinstance(bias, fx.Node):
            g.join(bias, 0, weight, 0)
        if node.kwargs.get("groups", 1) != 1:
            # Input channels of a group feed only that group's outputs: the two axes move together.
            g.join(x, 1, node, 1)  # type: ignore[arg-type]
        spatial = range(2, _rank(node) or 2)
        g.pin(node, spatial, "spatial axis of a conv")
        g.pin(x, spatial, "spatial axis of a conv")  # type: ignore[arg-type]
        g.pin(weight, spatial, "kernel axis of a conv")  # type: ignore[arg-type]

    @staticmethod
    def _pool(node: fx.Node, g: _AxisGraph) -> None:
        source = node.all_input_nodes[0]
        for axis in (0, 1):
            g.join(source, axis, node, axis)
        g.pin(node, range(2, _rank(node) or 2), "spatial axis of a pooling window")
        g.pin(source, range(2, _rank(source) or 2), "spatial axis of a pooling window")

    @staticmethod
    def _reduce(node: fx.Node, g: _AxisGraph) -> None:
        source = node.all_input_nodes[0]
        in_shape, out_rank = _shape(source), _rank(node) or 0
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            return
        reduced = {d % len(in_shape) for d in ((dims,) if isinstance(dims, int) else dims)}
        out_axis = 0
        for axis in range(len(in_shape)):
            if axis in reduced and not keepdim:
                continue
            if axis not in reduced and out_axis < out_rank:
                g.join(source, axis, node, out_axis)
                g.inherit_layout(node, out_axis, source, axis)
            out_axis += 1

    @staticmethod
    def _reshape(node: fx.Node, g: _AxisGraph) -> None:
        """Axes kept at either end are joined; a merge keeps its leading axis as blocks; a split pins."""
        source = node.all_input_nodes[0]
        in_shape, out_shape = _shape(source), _shape(node)
        if in_shape == out_shape:
            for axis in range(len(in_shape)):
                g.join(source, axis, node, axis)
                g.inherit_layout(node, axis, source, axis)
            return
        prefix = 0
        while prefix < min(len(in_shape), len(out_shape)) - 1 and in_shape[prefix] == out_shape[prefix]:
            prefix += 1
        suffix = 0
        while (suffix < min(len(in_shape), len(out_shape)) - prefix - 1
               and in_shape[-1 - suffix] == out_shape[-1 - suffix]):
            suffix += 1
        for axis in range(prefix):
            g.join(source, axis, node, axis)
            g.inherit_layout(node, axis, source, axis)
        for back in range(1, suffix + 1):
            g.join(source, -back, node, -back)
            g.inherit_layout(node, -back, source, -back)
        mid_in = in_shape[prefix:len(in_shape) - suffix]
        mid_out = out_shape[prefix:len(out_shape) - suffix]
        if len(mid_out) == 1 and len(mid_in) > 1 and math.prod(mid_in) == mid_out[0]:
            # A merge (flatten): each unit of the leading merged axis becomes a block of the rest.
            g.join(source, prefix, node, prefix)
            g.layouts[(node.name, prefix)] = Layout(units=mid_in[0], unit=math.prod(mid_in[1:]))
            g.pin(source, range(prefix + 1, prefix + len(mid_in)), "axis merged by a flatten")
            return
        reason = "axis split or merged by a reshape"
        g.pin(source, range(prefix, prefix + len(mid_in)), reason)
        g.pin(node, range(prefix, prefix + len(mid_out)), reason)

    @staticmethod
    def _expand(node: fx.Node, g: _AxisGraph) -> None:
        """Broadcasting copies: axes that keep their size are carried through; ``expand_as``'s
        other operand only lends its shape."""
        source = node.args[0]
        if isinstance(source, fx.Node) and _meta(source) is not None:
            ExchangeabilityPass._align(source, node, g)

    @staticmethod
    def _dim_arg(node: fx.Node) -> int:
        return int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))

    @classmethod
    def _gather(cls, node: fx.Node, g: _AxisGraph) -> None:
        """``index_select(dim, index)``: every other axis is carried through unchanged."""
        source, rank = node.args[0], _rank(node) or 0
        dim = cls._dim_arg(node) % rank
        for axis in range(rank):
            if axis != dim:
                g.join(source, axis, node, axis)  # type: ignore[arg-type]
                g.inherit_layout(node, axis, source, axis)  # type: ignore[arg-type]
        g.pin(node, [dim], "axis gathered by an index")
        g.pin(source, [dim], "axis gathered by an index")  # type: ignore[arg-type]

    @classmethod
    def _scatter(cls, node: fx.Node, g: _AxisGraph) -> None:
        """``scatter_add``/``index_add`` along ``dim``: the other axes of ``self``, ``src`` and the result match.

        The index operand is not joined: only its values (positions along ``dim``) matter.
        """
        rank = _rank(node) or 0
        dim = cls._dim_arg(node) % rank
        names = ("input", "dim", "index", "src", "source")
        operands = [node.args[0]] + [v for i, v in enumerate(node.args) if i >= 3 and i < len(names)]
        operands += [node.kwargs[k] for k in ("src", "source") if k in node.kwargs]
        for operand in operands:
            if not isinstance(operand, fx.Node) or _rank(operand) != rank:
                continue
            for axis in range(rank):
                if axis != dim:
                    g.join(operand, axis, node, axis)
                    g.inherit_layout(node, axis, operand, axis)
            g.pin(operand, [dim], "axis scattered by an index")
        g.pin(node, [dim], "axis scattered by an index")

    @staticmethod
    def _getitem(node: fx.Node, g: _AxisGraph) -> bool:
        """Basic indexing: full slices keep an axis, ints and partial slices pin it. False if not basic."""
        source, index = node.args[0], node.args[1]
        in_rank, out_rank = _rank(source), _rank(node)
        if in_rank is None or out_rank is None:
            return False
        items = list(index) if isinstance(index, tuple) else [index]
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
            return False
        if any(isinstance(v, fx.Node) for i in items if isinstance(i, slice) for v in (i.start, i.stop, i.step)):
            return False
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = in_rank - sum(1 for i in items if i is not None and i is not Ellipsis)
            items = items[:at] + [slice(None)] * fill + items[at + 1:]
        items += [slice(None)] * (in_rank - sum(1 for i in items if i is not None))
        in_axis = out_axis = 0
        for item in items:
            if item is None:
                out_axis += 1
                continue
            if isinstance(item, int):
                g.pin(source, [in_axis], "axis indexed by an integer")  # type: ignore[arg-type]
            elif item == slice(None):
                g.join(source, in_axis, node, out_axis)  # type: ignore[arg-type]
                g.inherit_layout(node, out_axis, source, in_axis)  # type: ignore[arg-type]
                out_axis += 1
            else:
                g.pin(source, [in_axis], "axis sliced")  # type: ignore[arg-type]
                g.pin(node, [out_axis], "axis sliced")
                out_axis += 1
            in_axis += 1
        return True

    @staticmethod
    def _permute(node: fx.Node, g: _AxisGraph) -> None:
        source = node.all_input_nodes[0]
        rank = _rank(source) or 0
        order = list(range(rank))
        if node.target in ("t", torch.t):
            order = order[::-1]
        elif node.target in ("transpose", torch.transpose):
            a, b = (int(d) % rank for d in node.args[1:3])
            order[a], order[b] = order[b], order[a]
        else:
            dims = node.args[1:] if node.op == "call_method" else node.args[1]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            order = [int(d) % rank for d in dims]
        for out_axis, in_axis in enumerate(order):
            g.join(source, in_axis, node, out_axis)
            g.inherit_layout(node, out_axis, source, in_axis)

    @staticmethod
    def _matmul(node: fx.Node, g: _AxisGraph) -> None:
        lhs, rhs = node.args[0], node.args[1]
        if _rank(lhs) is None or _rank(rhs) is None or (_rank(lhs) or 0) < 2 or (_rank(rhs) or 0) < 2:
            reason = "matmul with a 1-D operand"
            for arg in _tensor_args(node):
                g.pin(arg, None, reason)
            g.pin(node, None, reason)
            return
        g.join(lhs, -1, rhs, -2)  # type: ignore[arg-type]
        g.join(node, -2, lhs, -2)  # type: ignore[arg-type]
        g.join(node, -1, rhs, -1)  # type: ignore[arg-type]
        g.inherit_layout(node, -1, rhs, -1)  # type: ignore[arg-type]
        out_shape = _shape(node)
        for operand in (lhs, rhs):
            shape = _shape(operand)
            for back in range(3, min(len(shape), len(out_shape)) + 1):
                if shape[-back] == out_shape[-back]:
                    g.join(operand, -back, node, -back)  # type: ignore[arg-type]

    @staticmethod
    def _cat(node: fx.Node, g: _AxisGraph) -> None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = _rank(node) or 1
        dim %= rank
        parts = [t for t in tensors if isinstance(t, fx.Node)]  # type: ignore[union-attr]
        for part in parts:
            for axis in range(rank):
                g.join(part, axis, node, axis)
        g.layouts[(node.name, dim)] = Layout(units=_shape(node)[dim], blocks=len(parts))

    @staticmethod
    def _embedding(node: fx.Node, g: _AxisGraph) -> None:
        ids = node.all_input_nodes[0]
        for axis in range(_rank(ids) or 0):
            g.join(ids, axis, node, axis)
        if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            g.join(node, -1, node.args[1], 1)

    # -- groups and verdicts -------------------------------------------------

    def _components(self, gm: fx.GraphModule, g: _AxisGraph) -> tuple[dict[Axis, str | None], dict[Axis, str]]:
        """Name exchangeable groups g0, g1, ... in graph order; map every axis to its group or pin reason."""
        component_of: dict[Axis, int] = {}
        components = list(nx.connected_components(g.graph))
        for index, component in enumerate(components):
            for axis in component:
                component_of[axis] = index
        order = [(n.name, a) for n in gm.graph.nodes for a in range(_rank(n) or 0)]
        pin_reason: dict[int, str] = {}
        for axis in order:  # graph order, so the reported reason is deterministic
            if axis in g.pins:
                pin_reason.setdefault(component_of[axis], g.pins[axis])
        names: dict[int, str] = {}
        self.groups = {}
        for axis in order:
            index = component_of[axis]
            if index in pin_reason:
                continue
            if index not in names:
                names[index] = f"g{len(names)}"
                self.groups[names[index]] = []
            self.groups[names[index]].append(f"{axis[0]}[{axis[1]}]")
        group_of = {axis: names.get(component_of[axis]) for axis in order}
        pin_of = {axis: pin_reason[component_of[axis]] for axis in order if component_of[axis] in pin_reason}
        return group_of, pin_of

    @staticmethod
    def _label(gm: fx.GraphModule, group_of: dict[Axis, str | None]) -> None:
        for node in gm.graph.nodes:
            rank = _rank(node)
            if rank is not None:
                node.meta.setdefault("exfx", {})["groups"] = [group_of.get((node.name, a)) for a in range(rank)]

    def _verdicts(self, gm: fx.GraphModule, g: _AxisGraph, group_of: dict[Axis, str | None],
                  pin_of: dict[Axis, str]) -> list[SiteInfo]:
        sites: list[SiteInfo] = []
        used: dict[str, int] = {}
        for node in gm.graph.nodes:
            if not is_relu(node):
                continue
            site = _verdict(node, g, group_of, pin_of, self.samples)
            count = used.get(site.name, 0)
            used[site.name] = count + 1
            if count:
                site.name = f"{site.name}#{count + 1}"
            node.meta.setdefault("exfx", {})["site"] = site.name
            sites.append(site)
        return sites


@dataclass
class _Chain:
    """``relu([left @] producer(x) + shifts...)`` as matched backwards from a ReLU."""

    producer: fx.Node | None
    left: fx.Node | None
    shifts: list[fx.Node]
    problem: str = ""


def _match_chain(relu: fx.Node) -> _Chain:
    shifts: list[fx.Node] = []
    current = relu.args[0]
    while isinstance(current, fx.Node):
        if is_producer(current):
            return _Chain(current, None, shifts)
        if _is_add(current):
            lhs, rhs = current.args[0], current.args[1]
            # When both operands lead to a producer (a residual block with a 1x1 shortcut conv), the site is
            # the costlier one, whatever the operand order: that is where early exit saves work, and the
            # paper's choice (the block's second conv, never the shortcut).
            side, other = (lhs, rhs) if _producer_cost(lhs) >= _producer_cost(rhs) else (rhs, lhs)
            if not _leads_to_producer(side):
                break
            if not isinstance(other, fx.Node) or _meta(other) is None:
                return _Chain(None, None, [], "the pre-activation adds a Python scalar")
            if tuple(torch.broadcast_shapes(_shape(other), _shape(current))) != _shape(current):
                return _Chain(None, None, [], f"the residual `{other.name}` broadcasts the pre-activation")
            if len(side.users) != 1:  # type: ignore[union-attr]
                used = f"`{side.name}` is also used outside the pre-activation"  # type: ignore[union-attr]
                return _Chain(None, None, [], used)
            shifts.append(other)
            current = side
            continue
        if _is_left_matmul(current):
            inner = current.args[1]
            if not (isinstance(inner, fx.Node) and inner.target is F.linear and len(inner.users) == 1):
                break
            return _Chain(inner, current.args[0], shifts)  # type: ignore[arg-type]
        break
    return _Chain(None, None, [])


def _is_add(node: fx.Node) -> bool:
    plain = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add")
    return plain and len(node.args) == 2 and not node.kwargs


def _is_left_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS and len(node.args) == 2
            and isinstance(node.args[0], fx.Node) and (_rank(node.args[0]) or 0) >= 2)


def _leads_to_producer(node: Any) -> bool:
    while isinstance(node, fx.Node):
        if is_producer(node):
            return True
        if _is_add(node):
            return _leads_to_producer(node.args[0]) or _leads_to_producer(node.args[1])
        if _is_left_matmul(node):
            node = node.args[1]
            continue
        return False
    return False


def _producer_cost(node: Any) -> int:
    """Multiply-adds per output neuron of the costliest producer ``node`` leads to; -1 if none."""
    while isinstance(node, fx.Node):
        if is_producer(node):
            weight = node.args[1]
            return math.prod(_shape(weight)[1:]) if _meta(weight) is not None else 0
        if _is_add(node):
            return max(_producer_cost(node.args[0]), _producer_cost(node.args[1]))
        if _is_left_matmul(node):
            node = node.args[1]
            continue
        return -1
    return -1


def _trace_back(source: Any, limit: int = 12) -> str:
    """Where a ReLU's input comes from, when it is not a site: names an upstream producer if there is one."""
    if not isinstance(source, fx.Node):
        return ""
    path, node = [], source
    while isinstance(node, fx.Node) and len(path) < limit:
        if is_producer(node):
            steps = ", ".join(dict.fromkeys(reversed(path)))
            return (f" (the linear `{node.meta.get('exfx_name', node.name)}` is followed by {steps}, "
                    f"which exfx does not carry partial sums through)")
        path.append(_describe_source(node))
        inputs = [a for a in node.all_input_nodes if _meta(a) is not None and a.op != "get_attr"]
        node = max(inputs, key=lambda a: math.prod(_shape(a)), default=None) if inputs else None
    return f" (its input comes from {_describe_source(source)})"


def _describe_source(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"model input `{node.target}`"
    if node.op == "call_module":
        return f"module `{node.target}`"
    if node.op == "call_method":
        return f"`.{node.target}()`"
    return f"`{getattr(node.target, '__name__', str(node.target))}`"


def _verdict(relu: fx.Node, g: _AxisGraph, group_of: dict[Axis, str | None], pin_of: dict[Axis, str],
             samples: int) -> SiteInfo:
    chain = _match_chain(relu)
    relu_name = relu.meta.get("exfx_relu_source", relu.name)
    if chain.producer is None:
        reason = chain.problem or f"no linear/conv producer{_trace_back(relu.args[0])}"
        return SiteInfo(name=relu_name, eligible=False, reason=reason, relu_node=relu.name)
    producer = chain.producer
    name = producer.meta.get("exfx_name", producer.name)
    kind = "linear" if producer.target is F.linear else producer.target.__name__  # type: ignore[union-attr]
    site = SiteInfo(name=name, eligible=False, reason="", kind=kind, relu_node=relu.name,
                    producer_node=producer.name)
    for link in [producer] + ([relu.args[0]] if relu.args[0] is not producer else []):
        if isinstance(link, fx.Node) and len(link.users) != 1:
            others = ", ".join(f"`{u.name}`" for u in link.users if u is not relu)
            site.reason = f"the pre-activation `{link.name}` is also used by {others}"
            return site
    x, weight = producer.args[0], producer.args[1]
    if _meta(x) is None or _meta(weight) is None:
        site.reason = "the producer's input or weight has no known shape"
        return site
    source = chain.left if chain.left is not None else x
    axis = -1 if kind == "linear" else 1
    key = (x.name, axis % (_rank(x) or 1))  # type: ignore[union-attr]
    layout = g.layout(x, axis)  # type: ignore[arg-type]
    site.group = group_of.get(key)
    w_shape = _shape(weight)
    if kind == "linear":
        site.fan_in, site.n_units = layout.units, layout.units
        unit_text = f" blocks of {layout.unit}" if layout.unit > 1 else ""
        site.signature = f"linear {w_shape[1]}->{w_shape[0]}{unit_text}"
    else:
        groups = producer.kwargs.get("groups", 1)
        site.fan_in, site.n_units = w_shape[1], w_shape[1]
        kernel = "x".join(map(str, w_shape[2:]))
        site.signature = f"{kind} {w_shape[1] * groups}->{w_shape[0]} k{kernel} g{groups}"
    if chain.left is not None:
        site.signature += " left-matmul"
    site.input_node = x.name  # type: ignore[union-attr]
    site.left_node = chain.left.name if chain.left is not None else ""
    site.shift_nodes = tuple(s.name for s in chain.shifts)
    del source
    if key in pin_of:
        reason = pin_of[key]
        site.reason = ("contraction axis is a " + reason) if reason.startswith("model input") else (
            f"contraction axis is pinned: {reason}")
        return site
    if layout.blocks > 1:
        site.reason = f"contraction axis mixes {layout.blocks} concat blocks; exfx does not sample across blocks"
        return site
    if kind != "linear" and site.fan_in == 1:
        site.reason = "depthwise: fan-in 1"
        return site
    site.structurally_eligible = True
    if site.fan_in is not None and site.fan_in < samples:
        site.reason = f"fan-in {site.fan_in} < samples {samples}"
        return site
    site.eligible = True
    return site
