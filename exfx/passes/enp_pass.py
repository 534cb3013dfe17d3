"""ENP rewrite: insert partial-sum, early-exit and completion nodes before each eligible ReLU.

For a site ``relu([A @] producer(x, W, b) + r1 + r2 ...)`` with schedule
``(k1, k2, ...)`` the pass emits::

    x, W   = x[order], W[:, order]                   # concat only: blocks sampled in proportion
    x_in   = A @ x                                   # GCN form only: (A @ x) @ W == A @ (x @ W)
    shift  = rowsum(A) * b                           # GCN form with a bias: A @ (x W + b)
    x_in   = propagate(x)                            # message passing (GCNConv): the chain replayed on x
    shift  = propagate(ones column) * b              # ... with a producer bias: propagate(x W + 1 b)
    res    = r1 + r2 + ...                           # residuals, joined into one shift
    s1     = exfx.partial_sum(x_in, W, None, None, 0, k1, ...)
    keep1  = exfx.early_exit(s1, W, b, res, None, k1, n, rule, param)
    s2     = exfx.partial_sum(x_in, W, s1, keep1, k1, k2, ...)
    keep2  = exfx.early_exit(s2, W, b, res, keep1, k2, n, rule, param)
    pre    = exfx.complete(x_in, W, s2, b, res, keep2, k2, ...)
    out    = relu(pre)                               # or clamp(pre, 0.0, t) at a ReLU6-style site

and drops the original chain. With ``exact=True`` each checkpoint's ``early_exit`` is
followed by ``keep = exfx.exact_exit(s, x_in, W, P, b, res, keep, k, ...)`` (with
``rule="exact"`` it replaces it), ``P`` the per-block norms of the positive weights,
stored once as the buffer ``exfx_<site>_positive_norms``: a neuron is pruned when the
statistical rule or the proof says so, and the proof only prunes a neuron whose
pre-activation is provably negative (:mod:`exfx.ops.exact`), so its ReLU output was
0 anyway. New nodes are named after the site
(``layer1_0_conv1_partial_sum_1``) so graphs are stable across runs.

Why it is safe: ``complete`` returns ``partial + rest + b + res`` for every kept
neuron, which is the original pre-activation reassociated; a pruned neuron's
pre-activation is 0, so it is exactly 0 after the ReLU, which is where a
correctly predicted negative neuron would have been anyway. The same holds for a
capped ReLU ``clamp(pre, 0.0, t)``: it is 0 exactly where ``pre <= 0``, and a kept
neuron is clamped as before. The GCN form
reassociates ``A @ (x @ W)`` into ``(A @ x) @ W``, exact up to rounding; message
passing likewise, as ``P (x W) = (P x) W`` for the row operator ``P`` (see
:func:`_replay_propagation`). Both then move ``in_features`` columns, not
``out_features``: dearer when the layer widens (the signature says so). A concat
site reorders the contracted axis of ``x`` (``index_select``) and ``W`` (a buffer
``exfx_<site>_sampled_weight``, permuted once) the same way into
:func:`sample_order`, so the sum's terms are only reordered.
``graph.lint()`` runs after the rewrite.
"""

from __future__ import annotations

import heapq
import logging
import operator
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.shapes import shape_of
from exfx.config import SiteParams
from exfx.errors import PlanError
from exfx.meta import SiteMatch, set_rewrite_role, site_match
from exfx.passes.attributes import owner_of, register_constant
from exfx.ops.exact import exact_blocks, positive_block_norms

logger = logging.getLogger(__name__)

__all__ = ["EnpPass", "sample_order", "exact_refusal"]

_OPS = torch.ops.exfx


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "site"


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


def _in_sample_order(graph: fx.Graph, site: SiteMatch, x: Any, weight: Any, slug: str) -> tuple[fx.Node, fx.Node]:
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
    order = graph.create_node("get_attr", register_constant(gm, f"exfx_{slug}_sample_order", index),
                              name=f"{slug}_sample_order")
    sampled_x = graph.create_node("call_function", torch.index_select, (x, axis, order), name=f"{slug}_sampled_input")
    if isinstance(value, torch.Tensor):
        permuted = register_constant(gm, f"exfx_{slug}_sampled_weight", value.detach().index_select(1, index))
        sampled_w = graph.create_node("get_attr", permuted, name=f"{slug}_sampled_weight")
    else:
        sampled_w = graph.create_node("call_function", torch.index_select, (weight, 1, order),
                                      name=f"{slug}_sampled_weight")
    for node, role in ((order, "sample_order"), (sampled_x, "sampled_input"), (sampled_w, "sampled_weight")):
        set_rewrite_role(node, site.name, role)
    logger.debug("site %s: sampling %d concat blocks %s in proportion", site.name, len(site.concat_blocks),
                 site.concat_blocks)
    return sampled_x, sampled_w


class EnpPass(PassBase):
    """Rewrite the sites named in ``params`` (see module docstring).

    Args:
        params: site name -> the parameters to rewrite it with. Each named site
            must be a ReLU whose :class:`~exfx.meta.SiteMatch` (written by the
            exchangeability analysis) is eligible, with a schedule that fits its
            fan-in; other ReLUs are left dense.
    """

    def __init__(self, params: Mapping[str, SiteParams] | Sequence[Any]) -> None:
        super().__init__()
        if not isinstance(params, Mapping):  # exfx 0.1 passed the report's rows
            warnings.warn("EnpPass(report.sites) is deprecated: pass {site name: SiteParams}, e.g. "
                          "{s.name: s.params for s in report.eligible}", DeprecationWarning, stacklevel=2)
            params = {s.name: s.params for s in params if s.eligible and s.params is not None}
        self.params = {name: p for name, p in params.items() if p.enabled}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if not self.params:
            return PassResult(graph_module, False)
        matches = [(node, site_match(node)) for node in graph_module.graph.nodes]
        sites = {m.name: m for _, m in matches if m is not None and m.name in self.params}
        missing = sorted(set(self.params) - set(sites))
        if missing:
            raise PlanError(f"ENP rewrite: no analysed site named {missing}; run the exchangeability analysis on "
                            f"this graph first (exfx.analyse), and name sites as its report does")
        nodes = {n.name: n for n in graph_module.graph.nodes}
        for site in sites.values():
            self._rewrite(graph_module.graph, site, self.params[site.name], nodes)
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    @staticmethod
    def _check(site: SiteMatch, params: SiteParams) -> None:
        if not site.eligible:
            raise PlanError(f"site {site.name!r} cannot be rewritten: {site.reason}")
        if params.checkpoints[-1] > (site.fan_in or 0):
            raise PlanError(f"site {site.name!r}: samples {params.checkpoints} exceed its fan-in {site.fan_in}")
        if params.exact and not site.exact_available:
            raise PlanError(exact_refusal(site))

    def _rewrite(self, graph: fx.Graph, site: SiteMatch, params: SiteParams, nodes: dict[str, fx.Node]) -> None:
        self._check(site, params)
        relu, producer = nodes[site.relu], nodes[site.producer]
        slug = _slug(site.name)
        x, weight, bias = producer.args[0], producer.args[1], producer.args[2]
        linear = producer.target is F.linear
        conv: dict[str, Any] = {
            "stride": [] if linear else list(producer.kwargs["stride"]),
            "padding": [] if linear else list(producer.kwargs["padding"]),
            "dilation": [] if linear else list(producer.kwargs["dilation"]),
            "groups": 1 if linear else int(producer.kwargs["groups"]),
        }

        def make(target: Any, args: tuple[Any, ...], role: str) -> fx.Node:
            node = graph.create_node("call_function", target, args, name=f"{slug}_{role}")
            set_rewrite_role(node, site.name, role)
            return node

        with graph.inserting_before(relu):
            if site.concat_blocks:  # a concat: reorder the contracted axis so any first k units sample every block
                x, weight = _in_sample_order(graph, site, x, weight, slug)
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
                    column = _create(graph, site, "call_method", "narrow", (x, -1, 0, 1), slug, "bias_column")
                    ones = _create(graph, site, "call_function", torch.ones_like, (column,), slug, "bias_ones")
                    rows = _replay_propagation(graph, site, nodes, ones, 1, slug, "bias_propagated")
                    residual = make(torch.mul, (rows, bias), "propagated_bias")
                    bias = None
                features = _create(graph, site, "call_method", "size", (x, -1), slug, "in_features")
                x = _replay_propagation(graph, site, nodes, x, features, slug, "propagated")
            for shift in site.shifts:
                residual = nodes[shift] if residual is None else make(
                    torch.add, (residual, nodes[shift]), "residual")
            state, active, done = None, None, 0
            moments = params.rule == "ztest"
            # The exact rule: its bound's per-block norms of the positive weights, computed once into a buffer.
            norms, starts = _positive_norms_node(graph, site, weight, params, slug) if params.exact else (None, ())
            for step, k in enumerate(params.checkpoints, start=1):
                state = make(_OPS.partial_sum.default,
                             (x, weight, state, active, done, k, site.n_units, conv["stride"], conv["padding"],
                              conv["dilation"], conv["groups"], moments, site.name), f"partial_sum_{step}")
                if params.statistical and k in params.samples:  # (exact_samples are the exact test's alone)
                    active = make(_OPS.early_exit.default,
                                  (state, weight, bias, residual, active, k, site.fan_in, params.rule, params.param,
                                   site.name), f"early_exit_{step}")
                if norms is not None and k in params.exact_checkpoints:  # pruned when the rule OR the proof says so
                    active = make(_OPS.exact_exit.default,
                                  (state, x, weight, norms, bias, residual, active, k, site.n_units, list(starts),
                                   conv["stride"], conv["padding"], conv["dilation"], conv["groups"], site.name),
                                  f"exact_exit_{step}")
                done = k
            pre = make(_OPS.complete.default,
                       (x, weight, state, bias, residual, active, done, site.n_units, conv["stride"],
                        conv["padding"], conv["dilation"], conv["groups"], site.name), "complete")
        relu.args = (pre, *relu.args[1:])  # a capped ReLU keeps its bounds: clamp(pre, 0.0, t)
        logger.debug("rewrote site %s (%s%s, samples %s)", site.name, params.rule,
                     " + exact" if params.exact and params.statistical else "", params.checkpoints)


def _create(graph: fx.Graph, site: SiteMatch, op: str, target: Any, args: tuple[Any, ...], slug: str, role: str,
            kwargs: dict[str, Any] | None = None) -> fx.Node:
    """A new node named and labelled after the site (no meta: shapes are read again at run time)."""
    node = graph.create_node(op, target, args, kwargs or {}, name=f"{slug}_{role}")
    set_rewrite_role(node, site.name, role)
    return node


def _replay_propagation(graph: fx.Graph, site: SiteMatch, nodes: dict[str, fx.Node], source: Any, features: Any,
                        slug: str, role: str) -> fx.Node:
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
            args = _with_last_size(graph, site, node, tuple(args), features, slug, f"{role}_{name}_size")
        env[node] = _create(graph, site, node.op, node.target, tuple(args), slug, f"{role}_{name}", dict(kwargs))
    return env[nodes[site.propagation[-1]]]


def _with_last_size(graph: fx.Graph, site: SiteMatch, node: fx.Node, args: tuple[Any, ...], features: Any,
                    slug: str, role: str) -> tuple[Any, ...]:
    """``args`` of a ``zeros`` / ``new_zeros`` / ``expand`` call with the last entry of its size set to ``features``
    (the size given as separate numbers, as one tuple, or as one ``torch.Size`` node)."""
    start = 1 if node.op == "call_method" else 0  # a method's first argument is the tensor itself
    head, sizes = args[:start], args[start:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = ((*sizes[0][:-1], features),)
    elif len(sizes) == 1 and isinstance(sizes[0], fx.Node):
        leading = _create(graph, site, "call_function", operator.getitem, (sizes[0], slice(None, -1)), slug,
                          f"{role}_leading")
        sizes = (_create(graph, site, "call_function", operator.add, (leading, (features,)), slug, role),)
    else:
        sizes = (*sizes[:-1], features)
    return (*head, *sizes)


def _stored_value(gm: fx.GraphModule, node: Any, site: SiteMatch) -> torch.Tensor:
    """The value of a weight node that depends on no input: a stored tensor, or ops on stored tensors
    (``W.t()`` from ``x @ W``), evaluated once here."""
    if not isinstance(node, fx.Node):
        if isinstance(node, torch.Tensor):
            return node
        raise PlanError(f"site {site.name!r}: the exact rule needs the producer's weight as a tensor, got {node!r}")
    if node.op == "get_attr":
        return getattr(*owner_of(gm, str(node.target)))
    if node.op in ("call_function", "call_method"):
        args = fx.node.map_arg(node.args, lambda n: _stored_value(gm, n, site))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _stored_value(gm, n, site))
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)  # type: ignore[operator]
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise PlanError(f"site {site.name!r}: the exact rule needs the producer's weight to be stored in the model, "
                    f"but it comes from `{node.name}` ({node.op}); use rule='threshold' or 'ztest' without exact "
                    f"for this site")


def _positive_norms_node(graph: fx.Graph, site: SiteMatch, weight: Any, params: SiteParams,
                        slug: str) -> tuple[fx.Node, tuple[int, ...]]:
    """A ``get_attr`` of the exact rule's per-row, per-block norms of the positive weights (a buffer named
    ``exfx_<site>_positive_norms``, computed here from the weight the partial sums read), and the block starts.

    Why it is safe: the norms only bound the unsampled terms from above for ``x >= 0``, which the analysis proved
    (``site.exact_available``); the test prunes only a neuron whose bound is negative.
    """
    gm = graph.owning_module
    if gm is None:
        raise PlanError(f"site {site.name!r}: the exact rule stores its weight norms on the GraphModule; run EnpPass "
                        f"on a GraphModule (exfx.analyse), not on a bare graph")
    value = _stored_value(gm, weight, site)
    starts = exact_blocks(site.fan_in or 0, params.exact_checkpoints)
    name = register_constant(gm, f"exfx_{slug}_positive_norms", positive_block_norms(value, site.n_units, starts))
    node = graph.create_node("get_attr", name, name=f"{slug}_positive_norms")
    set_rewrite_role(node, site.name, "positive_norms")
    return node, starts


def exact_refusal(site: SiteMatch) -> str:
    """The PlanError message for a plan that asks for the exact rule where the analysis refused it."""
    return (f"site {site.name!r}: the plan asks for the exact rule, but {site.exact_reason or 'it is unavailable'}; "
            f"the exact rule needs a provably non-negative input (a ReLU, or a pool of one). Set exact=false (and "
            f"a statistical rule) for this site, or disable it")
