"""Which hidden axes static pruning may shrink, read from the exchangeable groups of an :class:`exfx.Analysis`.

A *prunable layer* is the unit axis of one ReLU ``relu(producer(x, W, b))`` (or a
capped ReLU ``clamp(producer(x, W, b), 0.0, t)``: ReLU6)
whose exchangeable group (see :mod:`exfx.analysis.axes`) holds only axes whose
slicing this module knows how to do:

- the producer's weight rows (``W[0]``), its bias and its output axis;
- the ReLU's output axis;
- channel-wise ops on the way to the consumers: pooling, flatten/reshape merges
  (each unit then is a block of ``H*W`` consecutive features), dropout, identity;
- the contracted input axis of every consumer ``F.linear`` / ``F.conv{1,2}d``
  (``groups=1``) together with its weight's columns (``W[1]``).

Any other axis in the group (a residual ``add``, a ``cat``, a model input or
output, a shared weight...) refuses the whole group, and the reason is kept for
the report. Residual-stream channels fall in this case: the stream is shared by
every block, and pruning it would need a joint fold into every reader.

Why this is safe: the exchangeable group is, by construction of the axis graph,
*every* tensor axis that must be permuted together with the unit axis for the
function to stay the same. Deleting units is permuting them to the end and
truncating, so slicing every axis of the group (and nothing else) keeps every
shape consistent, and a group with an axis we cannot slice is never touched.

Example::

    >>> analysis = exfx.analyse(model, (x,))
    >>> layers, refused = find_prunable_layers(analysis.graph_module, analysis.groups)
    >>> [(layer.name, layer.n_units) for layer in layers]
    [('features.0', 16), ('features.3', 32)]
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.axes import AxisGroups
from exfx.analysis.opsets import (POOL_FUNCTIONS, POOL_MODULES, RESHAPE_FUNCTIONS, RESHAPE_METHODS, describe_node,
                                  is_producer, is_site_activation)
from exfx.analysis.shapes import rank_of, shape_of
from exfx.meta import producer_name, site_match

logger = logging.getLogger(__name__)

__all__ = ["ConsumerSlot", "PrunableLayer", "RefusedLayer", "find_prunable_layers", "unit_axis_of"]

_IDENTITY_MODULES = (torch.nn.Dropout, torch.nn.Identity, torch.nn.Flatten)
_IDENTITY_FUNCTIONS = (F.dropout,)
_IDENTITY_METHODS = ("contiguous", "clone")
_ADD_TARGETS = (operator.add, operator.iadd, torch.add, "add", "add_")


@dataclass(frozen=True)
class ConsumerSlot:
    """One consumer of a layer's units: a linear or conv whose weight columns (input channels) are the units.

    Attributes:
        name: the consumer's site name (dotted module / parameter name, e.g. ``features.3``).
        node: the consumer node's name.
        kind: ``linear`` or ``conv``.
        weight: the ``get_attr`` target of the consumer weight.
        bias: the ``get_attr`` target of its bias, or None.
        block: consecutive weight columns per unit (``H*W`` after a flatten, else 1); a conv has 1.
        stats_node: the node whose activations the consumer contracts, before any flatten: where the
            statistics for this consumer's fold are recorded.
        stats_axis: the unit axis of ``stats_node``.
    """

    name: str
    node: str
    kind: str
    weight: str
    bias: str | None
    block: int
    stats_node: str
    stats_axis: int


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable unit axis: the output units of ``producer`` after its ReLU.

    Attributes:
        name: the site name of the producer (``features.0``): the layer's name in reports.
        relu: the ReLU node's name.
        producer: the producer node's name.
        kind: ``linear`` or ``conv``.
        group: the exchangeable group of the units (``"g3"``).
        n_units: units along the axis.
        weight: ``get_attr`` target of the producer weight (rows are units).
        bias: ``get_attr`` target of the producer bias, or None.
        consumers: every reader of the units, in graph order.
    """

    name: str
    relu: str
    producer: str
    kind: str
    group: str
    n_units: int
    weight: str
    bias: str | None
    consumers: tuple[ConsumerSlot, ...]


@dataclass(frozen=True)
class RefusedLayer:
    """A ReLU whose units are left alone, and why (one line)."""

    name: str
    relu: str
    reason: str


def unit_axis_of(producer: fx.Node) -> int:
    """The output-unit axis of a canonical producer: the last axis of a linear, axis 1 of a conv."""
    return (rank_of(producer) or 1) - 1 if producer.target is F.linear else 1


def _kind(producer: fx.Node) -> str:
    return "linear" if producer.target is F.linear else "conv"


def _reads(graph: fx.Graph, target: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "get_attr" and str(n.target) == target]


def _sole_use(attr: fx.Node) -> bool:
    """A ``get_attr`` whose tensor is read by exactly one node in the whole graph (no tied weights)."""
    return sum(len(n.users) for n in _reads(attr.graph, str(attr.target))) == 1


def _is_channelwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that act on each unit separately (or merge trailing axes into per-unit blocks): slicing commutes."""
    if node.op == "call_function":
        return node.target in POOL_FUNCTIONS or node.target in RESHAPE_FUNCTIONS or node.target in _IDENTITY_FUNCTIONS
    if node.op == "call_method":
        return str(node.target) in RESHAPE_METHODS or str(node.target) in _IDENTITY_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (*POOL_MODULES, *_IDENTITY_MODULES))
    return False


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in RESHAPE_FUNCTIONS or node.target in _IDENTITY_FUNCTIONS
    if node.op == "call_method":
        return str(node.target) in RESHAPE_METHODS or str(node.target) in _IDENTITY_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _IDENTITY_MODULES)
    return False


def _refusal_for(node: fx.Node) -> str:
    """Why a group holding ``node`` cannot be sliced."""
    if node.op in ("call_function", "call_method") and node.target in _ADD_TARGETS:
        return (f"residual stream: the units are added to other tensors by {describe_node(node)}; left alone "
                f"(pruning a stream needs a joint fold into every reader)")
    if node.op == "call_function" and node.target is torch.cat:
        return f"the units are concatenated by {describe_node(node)}; concat slicing is not supported"
    if node.op == "placeholder":
        return f"the units are a model input (`{node.name}`)"
    if node.op == "output":
        return "the units are a model output"
    return f"the units pass through {describe_node(node)}, which static pruning does not know how to slice"


class _GroupReader:
    """Classifies every axis of one exchangeable group; collects consumers, or the first refusal."""

    def __init__(self, gm: fx.GraphModule, analysis_groups: AxisGroups, relu: fx.Node, producer: fx.Node,
                 group: str, n_units: int) -> None:
        self.gm, self.groups, self.relu, self.producer = gm, analysis_groups, relu, producer
        self.group, self.n_units = group, n_units
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.consumers: list[ConsumerSlot] = []

    def axis_in_group(self, node: fx.Node) -> int | None:
        for axis in range(rank_of(node) or 0):
            if self.groups.group_of.get((node.name, axis)) == self.group:
                return axis
        return None

    def read(self) -> str | None:
        """None when every axis of the group can be sliced, else the reason it cannot.

        A residual add or a concat anywhere in the group is reported first: it says more than the
        first axis in graph order that cannot be sliced.
        """
        axes = self.groups.axes_of(self.group)
        missing = [name for name, _ in axes if name not in self.nodes]
        if missing:
            return f"the units reach `{missing[0]}`, which is not a node of the graph"
        for node_name, _ in axes:
            node = self.nodes[node_name]
            if node.op in ("call_function", "call_method") and (node.target in _ADD_TARGETS
                                                                 or node.target is torch.cat):
                return _refusal_for(node)
        for node_name, axis in axes:
            reason = self.check(self.nodes[node_name], axis)
            if reason is not None:
                return reason
        if not self.consumers:
            return "no linear or conv consumer contracts the units"
        return None

    def check(self, node: fx.Node, axis: int) -> str | None:
        if node is self.producer or node is self.relu:
            return None
        if node.op == "get_attr":
            return self.check_attr(node, axis)
        if is_producer(node) and node.kwargs.get("groups", 1) != 1:
            return f"the units feed the grouped conv {describe_node(node)} (groups={node.kwargs.get('groups')})"
        if is_producer(node):
            return f"another producer ({describe_node(node)}) writes the same units (tied weights?)"
        if is_site_activation(node):
            return f"a second ReLU ({describe_node(node)}) shares the units"
        if _is_channelwise(self.gm, node):
            return None
        return _refusal_for(node)

    def check_attr(self, attr: fx.Node, axis: int) -> str | None:
        if not _sole_use(attr):
            return f"the tensor `{attr.target}` is read more than once (tied or shared weights)"
        user = next(iter(attr.users))
        if not is_producer(user):
            return f"the tensor `{attr.target}` is used by {describe_node(user)}, not by a linear or conv"
        if user is self.producer:
            if axis == 0 and attr in (user.args[1], user.args[2]):
                return None
            return f"the units reach axis {axis} of `{attr.target}`"
        if attr is user.args[1] and axis == 1:
            return self.add_consumer(user, attr)
        return f"the units reach axis {axis} of `{attr.target}` of {describe_node(user)}"

    def add_consumer(self, user: fx.Node, weight: fx.Node) -> str | None:
        if _kind(user) == "conv" and user.kwargs.get("groups", 1) != 1:
            return f"the consumer {describe_node(user)} is a grouped conv (groups={user.kwargs.get('groups')})"
        x = user.args[0]
        if not isinstance(x, fx.Node):
            return f"the consumer {describe_node(user)} has no tensor input"
        stats = x
        while _is_reshape(self.gm, stats) and isinstance(stats.args[0], fx.Node):
            stats = stats.args[0]
        stats_axis = self.axis_in_group(stats)
        if stats_axis is None:
            return f"cannot find the units' axis in `{stats.name}`, the input of {describe_node(user)}"
        columns = shape_of(weight)[1]
        block = 1 if _kind(user) == "conv" else columns // self.n_units
        if _kind(user) == "linear":
            trailing = math.prod(shape_of(stats)[stats_axis + 1:]) if stats is not x else 1
            if block * self.n_units != columns or block != trailing:
                return (f"the consumer {describe_node(user)} reads {columns} features, not {self.n_units} units "
                        f"in channel-major blocks")
        elif columns != self.n_units:
            return f"the consumer {describe_node(user)} reads {columns} channels, not {self.n_units}"
        bias = user.args[2] if len(user.args) > 2 and isinstance(user.args[2], fx.Node) else None
        if bias is not None and (bias.op != "get_attr" or not _sole_use(bias)):
            return f"the bias of the consumer {describe_node(user)} is not a parameter read once"
        self.consumers.append(ConsumerSlot(
            name=producer_name(user), node=user.name, kind=_kind(user), weight=str(weight.target),
            bias=str(bias.target) if bias is not None else None, block=block, stats_node=stats.name,
            stats_axis=stats_axis))
        return None


def _check_producer(producer: object) -> str | None:
    if not (isinstance(producer, fx.Node) and is_producer(producer)):
        what = describe_node(producer) if isinstance(producer, fx.Node) else repr(producer)
        if isinstance(producer, fx.Node) and producer.op in ("call_function", "call_method") \
                and producer.target in _ADD_TARGETS:
            return _refusal_for(producer)
        return f"the ReLU's input {what} is not a linear or conv"
    weight, bias = producer.args[1], producer.args[2] if len(producer.args) > 2 else None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and _sole_use(weight)):
        return f"the weight of {describe_node(producer)} is not a parameter read once"
    if isinstance(bias, fx.Node) and not (bias.op == "get_attr" and _sole_use(bias)):
        return f"the bias of {describe_node(producer)} is not a parameter read once"
    if _kind(producer) == "conv" and producer.kwargs.get("groups", 1) != 1:
        return f"{describe_node(producer)} is a grouped conv (groups={producer.kwargs.get('groups')})"
    return None


def _read_relu(gm: fx.GraphModule, groups: AxisGroups, relu: fx.Node) -> PrunableLayer | RefusedLayer:
    match = site_match(relu)
    producer = relu.args[0]
    name = match.name if match is not None else relu.name
    reason = _check_producer(producer)
    if reason is not None:
        return RefusedLayer(name, relu.name, reason)
    assert isinstance(producer, fx.Node)
    axis = unit_axis_of(producer)
    group = groups.group_of.get((relu.name, axis))
    if group is None:
        pin = groups.pin_of.get((relu.name, axis), "the units' axis is pinned")
        return RefusedLayer(name, relu.name, f"pinned: {pin}")
    n_units = shape_of(relu)[axis]
    reader = _GroupReader(gm, groups, relu, producer, group, n_units)
    reason = reader.read()
    if reason is not None:
        return RefusedLayer(name, relu.name, reason)
    weight = producer.args[1]
    bias = producer.args[2] if len(producer.args) > 2 and isinstance(producer.args[2], fx.Node) else None
    return PrunableLayer(name=name, relu=relu.name, producer=producer.name, kind=_kind(producer), group=group,
                         n_units=n_units, weight=str(weight.target),  # type: ignore[union-attr]
                         bias=str(bias.target) if bias is not None else None, consumers=tuple(reader.consumers))


def find_prunable_layers(gm: fx.GraphModule, groups: AxisGroups) -> tuple[list[PrunableLayer], list[RefusedLayer]]:
    """Every ReLU of ``gm`` in graph order: prunable (with its consumers) or refused (why).

    ``gm`` and ``groups`` are an :class:`exfx.Analysis`'s ``graph_module`` and ``groups``.
    """
    layers: list[PrunableLayer] = []
    refused: list[RefusedLayer] = []
    for node in gm.graph.nodes:
        if not is_site_activation(node):  # ReLU or ReLU6: the fold reads the units' values, whatever made them
            continue
        verdict = _read_relu(gm, groups, node)
        if isinstance(verdict, PrunableLayer):
            layers.append(verdict)
        else:
            logger.debug("snp: %s left alone: %s", verdict.name, verdict.reason)
            refused.append(verdict)
    return layers, refused
