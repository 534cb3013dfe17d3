"""Site matching: every canonical ReLU gets a verdict, stored as a frozen :class:`~exfx.meta.SiteMatch`.

A ReLU is a *site* when its input is ``[A @] producer(x) [+ shift ...]`` with a
linear or conv producer (``A`` a non-parameter left matmul, as in a GCN's
``adj @ (x W)``; when both operands of an add lead to a producer, as with a 1x1
shortcut conv, the costlier producer is the site and the other operand a
shift), the producer's output feeds only that chain, and the contraction axis of
``x`` is in an exchangeable group (:mod:`exfx.analysis.axes`). When that axis
concatenates blocks (a DenseNet layer's input), the record carries each block's
units (``SiteMatch.blocks``) and the rewrite samples every block in proportion;
blocks of units of different sizes, or a grouped conv over blocks, are refused.
Whether the fan-in fits a schedule is decided later, per plan.

Between a linear producer and the pre-activation there may also be *message
passing* (PyG's ``GCNConv``: gather, scale, scatter-add), matched by
:mod:`exfx.analysis.message_passing`: the record then lists the chain
(``SiteMatch.propagation``) and the rewrite replays it on ``x``.

Example::

    >>> match = match_site(second_relu, axes, groups)        # a 784-512-256-10 MLP
    >>> match.name, match.eligible, match.fan_in, match.signature
    ('2', True, 512, 'linear 512->256')
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.axes import AxisGraph, AxisGroups, Layout
from exfx.analysis.message_passing import (Propagation, feature_sources, match_propagation, propagated_producer,
                                           propagation_sign)
from exfx.analysis.opsets import describe_node, is_add, is_left_matmul, is_producer, producer_kind
from exfx.analysis.shapes import rank_of, shape_of, tensor_meta
from exfx.analysis.sign import exact_availability
from exfx.meta import SiteMatch, producer_name, relu_source

logger = logging.getLogger(__name__)

__all__ = ["match_site"]


@dataclass
class _Chain:
    """``relu([left @] producer(x) + shifts...)`` as matched backwards from a ReLU."""

    producer: fx.Node | None
    left: fx.Node | None
    shifts: list[fx.Node]
    problem: str = ""
    #: Message passing between the producer and the pre-activation (see
    #: :func:`~exfx.analysis.message_passing.match_propagation`).
    propagation: Propagation | None = None


def _match_chain(relu: fx.Node) -> _Chain:
    shifts: list[fx.Node] = []
    current = relu.args[0]
    while isinstance(current, fx.Node):
        if is_producer(current):
            return _Chain(current, None, shifts)
        if is_add(current):
            lhs, rhs = current.args[0], current.args[1]
            # When both operands lead to a producer (a residual block with a 1x1 shortcut conv), the site is
            # the costlier one, whatever the operand order: that is where early exit saves work, and the
            # paper's choice (the block's second conv, never the shortcut).
            side, other = (lhs, rhs) if _producer_cost(lhs) >= _producer_cost(rhs) else (rhs, lhs)
            if not _leads_to_producer(side):
                break
            if not isinstance(other, fx.Node) or tensor_meta(other) is None:
                return _Chain(None, None, [], "the pre-activation adds a Python scalar")
            if tuple(torch.broadcast_shapes(shape_of(other), shape_of(current))) != shape_of(current):
                return _Chain(None, None, [], f"the residual `{other.name}` broadcasts the pre-activation")
            if len(side.users) != 1:  # type: ignore[union-attr]
                used = f"`{side.name}` is also used outside the pre-activation"  # type: ignore[union-attr]
                return _Chain(None, None, [], used)
            shifts.append(other)
            current = side
            continue
        if is_left_matmul(current):
            inner = current.args[1]
            if isinstance(inner, fx.Node) and inner.target is F.linear and len(inner.users) == 1:
                return _Chain(inner, current.args[0], shifts)  # type: ignore[arg-type]
        if feature_sources(current):
            producer, propagation, problem = match_propagation(current)
            if producer is None:
                return _Chain(None, None, [], problem)
            return _Chain(producer, None, shifts, propagation=propagation)
        break
    return _Chain(None, None, [])


def _leads_to_producer(node: Any) -> bool:
    while isinstance(node, fx.Node):
        if is_producer(node):
            return True
        if is_add(node):
            return _leads_to_producer(node.args[0]) or _leads_to_producer(node.args[1])
        if is_left_matmul(node):
            node = node.args[1]
            continue
        return propagated_producer(node) is not None
    return False


def _producer_cost(node: Any) -> int:
    """Multiply-adds per output neuron of the costliest producer ``node`` leads to; -1 if none."""
    while isinstance(node, fx.Node):
        if is_producer(node):
            weight = node.args[1]
            return math.prod(shape_of(weight)[1:]) if tensor_meta(weight) is not None else 0
        if is_add(node):
            return max(_producer_cost(node.args[0]), _producer_cost(node.args[1]))
        if is_left_matmul(node):
            node = node.args[1]
            continue
        node = propagated_producer(node)
    return -1


def _trace_back(source: Any, limit: int = 12) -> str:
    """Where a ReLU's input comes from, when it is not a site: names an upstream producer if there is one."""
    if not isinstance(source, fx.Node):
        return ""
    path, node = [], source
    while isinstance(node, fx.Node) and len(path) < limit:
        if is_producer(node):
            steps = ", ".join(dict.fromkeys(reversed(path)))
            return (f" ({describe_node(node)} is followed by {steps}, "
                    f"which exfx does not carry partial sums through)")
        path.append(describe_node(node))
        inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None and a.op != "get_attr"]
        node = max(inputs, key=lambda a: math.prod(shape_of(a)), default=None) if inputs else None
    return f" (its input comes from {describe_node(source)})"


def _concat_problem(layout: Layout, fan_in: int, conv_groups: int) -> str:
    """Why a contraction over these concat blocks cannot be sampled in proportion (empty when it can)."""
    if layout.problem:
        return f"contraction axis cannot be sampled: {layout.problem}"
    if layout.blocks == 1:
        return ""
    if conv_groups != 1:
        return (f"grouped conv (groups={conv_groups}) over {layout.blocks} concat blocks: exfx samples concat "
                f"blocks in proportion only for an ungrouped contraction")
    if sum(layout.block_sizes) != fan_in:
        return (f"contraction axis concatenates blocks of {'+'.join(map(str, layout.block_sizes))} units, which "
                f"do not add up to the fan-in {fan_in}; exfx does not know how they are laid out")
    return ""


def match_site(relu: fx.Node, g: AxisGraph, groups: AxisGroups) -> SiteMatch:
    """The verdict on one canonical ReLU (its name not yet made unique; see the exchangeability pass)."""
    chain = _match_chain(relu)
    if chain.producer is None:
        reason = chain.problem or f"no linear/conv producer{_trace_back(relu.args[0])}"
        return SiteMatch(name=relu_source(relu), relu=relu.name, reason=reason)
    producer = chain.producer
    kind = producer_kind(producer)
    found: dict[str, Any] = {"name": producer_name(producer), "relu": relu.name, "kind": kind,
                             "producer": producer.name}
    # Under message passing the producer may feed several steps of its chain (all checked to stay inside it).
    links = [] if chain.propagation is not None else [producer]
    for link in links + ([relu.args[0]] if relu.args[0] is not producer else []):
        if isinstance(link, fx.Node) and len(link.users) != 1:
            others = ", ".join(f"`{u.name}`" for u in link.users if u is not relu)
            return SiteMatch(**found, reason=f"the pre-activation `{link.name}` is also used by {others}")
    x, weight = producer.args[0], producer.args[1]
    if tensor_meta(x) is None or tensor_meta(weight) is None:
        return SiteMatch(**found, reason="the producer's input or weight has no known shape")
    assert isinstance(x, fx.Node)
    axis = -1 if kind == "linear" else 1
    key = (x.name, axis % (rank_of(x) or 1))
    layout = g.layout(x, axis)
    w_shape = shape_of(weight)
    if kind == "linear":
        fan_in = layout.units
        unit_text = f" blocks of {layout.unit}" if layout.unit > 1 else ""
        signature = f"linear {w_shape[1]}->{w_shape[0]}{unit_text}"
    else:
        conv_groups = producer.kwargs.get("groups", 1)
        fan_in = w_shape[1]
        kernel = "x".join(map(str, w_shape[2:]))
        signature = f"{kind} {w_shape[1] * conv_groups}->{w_shape[0]} k{kernel} g{conv_groups}"
    if chain.left is not None:
        signature += " left-matmul"
    if chain.propagation is not None:  # message passing now runs on x's columns: cheaper iff in < out
        signature += f" propagates {w_shape[1]} input columns, not {w_shape[0]} output ones"
        found.update(propagation=tuple(n.name for n in chain.propagation.nodes),
                     propagation_resized=tuple(n.name for n in chain.propagation.resized))
    found.update(group=groups.group_of.get(key), fan_in=fan_in, n_units=fan_in, signature=signature, input=x.name,
                 left=chain.left.name if chain.left is not None else "", shifts=tuple(s.name for s in chain.shifts),
                 concat_blocks=layout.block_sizes)
    if key in groups.pin_of:
        reason = groups.pin_of[key]
        reason = ("contraction axis is a " + reason) if reason.startswith("model input") \
            else f"contraction axis is pinned: {reason}"
        if layout.blocks > 1:  # a cat joins its blocks into one group: one pinned block pins them all
            reason += f" (it concatenates {layout.blocks} blocks, pinned together)"
        return SiteMatch(**found, reason=reason)
    blocked = _concat_problem(layout, fan_in, producer.kwargs.get("groups", 1) if kind != "linear" else 1)
    if blocked:
        return SiteMatch(**found, reason=blocked)
    if kind != "linear" and fan_in == 1:
        return SiteMatch(**found, reason="depthwise: fan-in 1")
    exact, exact_reason = exact_availability(x, chain.left)  # the lossless rule needs a non-negative input
    if exact and chain.propagation is not None:  # the rule then reads propagate(x): its scales must be >= 0 too
        exact, exact_reason = propagation_sign(chain.propagation)
    return SiteMatch(**found, eligible=True, exact_available=exact, exact_reason=exact_reason)
