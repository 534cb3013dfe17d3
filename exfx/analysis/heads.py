"""Head matching: find a model's prediction head and decide whether dominance prediction may rewrite it.

The *head* is the last ``F.linear`` whose output is the model output, directly or through ops that keep every
row's order of classes (``contiguous``, ``clone``, a softmax or log-softmax over the class axis, a reshape that
keeps the class axis, an ``argmax`` over it). Only then does "keep the top-1, return ``-inf`` for the rest"
change nothing the caller reads beyond the other classes' scores.

It is *eligible* for dominance prediction (:class:`exfx.config.DominanceParams`) when

- its output reaches the model output through that chain alone (no other consumer would see the ``-inf``);
- its weight is a stored tensor (the rewrite splits it once, at compile time);
- its contraction axis belongs to an exchangeable group (:mod:`exfx.analysis.axes`): then the first ``k`` input
  units are a fair sample of all ``n``, which is what makes the bounds statistical statements. A model input
  feeding the head directly is pinned, so it is refused with the pin's reason;
- its units are single features (a flattened conv map has units of ``H*W`` features; pool it first).

Concat blocks along the contraction axis are allowed: the rewrite samples every block in proportion
(:func:`exfx.passes.enp_pass.sample_order`).

Example::

    >>> analysis = exfx.analyse(lm.eval(), (input_ids,))
    >>> head = match_head(analysis.graph_module, analysis.groups)
    >>> head.name, head.eligible, head.n_units, head.classes
    ('model.lm_head', True, 256, 8192)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.axes import AxisGroups, build_axis_graph
from exfx.analysis.opsets import describe_node
from exfx.analysis.shapes import rank_of, shape_of
from exfx.meta import HeadMatch, axis_groups, producer_name

logger = logging.getLogger(__name__)

__all__ = ["HeadMatch", "match_head", "head_input_rms"]

#: Ops between the head and the output that keep each row's order of classes (checked further in `_passes_through`).
_ORDER_KEEPING_METHODS = ("contiguous", "clone", "float", "softmax", "log_softmax", "view", "reshape", "argmax")
_ORDER_KEEPING_FUNCTIONS = (torch.clone, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax,
                            torch.reshape, torch.argmax)


def _class_axis_kept(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` keeps the class (last) axis of ``source`` in place, for the order-keeping ops."""
    src_shape, out_shape = shape_of(source), shape_of(node)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in ("softmax", "log_softmax", "argmax"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return isinstance(dim, int) and dim % len(src_shape) == len(src_shape) - 1
    if name in ("view", "reshape"):
        return bool(out_shape) and out_shape[-1] == src_shape[-1]
    return out_shape == src_shape


def _passes_through(node: fx.Node) -> fx.Node | None:
    """The tensor input of an order-keeping op between the head and the output, or None for any other op."""
    known = ((node.op == "call_method" and node.target in _ORDER_KEEPING_METHODS)
             or (node.op == "call_function" and node.target in _ORDER_KEEPING_FUNCTIONS))
    if not known or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    if rank_of(source) is None or rank_of(node) is None or not _class_axis_kept(node, source):
        return None
    return source


def _output_value(gm: fx.GraphModule) -> tuple[fx.Node | None, str]:
    """The single tensor the graph returns, or None and why."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, fx.Node):
        count = len(value) if isinstance(value, (tuple, list, dict)) else 0
        return None, (f"the model returns {count} values; dominance prediction needs the logits as its only output "
                      f"(wrap the model so that forward returns them alone)")
    return value, ""


def _find_linear(value: fx.Node) -> tuple[fx.Node | None, str]:
    """Walk back from the output through order-keeping ops to the head's ``F.linear``."""
    current = value
    while not (current.op == "call_function" and current.target is F.linear):
        source = _passes_through(current)
        if source is None:
            return None, (f"the model output comes from {describe_node(current)}, not from a linear head (only "
                          f"contiguous, clone, float, a softmax, log-softmax or argmax over the class axis, or a "
                          f"reshape keeping it, may follow the head)")
        if len(source.users) != 1:
            others = ", ".join(f"`{u.name}`" for u in source.users if u is not current)
            return None, f"`{source.name}` on the way to the output is also used by {others}: they would see -inf"
        current = source
    return current, ""


def match_head(gm: fx.GraphModule, groups: AxisGroups) -> HeadMatch:
    """The head of an analysed GraphModule (canonical, shape-propagated, with axis groups): see module docstring."""
    value, problem = _output_value(gm)
    if value is None:
        return HeadMatch(name="-", reason=problem)
    linear, problem = _find_linear(value)
    if linear is None:
        return HeadMatch(name="-", reason=problem)
    name = producer_name(linear)
    x, weight = linear.args[0], linear.args[1]
    record: dict[str, Any] = {"name": name, "linear": linear.name}
    if not isinstance(x, fx.Node) or rank_of(x) is None:
        return HeadMatch(reason="the head's input is not a tensor node", **record)
    record.update(input=x.name, n_units=shape_of(x)[-1], classes=shape_of(linear)[-1])
    if len(linear.users) != 1:
        return HeadMatch(reason=f"the head's output is also used by {len(linear.users) - 1} other node(s): they "
                         f"would see -inf", **record)
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return HeadMatch(reason="the head's weight is computed in the graph, not stored: it cannot be split at "
                         "compile time", **record)
    axis = (rank_of(x) or 1) - 1
    labels = axis_groups(x)
    group = labels[axis] if labels is not None and len(labels) > axis else groups.group_of.get((x.name, axis))
    if group is None:
        pin = groups.pin_of.get((x.name, axis), "its group is not labelled (run the exchangeability analysis)")
        return HeadMatch(reason=f"the head's contraction axis is not exchangeable: {pin}", **record)
    layout = build_axis_graph(gm).layout(x, axis)
    if layout.problem:
        return HeadMatch(reason=f"the head's contraction axis cannot be sampled: {layout.problem}", group=group,
                         **record)
    if layout.unit != 1:
        return HeadMatch(reason=f"the head contracts {layout.units} units of {layout.unit} features each (a "
                         f"flattened map); dominance prediction samples single features: pool before the head",
                         group=group, **record)
    return HeadMatch(eligible=True, group=group, blocks=tuple(layout.block_sizes), **record)


def head_input_rms(gm: fx.GraphModule, head: HeadMatch, batches: Iterable[Any]) -> torch.Tensor:
    """Per-feature root mean square of the head's input over ``batches`` (each a tuple of model inputs, or one
    tensor): what :func:`exfx.passes.dominance_pass.outlier_units` reads to find magnitude outliers."""
    if not head.input:
        raise ValueError(f"head {head.name!r} has no input node: {head.reason}")
    node = next(n for n in gm.graph.nodes if n.name == head.input)
    sums: list[torch.Tensor] = []
    counts: list[int] = []

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n is node:
                rows = result.detach().reshape(-1, result.shape[-1]).double()
                sums.append((rows * rows).sum(0))
                counts.append(rows.shape[0])
            return result

    with torch.no_grad():
        for batch in batches:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            _Recorder(gm).run(*inputs)
    if not counts:
        raise ValueError("head_input_rms needs at least one batch")
    return (torch.stack(sums).sum(0) / sum(counts)).sqrt().float()
