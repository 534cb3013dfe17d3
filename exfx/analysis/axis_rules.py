"""The axis rules: one small handler per op family, saying which axes of an op must be permuted together.

Each handler is registered with :func:`~exfx.analysis.axes.axis_rule` for the
functions, ``Tensor`` methods and module classes that spell its op family, and
:func:`~exfx.analysis.axes.build_axis_graph` calls it on every node of that op.
A handler joins axes that must move together (a linear's input axis with its
weight's columns, an element-wise op's axes with its operands') and pins those
that cannot move at all (a conv's spatial axes, an axis indexed by an integer);
returning ``False`` means "not in the form I handle", and the op is then treated
as unknown (every axis pinned).

Why this is safe: a handler only ever adds constraints. Every op without a rule,
and every form a rule does not recognise, pins all of its axes, so a missing or
declined rule can only make fewer axes exchangeable, never wrongly call one
exchangeable. The rules are registered when this module is imported, which
:mod:`exfx.analysis` does on import, before any of its submodules is used (this
module imports :mod:`exfx.analysis.axes`, not the other way round, so there is
no import cycle). Registering a second rule for a spelling that already has one
raises, so two rules never silently disagree.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.axes import AxisGraph, Layout, axis_rule
from exfx.analysis.opsets import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    CONSTANT_FUNCTIONS,
    CONSTANT_METHODS,
    GATHER_METHODS,
    MATMUL_FUNCTIONS,
    NORM_MODULES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    SCATTER_FUNCTIONS,
    SCATTER_METHODS,
    SOFTMAX_FUNCTIONS,
    UNARY_FUNCTIONS,
    UNARY_METHODS,
    UNARY_MODULES,
    is_producer,
)
from exfx.analysis.shapes import rank_of, shape_of, tensor_inputs, tensor_meta

logger = logging.getLogger(__name__)

__all__ = ["FUSED_TRANSFORMER_OPS"]


@axis_rule(functions=CONSTANT_FUNCTIONS, methods=CONSTANT_METHODS)
def _constant(node: fx.Node, g: AxisGraph) -> None:
    """A constant-valued tensor: every permutation leaves it unchanged, so it constrains nothing."""


@axis_rule(modules=(torch.nn.MultiheadAttention,))
def _attention(node: fx.Node, g: AxisGraph) -> None:
    """in_proj contracts the inputs' embedding axis and out_proj makes a fresh one, so neither is constrained
    from outside; the token and batch axes are pinned anyway."""
    g.fresh_tuples.add(node.name)


@axis_rule(functions=(operator.getitem,))
def _index(node: fx.Node, g: AxisGraph) -> bool:
    """An element of a fresh tuple is unconstrained; basic indexing is handled by :func:`_getitem`."""
    source = node.args[0]
    if isinstance(source, fx.Node) and source.name in g.fresh_tuples:
        return True
    return _getitem(node, g)


@axis_rule(
    functions=(*UNARY_FUNCTIONS, *SOFTMAX_FUNCTIONS, F.layer_norm),
    methods=(*UNARY_METHODS, "softmax", "log_softmax"),
    modules=(*UNARY_MODULES, torch.nn.LayerNorm, torch.nn.Softmax, torch.nn.LogSoftmax),
)
def _pointwise(node: fx.Node, g: AxisGraph) -> None:
    source = next(tensor_inputs(node), None)
    if source is None or rank_of(source) != rank_of(node):
        g.pin(node, None, "shape-changing op")
        return
    for axis in range(rank_of(node) or 0):
        g.join(source, axis, node, axis)
        g.inherit_layout(node, axis, source, axis)
    for other in list(tensor_inputs(node))[1:]:  # e.g. LayerNorm weight passed positionally
        _align(other, node, g)


def _align(operand: fx.Node, out: fx.Node, g: AxisGraph) -> None:
    """Join the axes of a broadcast operand with the output axes they align with (from the right)."""
    op_shape, out_shape = shape_of(operand), shape_of(out)
    for back in range(1, min(len(op_shape), len(out_shape)) + 1):
        if op_shape[-back] == out_shape[-back]:
            g.join(operand, -back, out, -back)
            g.inherit_layout(out, -back, operand, -back)


@axis_rule(functions=BINARY_FUNCTIONS, methods=BINARY_METHODS)
def _broadcast(node: fx.Node, g: AxisGraph) -> None:
    for operand in tensor_inputs(node):
        _align(operand, node, g)


@axis_rule(functions=(F.batch_norm,), modules=NORM_MODULES)
def _channelwise(node: fx.Node, g: AxisGraph) -> None:
    source = node.all_input_nodes[0]
    for axis in range(rank_of(node) or 0):
        g.join(source, axis, node, axis)
        g.inherit_layout(node, axis, source, axis)
    for stat in node.all_input_nodes[1:]:
        if rank_of(stat) == 1:
            g.join(stat, 0, node, 1)


@axis_rule(functions=(F.linear,))
def _linear(node: fx.Node, g: AxisGraph) -> None:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    rank = rank_of(node) or 1
    for axis in range(rank - 1):
        g.join(x, axis, node, axis)  # type: ignore[arg-type]
    g.join(x, -1, weight, 1)  # type: ignore[arg-type]
    g.join(node, -1, weight, 0)  # type: ignore[arg-type]
    if isinstance(bias, fx.Node):
        g.join(bias, 0, weight, 0)


@axis_rule(functions=(F.conv1d, F.conv2d))
def _conv(node: fx.Node, g: AxisGraph) -> bool | None:
    if not is_producer(node):
        return False  # a conv canonicalize could not rewrite (asymmetric "same" padding, ...): opaque
    x, weight, bias = node.args[0], node.args[1], node.args[2]
    g.join(x, 0, node, 0)  # type: ignore[arg-type]
    g.join(x, 1, weight, 1)  # type: ignore[arg-type]
    g.join(node, 1, weight, 0)  # type: ignore[arg-type]
    if isinstance(bias, fx.Node):
        g.join(bias, 0, weight, 0)
    if node.kwargs.get("groups", 1) != 1:
        # Input channels of a group feed only that group's outputs: the two axes move together.
        g.join(x, 1, node, 1)  # type: ignore[arg-type]
    spatial = range(2, rank_of(node) or 2)
    g.pin(node, spatial, "spatial axis of a conv")
    g.pin(x, spatial, "spatial axis of a conv")  # type: ignore[arg-type]
    g.pin(weight, spatial, "kernel axis of a conv")  # type: ignore[arg-type]


@axis_rule(functions=POOL_FUNCTIONS, modules=POOL_MODULES)
def _pool(node: fx.Node, g: AxisGraph) -> None:
    source = node.all_input_nodes[0]
    for axis in (0, 1):
        g.join(source, axis, node, axis)
        g.inherit_layout(node, axis, source, axis)  # pooling acts per channel: concat blocks stay blocks
    g.pin(node, range(2, rank_of(node) or 2), "spatial axis of a pooling window")
    g.pin(source, range(2, rank_of(source) or 2), "spatial axis of a pooling window")


@axis_rule(functions=REDUCE_FUNCTIONS, methods=REDUCE_METHODS)
def _reduce(node: fx.Node, g: AxisGraph) -> None:
    source = node.all_input_nodes[0]
    in_shape, out_rank = shape_of(source), rank_of(node) or 0
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


@axis_rule(functions=RESHAPE_FUNCTIONS, methods=RESHAPE_METHODS, modules=(torch.nn.Flatten,))
def _reshape(node: fx.Node, g: AxisGraph) -> None:
    """Axes kept at either end are joined; a merge keeps its leading axis as blocks; a split pins."""
    source = node.all_input_nodes[0]
    in_shape, out_shape = shape_of(source), shape_of(node)
    if in_shape == out_shape:
        for axis in range(len(in_shape)):
            g.join(source, axis, node, axis)
            g.inherit_layout(node, axis, source, axis)
        return
    # The trailing axes first: where sizes of 1 make the match ambiguous ([1, 1, D] -> [1, D], a batch of one
    # token), the features stay one axis and the size-1 axes merge with each other, not into the features.
    suffix = 0
    while suffix < min(len(in_shape), len(out_shape)) - 1 and in_shape[-1 - suffix] == out_shape[-1 - suffix]:
        suffix += 1
    prefix = 0
    while (prefix < min(len(in_shape), len(out_shape)) - suffix - 1
           and in_shape[prefix] == out_shape[prefix]):
        prefix += 1
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
        lead = g.layout(source, prefix)  # concat blocks along the leading axis stay blocks of its units
        g.layouts[(node.name, prefix)] = replace(lead, unit=lead.unit * math.prod(mid_in[1:]))
        g.pin(source, range(prefix + 1, prefix + len(mid_in)), "axis merged by a flatten")
        return
    reason = "axis split or merged by a reshape"
    g.pin(source, range(prefix, prefix + len(mid_in)), reason)
    g.pin(node, range(prefix, prefix + len(mid_out)), reason)


@axis_rule(methods=("expand", "expand_as", "broadcast_to"))
def _expand(node: fx.Node, g: AxisGraph) -> None:
    """Broadcasting copies: axes that keep their size are carried through; ``expand_as``'s
    other operand only lends its shape."""
    source = node.args[0]
    if isinstance(source, fx.Node) and tensor_meta(source) is not None:
        _align(source, node, g)


def _dim_arg(node: fx.Node) -> int:
    return int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))


@axis_rule(functions=(torch.index_select,), methods=GATHER_METHODS)
def _gather(node: fx.Node, g: AxisGraph) -> None:
    """``index_select(dim, index)``: every other axis is carried through unchanged."""
    source, rank = node.args[0], rank_of(node) or 0
    dim = _dim_arg(node) % rank
    for axis in range(rank):
        if axis != dim:
            g.join(source, axis, node, axis)  # type: ignore[arg-type]
            g.inherit_layout(node, axis, source, axis)  # type: ignore[arg-type]
    g.pin(node, [dim], "axis gathered by an index")
    g.pin(source, [dim], "axis gathered by an index")  # type: ignore[arg-type]


@axis_rule(functions=SCATTER_FUNCTIONS, methods=SCATTER_METHODS)
def _scatter(node: fx.Node, g: AxisGraph) -> None:
    """``scatter_add``/``index_add`` along ``dim``: the other axes of ``self``, ``src`` and the result match.

    The index operand is not joined: only its values (positions along ``dim``) matter.
    """
    rank = rank_of(node) or 0
    dim = _dim_arg(node) % rank
    names = ("input", "dim", "index", "src", "source")
    operands = [node.args[0]] + [v for i, v in enumerate(node.args) if i >= 3 and i < len(names)]
    operands += [node.kwargs[k] for k in ("src", "source") if k in node.kwargs]
    for operand in operands:
        if not isinstance(operand, fx.Node) or rank_of(operand) != rank:
            continue
        for axis in range(rank):
            if axis != dim:
                g.join(operand, axis, node, axis)
                g.inherit_layout(node, axis, operand, axis)
        g.pin(operand, [dim], "axis scattered by an index")
    g.pin(node, [dim], "axis scattered by an index")

def _getitem(node: fx.Node, g: AxisGraph) -> bool:
    """Basic indexing: full slices keep an axis, ints and partial slices pin it. False if not basic."""
    source, index = node.args[0], node.args[1]
    in_rank, out_rank = rank_of(source), rank_of(node)
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


@axis_rule(functions=(torch.transpose, torch.permute, torch.t), methods=("transpose", "permute", "t"))
def _permute(node: fx.Node, g: AxisGraph) -> None:
    source = node.all_input_nodes[0]
    rank = rank_of(source) or 0
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


@axis_rule(functions=MATMUL_FUNCTIONS, methods=("matmul",))
def _matmul(node: fx.Node, g: AxisGraph) -> None:
    lhs, rhs = node.args[0], node.args[1]
    if rank_of(lhs) is None or rank_of(rhs) is None or (rank_of(lhs) or 0) < 2 or (rank_of(rhs) or 0) < 2:
        reason = "matmul with a 1-D operand"
        for arg in tensor_inputs(node):
            g.pin(arg, None, reason)
        g.pin(node, None, reason)
        return
    g.join(lhs, -1, rhs, -2)  # type: ignore[arg-type]
    g.join(node, -2, lhs, -2)  # type: ignore[arg-type]
    g.join(node, -1, rhs, -1)  # type: ignore[arg-type]
    g.inherit_layout(node, -1, rhs, -1)  # type: ignore[arg-type]
    out_shape = shape_of(node)
    for operand in (lhs, rhs):
        shape = shape_of(operand)
        for back in range(3, min(len(shape), len(out_shape)) + 1):
            if shape[-back] == out_shape[-back]:
                g.join(operand, -back, node, -back)  # type: ignore[arg-type]


@axis_rule(functions=(torch.cat,))
def _cat(node: fx.Node, g: AxisGraph) -> None:
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    rank = rank_of(node) or 1
    dim %= rank
    parts = [t for t in tensors if isinstance(t, fx.Node)]  # type: ignore[union-attr]
    for part in parts:
        for axis in range(rank):
            g.join(part, axis, node, axis)
    # Every part's axes join the output's, so the blocks share one group (a pin on any block pins them all,
    # and static pruning sees the cat and refuses). Along the cat axis, record each block's units.
    blocks = [g.layout(part, dim) for part in parts if rank_of(part) == rank and shape_of(part)[dim] > 0]
    g.layouts[(node.name, dim)] = _concat_layout(blocks) if blocks else Layout(units=shape_of(node)[dim])


def _concat_layout(parts: Iterable[Layout]) -> Layout:
    """The layout of a concatenation of axes laid out as ``parts``: their blocks, nested cats flattened.

    Units of different sizes (a flattened 4x4 map next to a 2x2 one) cannot be sampled as units of one
    size: the result then counts elements and says so in ``problem``.
    """
    parts = list(parts)
    problem = next((p.problem for p in parts if p.problem), "")
    if not problem and len({p.unit for p in parts}) > 1:
        sizes = ", ".join(dict.fromkeys(str(p.unit) for p in parts))
        problem = (f"its concat blocks have units of different sizes ({sizes} elements per unit); exfx samples "
                   f"whole units of one size")
    if problem:
        elements = tuple(p.units * p.unit for p in parts)
        return Layout(units=sum(elements), block_sizes=elements if len(elements) > 1 else (), problem=problem)
    sizes = tuple(size for p in parts for size in (p.block_sizes or (p.units,)))
    return Layout(units=sum(sizes), unit=parts[0].unit, block_sizes=sizes if len(sizes) > 1 else ())


@axis_rule(functions=(F.embedding,), modules=(torch.nn.Embedding,))
def _embedding(node: fx.Node, g: AxisGraph) -> None:
    ids = node.all_input_nodes[0]
    for axis in range(rank_of(ids) or 0):
        g.join(ids, axis, node, axis)
    if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        g.join(node, -1, node.args[1], 1)


# Attention. ``nn.MultiheadAttention``'s slow path is one call of ``F.multi_head_attention_forward`` in a captured
# graph (Dynamo keeps it whole); its eval fast path, and nn.TransformerEncoderLayer's, are fused ops that exfx's
# capture switches off (exfx.capture.common.mha_fastpath_disabled) but a graph passed in may still hold.

#: The eval fast path's fused ops: opaque, so every axis they touch is pinned, with a reason that says what to do.
FUSED_TRANSFORMER_OPS = (torch._transformer_encoder_layer_fwd, torch.ops.aten._transformer_encoder_layer_fwd.default,
                         torch._native_multi_head_attention, torch.ops.aten._native_multi_head_attention.default)

def _fused_reason(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return (f"fused op `{name}` (the transformer eval fast path) hides the layer's ops; capture with "
            f"exfx.analyse/compile, which disables the fast path")


def _tuple_elements(node: fx.Node) -> list[fx.Node] | None:
    """The ``node[i]`` reads of a tuple-valued node, or None when it is used any other way."""
    users = list(node.users)
    if all(u.op == "call_function" and u.target is operator.getitem and u.args[0] is node
           and isinstance(u.args[1], int) for u in users):
        return users
    return None


@axis_rule(functions=FUSED_TRANSFORMER_OPS)
def _fused_transformer(node: fx.Node, g: AxisGraph) -> None:
    """Pin every axis in and out of a fused fast-path op, naming it (the unfused capture has rules for its parts)."""
    reason = _fused_reason(node)
    for arg in tensor_inputs(node):
        g.pin(arg, None, reason)
    g.pin(node, None, reason)
    if tensor_meta(node) is None:  # (output, weights): its elements are pinned here, not by the getitem rule
        for element in node.users:
            g.pin(element, None, reason)
        g.fresh_tuples.add(node.name)


@axis_rule(functions=(F.multi_head_attention_forward,))
def _multi_head_attention(node: fx.Node, g: AxisGraph) -> bool | None:
    """``F.multi_head_attention_forward``: the embedding axes pass through the projections; the rest is pinned.

    The query, key and value embedding axes are contracted by the input
    projections (joined with their weights' columns), and the output's embedding
    axis is made by ``out_proj`` (joined with its rows and bias), so a residual
    stream around the attention stays one group. Inside, the projection rows are
    split into query/key/value and heads by reshapes, and ``out_proj``'s columns
    are the merged heads: those are pinned, as are every token and batch axis
    (attention mixes tokens, and masks index them) and the attention weights.
    """
    elements = _tuple_elements(node)
    try:
        args = inspect.signature(F.multi_head_attention_forward).bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return False
    out_weight = args.get("out_proj_weight")
    if elements is None or rank_of(out_weight) != 2:
        return False
    inputs = (args.get("query"), args.get("key"), args.get("value"))
    if args.get("use_separate_proj_weight", False):
        weights = (args.get("q_proj_weight"), args.get("k_proj_weight"), args.get("v_proj_weight"))
    else:
        weights = (args.get("in_proj_weight"),) * 3
    if any(rank_of(t) is None or rank_of(w) != 2 for t, w in zip(inputs, weights)):
        return False
    heads = "attention projection rows, split into heads by a reshape"
    tokens = "token or batch axis of attention"
    for tensor, weight in zip(inputs, weights):
        g.join(tensor, -1, weight, 1)
        g.pin(tensor, range((rank_of(tensor) or 1) - 1), tokens)
        g.pin(weight, [0], heads)
    for name in ("in_proj_bias", "bias_k", "bias_v", "static_k", "static_v", "key_padding_mask", "attn_mask"):
        if rank_of(args.get(name)) is not None:
            g.pin(args[name], None, heads if name in ("in_proj_bias", "bias_k", "bias_v") else tokens)
    g.pin(out_weight, [1], "attention heads merged by a reshape")
    if rank_of(args.get("out_proj_bias")) == 1:
        g.join(args["out_proj_bias"], 0, out_weight, 0)
    for element in elements:
        rank = rank_of(element) or 0
        if element.args[1] == 0 and rank:
            g.join(element, -1, out_weight, 0)
            g.pin(element, range(rank - 1), tokens)
        else:
            g.pin(element, None, "attention weights")
    g.fresh_tuples.add(node.name)  # its elements' axes are set above
    return None
