"""The axis graph: which tensor axes must be permuted together, and the exchangeable groups it implies.

A ``networkx`` graph whose vertices are ``(node name, axis)`` pairs, one per axis
of every tensor in the graph, and whose edges join axes that must be permuted
together for the model's function to stay the same: a linear's input axis with
its weight's column axis, its output axis with the weight's rows and the bias, an
element-wise op's axes with its operands', both operands of a residual add, every
read of one parameter (tied weights), and so on. Connected components are the
*groups*.

A group is **pinned** (not exchangeable) when one of its axes

- belongs to a model input or a model output (permuting it changes what the
  user sees), or to a stored constant read as data (a buffer that is not a
  parameter, such as Swin-V2's ``relative_coords_table``: fixed data, like an
  input; BatchNorm statistics and weights kept as buffers are not data), or
- passes through an op not known to be permutation-equivariant on that axis
  (conv and pooling windows pin spatial axes; an op with no rule pins every axis).

Every other group is exchangeable: the units along it came from an i.i.d.
initialisation, so a prefix of them is a fair sample (ExPrune, arXiv 2506.02210).
The same groups say which weight rows, bias and BatchNorm entries and consumer
columns move together, which is what static (structured) pruning needs.

Blocks: ``flatten`` after a conv joins the channel axis to the flattened feature
axis, which then holds one *block* of ``H*W`` features per channel; a linear
consuming it contracts ``C`` units of ``H*W`` features. ``cat`` joins the inputs'
axes to the output axis as separate blocks: the output's :class:`Layout` records
each block's units (nested cats flattened), carried through element-wise ops,
BN, pooling and flatten, so a contraction over a concat can sample every block
in proportion.

**Rules.** Each op family has one small handler, registered with
:func:`axis_rule` for the functions, ``Tensor`` methods and module classes that
spell it (the pattern of torchao's ``register_annotator``). A handler joins and
pins axes; returning ``False`` means "not in the form I handle", and the op is
then treated as unknown (every axis pinned). Adding an op is one decorated
function::

    @axis_rule(functions=(torch.nn.functional.relu6,), modules=(torch.nn.ReLU6,))
    def _my_pointwise(node: fx.Node, g: AxisGraph) -> None:
        ...

Example::

    >>> gm = exfx.analyse(mlp_784_512_256_10, (torch.randn(8, 784),)).graph_module   # canonical, shapes known
    >>> groups = exchangeable_groups(gm, build_axis_graph(gm))
    >>> groups.group_of[("linear", 1)], groups.pin_of[("input_1", 1)]
    ('g0', 'model input (`input_1`)')
    >>> groups.groups["g0"]            # the first hidden layer: its rows, bias, outputs and the next columns
    ['_0_weight[0]', '_0_bias[0]', 'linear[1]', 'relu[1]', '_2_weight[1]']
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.opsets import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    CONSTANT_FUNCTIONS,
    CONSTANT_METHODS,
    GATHER_METHODS,
    MATMUL_FUNCTIONS,
    NON_TENSOR_FUNCTIONS,
    NON_TENSOR_METHODS,
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
)
from exfx.analysis.shapes import rank_of, shape_of, tensor_inputs, tensor_meta
from exfx.analysis.opsets import is_producer

logger = logging.getLogger(__name__)

__all__ = ["Axis", "Layout", "AxisGraph", "AxisRule", "AxisGroups", "axis_rule", "find_axis_rule",
           "build_axis_graph", "exchangeable_groups"]

#: One axis of one tensor: ``(node name, axis index)``.
Axis = tuple[str, int]


@dataclass(frozen=True)
class Layout:
    """How units are laid out along one axis.

    ``units`` units of ``unit`` consecutive elements each. Along a concatenated
    axis, ``block_sizes`` gives the units of each concat block in order (nested
    cats flattened; it adds up to ``units``): the units are exchangeable within a
    block, not across blocks, so a fair sample draws from each block in
    proportion. Empty means one population. ``problem`` says why the units along
    the axis cannot be sampled at all (concat blocks whose units differ in size),
    empty when they can.
    """

    units: int
    unit: int = 1
    block_sizes: tuple[int, ...] = ()
    problem: str = ""

    @property
    def blocks(self) -> int:
        """How many concat blocks the axis holds (1 when it is one population)."""
        return max(1, len(self.block_sizes))


def _describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__} module `{node.target}`"
    if node.op == "call_method":
        return f"method `.{node.target}()`"
    return f"`{getattr(node.target, '__name__', str(node.target))}`"


class AxisGraph:
    """The (node, axis) graph with pins and layouts, built node by node by the axis rules."""

    def __init__(self) -> None:
        self.graph = nx.Graph()
        self.pins: dict[Axis, str] = {}
        self.layouts: dict[Axis, Layout] = {}
        # Tuple-valued nodes whose elements are fresh tensors (no axis tied to any input).
        self.fresh_tuples: set[str] = set()
        # First get_attr node of each parameter: later reads of the same tensor share its axes.
        self.attrs: dict[str, fx.Node] = {}

    def add(self, node: fx.Node) -> None:
        rank = rank_of(node)
        for axis in range(rank or 0):
            self.graph.add_node((node.name, axis))

    def join(self, a: fx.Node, a_axis: int, b: fx.Node, b_axis: int) -> None:
        ra, rb = rank_of(a), rank_of(b)
        if ra is None or rb is None:
            return
        a_axis, b_axis = a_axis % ra if ra else 0, b_axis % rb if rb else 0
        if a_axis < ra and b_axis < rb:
            self.graph.add_edge((a.name, a_axis), (b.name, b_axis))

    def pin(self, node: fx.Node, axes: Any, reason: str) -> None:
        rank = rank_of(node) or 0
        for axis in (range(rank) if axes is None else axes):
            self.pins.setdefault((node.name, axis % rank), reason)

    def layout(self, node: fx.Node, axis: int) -> Layout:
        rank = rank_of(node) or 1
        key = (node.name, axis % rank)
        if key in self.layouts:
            return self.layouts[key]
        return Layout(units=shape_of(node)[axis % rank])

    def inherit_layout(self, dst: fx.Node, dst_axis: int, src: fx.Node, src_axis: int) -> None:
        rs, rd = rank_of(src), rank_of(dst)
        if rs is None or rd is None:
            return
        key = (src.name, src_axis % rs)
        if key in self.layouts and (dst.name, dst_axis % rd) not in self.layouts:
            if shape_of(src)[src_axis % rs] == shape_of(dst)[dst_axis % rd]:
                self.layouts[(dst.name, dst_axis % rd)] = self.layouts[key]


#: A handler: joins and pins the axes of ``node``; ``False`` means "not my form", so the op is unknown.
AxisRule = Callable[[fx.Node, AxisGraph], "bool | None"]


@dataclass
class _Registry:
    functions: dict[Any, AxisRule] = field(default_factory=dict)
    methods: dict[str, AxisRule] = field(default_factory=dict)
    modules: dict[type, AxisRule] = field(default_factory=dict)

    @staticmethod
    def _add(table: dict[Any, AxisRule], key: Any, rule: AxisRule) -> None:
        known = table.get(key)
        if known is not None and known is not rule:
            raise ValueError(f"{getattr(key, '__name__', key)!r} already has the axis rule {known.__name__}; "
                             f"{rule.__name__} cannot take it too")
        table[key] = rule


_RULES = _Registry()


def axis_rule(*, functions: Iterable[Callable[..., Any]] = (), methods: Iterable[str] = (),
              modules: Iterable[type] = ()) -> Callable[[AxisRule], AxisRule]:
    """Register the decorated handler for these ``call_function`` targets, method names and module classes.

    A module class matches its subclasses too (the nearest registered class in the MRO wins).
    """

    def register(rule: AxisRule) -> AxisRule:
        for function in functions:
            _RULES._add(_RULES.functions, function, rule)
        for method in methods:
            _RULES._add(_RULES.methods, method, rule)
        for module in modules:
            _RULES._add(_RULES.modules, module, rule)
        return rule

    return register


def find_axis_rule(gm: fx.GraphModule, node: fx.Node) -> AxisRule | None:
    """The registered handler of ``node``'s op, or None when exfx knows no rule for it."""
    if node.op == "call_function":
        try:
            return _RULES.functions.get(node.target)
        except TypeError:  # an unhashable callable
            return None
    if node.op == "call_method":
        return _RULES.methods.get(str(node.target))
    if node.op == "call_module":
        for cls in type(gm.get_submodule(str(node.target))).__mro__:
            if cls in _RULES.modules:
                return _RULES.modules[cls]
    return None


# ---------------------------------------------------------------------------
# Building the graph
# ---------------------------------------------------------------------------


def build_axis_graph(gm: fx.GraphModule, hidden_inputs: Collection[str] = ()) -> AxisGraph:
    """The axis graph of a canonical, shape-propagated ``gm``.

    ``hidden_inputs`` names graph inputs that carry hidden activations (a
    backbone's features, or a value live across a graph break): their axes are
    not pinned as model inputs.
    """
    g = AxisGraph()
    hidden = frozenset(hidden_inputs)
    for node in gm.graph.nodes:
        g.add(node)
        _apply_rule(gm, node, g, hidden)
    return g


def _apply_rule(gm: fx.GraphModule, node: fx.Node, g: AxisGraph, hidden_inputs: frozenset[str]) -> None:
    if node.op == "placeholder":
        if str(node.target) not in hidden_inputs:
            g.pin(node, None, f"model input (`{node.name}`)")
        return
    if node.op == "output":
        for arg in node.all_input_nodes:
            g.pin(arg, None, "model output")
        return
    if node.op == "get_attr":
        # A tensor read twice (tied weights) is one tensor: permuting it permutes every use.
        first = g.attrs.setdefault(str(node.target), node)
        for axis in range(rank_of(node) or 0):
            g.join(first, axis, node, axis)
        reason = f"stored constant `{node.target}` (a buffer: fixed data, like a model input)"
        g.pin(node, _stored_constant_axes(gm, node), reason)
        return
    unknown = f"op {_describe_target(gm, node)} is not known to be permutation-equivariant"
    if tensor_meta(node) is None and node.op != "call_module" and not _returns_attention_tuple(node):
        if not _is_non_tensor(node):
            for arg in tensor_inputs(node):
                g.pin(arg, None, unknown)
        return
    rule = find_axis_rule(gm, node)
    if rule is not None and rule(node, g) is not False:
        return
    for arg in tensor_inputs(node):
        g.pin(arg, None, unknown)
    g.pin(node, None, unknown)


#: Ops whose every tensor argument but the input is a parameter or a statistic that moves with the units (a
#: weight, a bias, BatchNorm's running mean and variance), so a buffer read there is not data.
_PARAMETER_READERS = (F.linear, F.conv1d, F.conv2d, F.batch_norm)


def _stored_constant_axes(gm: fx.GraphModule, attr: fx.Node) -> list[int]:
    """The axes to pin of a ``get_attr`` tensor that is stored data: a buffer, not a parameter, read as data.

    Such a tensor (Swin-V2's ``relative_coords_table``, a fixed mask) is not drawn i.i.d. with the units it
    meets, so permuting them would change the model: it is fixed data, like a model input. Not pinned: a
    parameter; a buffer read only as a weight, bias or BatchNorm statistic (unfolded BN reads its running
    statistics per channel); an axis along which the buffer is constant (permuting it changes nothing).
    """
    try:
        value = gm.get_buffer(str(attr.target))
    except AttributeError:  # a parameter, or not a registered tensor
        return []
    if all(_reads_as_parameter(user, attr) for user in attr.users):
        return []
    return [axis for axis in range(value.dim()) if value.shape[axis] > 1
            and not torch.equal(value, value.narrow(axis, 0, 1).expand_as(value))]


def _reads_as_parameter(user: fx.Node, attr: fx.Node) -> bool:
    """``user`` reads ``attr`` as a weight, bias or statistic (directly, or transposed for a linear)."""
    if user.op == "call_method" and user.target == "t":
        return bool(user.users) and all(_reads_as_parameter(reader, user) for reader in user.users)
    if user.op != "call_function" or user.target not in _PARAMETER_READERS:
        return False
    data = user.args[0] if user.args else user.kwargs.get("input")
    return data is not attr


def _is_non_tensor(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in NON_TENSOR_METHODS) or (
        node.op == "call_function" and node.target in NON_TENSOR_FUNCTIONS)


# ---------------------------------------------------------------------------
# Rules, one per op family
# ---------------------------------------------------------------------------


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
_ATTENTION_TUPLE_OPS = (F.multi_head_attention_forward, torch._native_multi_head_attention,
                        torch.ops.aten._native_multi_head_attention.default)


def _returns_attention_tuple(node: fx.Node) -> bool:
    """An attention op returning ``(output, weights)``: its rule, not the generic tuple branch, handles it."""
    return node.op == "call_function" and any(node.target is op for op in _ATTENTION_TUPLE_OPS)


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


# ---------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisGroups:
    """The exchangeable groups of a graph.

    Attributes:
        group_of: every axis (in graph order) -> its group name (``"g0"``, ...) or None when pinned.
        pin_of: every pinned axis -> the reason its group is pinned (the first pin in graph order).
        groups: group name -> its axes as ``"node[axis]"`` strings, in graph order.
    """

    group_of: dict[Axis, str | None]
    pin_of: dict[Axis, str]
    groups: dict[str, list[str]]

    def axes_of(self, group: str) -> list[Axis]:
        """The ``(node name, axis)`` pairs of one group, in graph order."""
        return [axis for axis, name in self.group_of.items() if name == group]


def exchangeable_groups(gm: fx.GraphModule, g: AxisGraph) -> AxisGroups:
    """Name the exchangeable groups g0, g1, ... in graph order; map every axis to its group or pin reason."""
    component_of: dict[Axis, int] = {}
    for index, component in enumerate(nx.connected_components(g.graph)):
        for axis in component:
            component_of[axis] = index
    order = [(n.name, a) for n in gm.graph.nodes for a in range(rank_of(n) or 0)]
    pin_reason: dict[int, str] = {}
    for axis in order:  # graph order, so the reported reason is deterministic
        if axis in g.pins:
            pin_reason.setdefault(component_of[axis], g.pins[axis])
    names: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for axis in order:
        index = component_of[axis]
        if index in pin_reason:
            continue
        if index not in names:
            names[index] = f"g{len(names)}"
            groups[names[index]] = []
        groups[names[index]].append(f"{axis[0]}[{axis[1]}]")
    group_of = {axis: names.get(component_of[axis]) for axis in order}
    pin_of = {axis: pin_reason[component_of[axis]] for axis in order if component_of[axis] in pin_reason}
    return AxisGroups(group_of=group_of, pin_of=pin_of, groups=groups)
