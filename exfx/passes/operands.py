"""The operands of a site's sum, prepared in the graph: what the ENP rewrite and the native lowering both read.

For a site ``relu([A @] producer(x, W, b) + r1 + r2 ...)`` (a :class:`~exfx.meta.SiteMatch`),
:func:`site_operands` inserts before the ReLU, named after the site::

    x, W   = x[order], W[:, order]                   # concat only: blocks sampled in proportion
    x_in   = A @ x                                   # GCN form only: (A @ x) @ W == A @ (x @ W)
    shift  = rowsum(A) * b                           # GCN form with a bias: A @ (x W + b)
    x_in   = propagate(x)                            # message passing (GCNConv): the chain replayed on x
    shift  = propagate(ones column) * b              # ... with a producer bias: propagate(x W + 1 b)
    res    = r1 + r2 + ...                           # residuals, joined into one shift

and returns ``(x_in, W, b, res)`` with the producer's convolution arguments: the pre-activation is
``producer(x_in, W, b) + res`` up to float reassociation, which every rewrite of the site computes in its own way
(:mod:`.enp_pass` by partial sums, :mod:`.lower_pass` with a native kernel or dense).

Not a pass: the part :mod:`.enp_pass` and :mod:`.lower_pass` share. Why each step is exact is said where it is
made (:func:`sample_order`, :func:`_in_sample_order`, :func:`_replay_propagation`).
"""

from __future__ import annotations

import heapq
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.shapes import shape_of
from exfx.errors import PlanError
from exfx.meta import SiteMatch, set_rewrite_role
from exfx.passes.attributes import owner_of, register_constant, slug

logger = logging.getLogger(__name__)

__all__ = ["SiteOperands", "site_operands", "sample_order"]


@dataclass(frozen=True)
class SiteOperands:
    """The operands of a site's sum as graph values: ``producer(x, weight, bias) + residual`` is its
    pre-activation; ``stride``/``padding``/``dilation``/``groups`` are the producer's (empty / 1 for a linear)."""

    x: Any
    weight: Any
    bias: Any
    residual: Any
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


def site_operands(graph: fx.Graph, site: SiteMatch, nodes: dict[str, fx.Node]) -> SiteOperands:
    """Insert, before the site's ReLU, the nodes that prepare its sum's operands (see module docstring)."""
    relu, producer = nodes[site.relu], nodes[site.producer]
    name = slug(site.name)
    x, weight, bias = producer.args[0], producer.args[1], producer.args[2]
    linear = producer.target is F.linear

    def make(target: Any, args: tuple[Any, ...], role: str) -> fx.Node:
        return _create(graph, site, "call_function", target, args, name, role)

    with graph.inserting_before(relu):
        if site.concat_blocks:  # a concat: reorder the contracted axis so any first k units sample every block
            x, weight = _in_sample_order(graph, site, x, weight, name)
        residual = None
        if site.left:
            left = nodes[site.left]
            x = make(torch.matmul, (left, x), "left_matmul")
            if bias is not None:
                # A @ (x W + 1 b) = (A @ x) W + (A @ 1) b: the bias becomes a per-row shift.
                rows = make(torch.sum, (left, -1, True), "left_row_sum")
                residual = make(torch.mul, (rows, bias), "left_bias")
                bias = None
        elif site.propagation:
            # propagate(x W + 1 b) = propagate(x) W + propagate(1) b (see _replay_propagation): the message
            # passing runs on x's in_features columns, a producer bias becomes the per-row shift.
            if bias is not None:
                column = _create(graph, site, "call_method", "narrow", (x, -1, 0, 1), name, "bias_column")
                ones = make(torch.ones_like, (column,), "bias_ones")
                rows = _replay_propagation(graph, site, nodes, ones, 1, name, "bias_propagated")
                residual = make(torch.mul, (rows, bias), "propagated_bias")
                bias = None
            features = _create(graph, site, "call_method", "size", (x, -1), name, "in_features")
            x = _replay_propagation(graph, site, nodes, x, features, name, "propagated")
        for shift in site.shifts:
            residual = nodes[shift] if residual is None else make(torch.add, (residual, nodes[shift]), "residual")
    if linear:
        return SiteOperands(x, weight, bias, residual, [], [], [], 1)
    return SiteOperands(x, weight, bias, residual, list(producer.kwargs["stride"]), list(producer.kwargs["padding"]),
                        list(producer.kwargs["dilation"]), int(producer.kwargs["groups"]))


def sample_order(block_sizes: Sequence[int]) -> list[int]:
    """The units of concat blocks of these sizes (indices along the concatenated axis) in *sample order*.

    Every prefix of ``k`` units holds ``floor`` or ``ceil`` of ``k * n_b / N`` units of each block ``b``
    (``N`` the total), and each block's own units come in their own order, so the first ``k`` units are a
    proportional stratified sample. Unit ``j`` (from 1) of block ``b`` may not come before position
    ``floor((j - 1) N / n_b) + 1`` (the block would pass its ceiling) and is due by position
    ``ceil(j N / n_b)`` (it would fall below its floor). Each position takes, of the units whose window has
    opened, the one due soonest (earlier block on ties). A sequence that keeps every block within 1 of its
    share exists (Tijdeman's chairman assignment theorem), and earliest-deadline-first meets every window
    of unit-length jobs whenever some order does. Sorting by ``(i + 0.5) / n_b`` instead (Sainte-Lague)
    breaks the floor/ceil bound for some sizes, e.g. ``(3, 9, 39, 2)``.

    Example::

        >>> sample_order([4, 2])
        [0, 1, 4, 2, 3, 5]
    """
    sizes = [int(size) for size in block_sizes]
    if any(size < 0 for size in sizes):
        raise ValueError(f"block sizes must not be negative, got {sizes}")
    total = sum(sizes)
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    taken = [0] * len(sizes)
    opening = [(1, b) for b, size in enumerate(sizes) if size > 0]  # (first position, block) of each next unit
    ready: list[tuple[int, int]] = []  # (due position, block) of next units whose window is open
    order: list[int] = []
    for position in range(1, total + 1):
        while opening and opening[0][0] <= position:
            _, b = heapq.heappop(opening)
            heapq.heappush(ready, (-(-(taken[b] + 1) * total // sizes[b]), b))
        _, b = heapq.heappop(ready)
        order.append(starts[b] + taken[b])
        taken[b] += 1
        if taken[b] < sizes[b]:
            heapq.heappush(opening, (taken[b] * total // sizes[b] + 1, b))
    return order


def _in_sample_order(graph: fx.Graph, site: SiteMatch, x: Any, weight: Any, prefix: str) -> tuple[fx.Node, fx.Node]:
    """``x`` and ``W`` with the contraction axis reordered into :func:`sample_order` of ``site.concat_blocks``.

    Why it is safe: the same permutation of the contracted axis in both operands only reorders the terms of
    every sum, so ``W' x' == W x`` up to reassociation; the partial-sum, early-exit and completion ops are
    unchanged, and their first ``k`` units now sample every concat block in proportion. For a linear after a
    flatten the permutation moves whole units (``features / n_units`` consecutive features). The permuted
    weight is computed once, here, into a buffer named after the site (``exfx_<site>_sampled_weight``);
    a weight that is not a stored tensor is permuted in the graph instead.
    """
    gm = graph.owning_module
    if gm is None or not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
        raise PlanError(f"site {site.name!r}: its concat blocks need a GraphModule with the producer's input and "
                        f"weight as nodes; run EnpPass on the analysed GraphModule (exfx.analyse)")
    stored = owner_of(gm, str(weight.target)) if weight.op == "get_attr" else None
    value = getattr(*stored) if stored is not None else None
    unit = 1  # a conv's unit is one channel; a linear's, features / n_units (a block of them after a flatten)
    if site.kind == "linear":
        unit = (value.shape[1] if isinstance(value, torch.Tensor) else shape_of(weight)[1]) // site.n_units
    units = sample_order(site.concat_blocks)
    device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
    index = torch.tensor([u * unit + i for u in units for i in range(unit)], dtype=torch.long, device=device)
    axis = -1 if site.kind == "linear" else 1
    order = graph.create_node("get_attr", register_constant(gm, f"exfx_{prefix}_sample_order", index),
                              name=f"{prefix}_sample_order")
    sampled_x = graph.create_node("call_function", torch.index_select, (x, axis, order), name=f"{prefix}_sampled_input")
    if isinstance(value, torch.Tensor):
        permuted = register_constant(gm, f"exfx_{prefix}_sampled_weight", value.detach().index_select(1, index))
        sampled_w = graph.create_node("get_attr", permuted, name=f"{prefix}_sampled_weight")
    else:
        sampled_w = graph.create_node("call_function", torch.index_select, (weight, 1, order),
                                      name=f"{prefix}_sampled_weight")
    for node, role in ((order, "sample_order"), (sampled_x, "sampled_input"), (sampled_w, "sampled_weight")):
        set_rewrite_role(node, site.name, role)
    logger.debug("site %s: sampling %d concat blocks %s in proportion", site.name, len(site.concat_blocks),
                 site.concat_blocks)
    return sampled_x, sampled_w


def _create(graph: fx.Graph, site: SiteMatch, op: str, target: Any, args: tuple[Any, ...], prefix: str, role: str,
            kwargs: dict[str, Any] | None = None) -> fx.Node:
    """A new node named and labelled after the site (no meta: shapes are read again at run time)."""
    node = graph.create_node(op, target, args, kwargs or {}, name=f"{prefix}_{role}")
    set_rewrite_role(node, site.name, role)
    return node


def _replay_propagation(graph: fx.Graph, site: SiteMatch, nodes: dict[str, fx.Node], source: Any, features: Any,
                        prefix: str, role: str) -> fx.Node:
    """The site's message passing (``site.propagation``) run again on ``source``, which has ``features`` columns.

    Each node is created again with its op and arguments, the producer's output replaced by ``source`` and every
    earlier node of the chain by its copy; the nodes in ``site.propagation_resized`` (scatter targets, broadcast
    indices) get ``features`` as the last entry of their size. Why this is exact: the analysis admits only steps
    that move, scale or sum whole rows (gather, multiply by one number per row, scatter-sum into zeros, a left
    matmul) and never mix or reshape the feature columns, so the chain is ``P @ (.)`` for one matrix ``P`` acting
    on rows, whatever the column count: ``P (x W) = (P x) W`` and ``P (1 b) = (P 1) b``, equal up to float
    reassociation. The copies carry no meta, since the originals' shapes have the old column count.
    """
    env: dict[fx.Node, Any] = {nodes[site.producer]: source}
    resized = set(site.propagation_resized)
    for name in site.propagation:
        node = nodes[name]
        args = fx.node.map_arg(node.args, lambda n: env.get(n, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env.get(n, n))
        if name in resized:
            args = _with_last_size(graph, site, node, tuple(args), features, prefix, f"{role}_{name}_size")
        env[node] = _create(graph, site, node.op, node.target, tuple(args), prefix, f"{role}_{name}", dict(kwargs))
    return env[nodes[site.propagation[-1]]]


def _with_last_size(graph: fx.Graph, site: SiteMatch, node: fx.Node, args: tuple[Any, ...], features: Any,
                    prefix: str, role: str) -> tuple[Any, ...]:
    """``args`` of a ``zeros`` / ``new_zeros`` / ``expand`` call with the last entry of its size set to ``features``
    (the size given as separate numbers, as one tuple, or as one ``torch.Size`` node)."""
    start = 1 if node.op == "call_method" else 0  # a method's first argument is the tensor itself
    head, sizes = args[:start], args[start:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = ((*sizes[0][:-1], features),)
    elif len(sizes) == 1 and isinstance(sizes[0], fx.Node):
        leading = _create(graph, site, "call_function", operator.getitem, (sizes[0], slice(None, -1)), prefix,
                          f"{role}_leading")
        sizes = (_create(graph, site, "call_function", operator.add, (leading, (features,)), prefix, role),)
    else:
        sizes = (*sizes[:-1], features)
    return (*head, *sizes)
