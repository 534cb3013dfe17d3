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
then treated as unknown (every axis pinned). This module holds the registry and
the driver; the handlers live in :mod:`exfx.analysis.axis_rules`, registered
when :mod:`exfx.analysis` is imported (which happens before this module is used).
Adding an op is one decorated function there::

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

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.opsets import NON_TENSOR_FUNCTIONS, NON_TENSOR_METHODS, describe_node
from exfx.analysis.shapes import rank_of, shape_of, tensor_inputs, tensor_meta

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
    unknown = f"op {describe_node(node)} is not known to be permutation-equivariant"
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


#: Attention ops returning ``(output, weights)`` (``F.multi_head_attention_forward`` and the eval fast path's fused
#: attention): tuple-valued, yet handed to their rules in :mod:`exfx.analysis.axis_rules`.
_ATTENTION_TUPLE_OPS = (F.multi_head_attention_forward, torch._native_multi_head_attention,
                        torch.ops.aten._native_multi_head_attention.default)


def _returns_attention_tuple(node: fx.Node) -> bool:
    """An attention op returning ``(output, weights)``: its rule, not the generic tuple branch, handles it."""
    return node.op == "call_function" and any(node.target is op for op in _ATTENTION_TUPLE_OPS)


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
