"""ENP rewrite: insert partial-sum, early-exit and completion nodes before each eligible ReLU.

For a site ``relu([A @] producer(x, W, b) + r1 + r2 ...)`` with schedule
``(k1, k2, ...)`` the pass prepares the operands ``x_in, W, b, res`` of the sum
(:func:`exfx.passes.operands.site_operands`: concat sample order, the GCN form,
message passing, the joined residuals), then emits::

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
:func:`exfx.passes.operands.site_operands`). Both then move ``in_features`` columns, not
``out_features``: dearer when the layer widens (the signature says so). A concat
site reorders the contracted axis of ``x`` (``index_select``) and ``W`` (a buffer
``exfx_<site>_sampled_weight``, permuted once) the same way into
:func:`sample_order`, so the sum's terms are only reordered.
``graph.lint()`` runs after the rewrite.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.opsets import describe_node
from exfx.config import SiteParams
from exfx.errors import PlanError
from exfx.meta import SiteMatch, set_rewrite_role, site_decision, site_match
from exfx.passes.attributes import owner_of, register_constant, slug
from exfx.passes.operands import site_operands
from exfx.ops.exact import exact_blocks, positive_block_norms

logger = logging.getLogger(__name__)

__all__ = ["EnpPass", "require_annotated"]

_OPS = torch.ops.exfx


class EnpPass(PassBase):
    """Rewrite every site whose :class:`~exfx.meta.SiteDecision` asks for the reference ops (see module docstring).

    Reads only the records the annotate step wrote (:class:`~exfx.passes.annotate_pass.AnnotatePass`): the
    analysis's :class:`~exfx.meta.SiteMatch` for the site's structure and the decision for its parameters. Sites
    the decision leaves dense or hands to the native lowering are not touched.
    """

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_annotated(graph_module, "the ENP rewrite")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        chosen = [(site_match(node), decision) for node in graph_module.graph.nodes
                  if (decision := site_decision(node)) is not None and decision.rewritten]
        if not chosen:
            return PassResult(graph_module, False)
        nodes = {n.name: n for n in graph_module.graph.nodes}
        for match, decision in chosen:
            assert match is not None and decision.params is not None  # validated by the annotate step
            _rewrite(graph_module.graph, match, decision.params, nodes)
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        return PassResult(graph_module, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()


def _rewrite(graph: fx.Graph, site: SiteMatch, params: SiteParams, nodes: dict[str, fx.Node]) -> None:
    relu, name = nodes[site.relu], slug(site.name)
    operands = site_operands(graph, site, nodes)
    x, weight, bias, residual = operands.x, operands.weight, operands.bias, operands.residual
    conv = (operands.stride, operands.padding, operands.dilation, operands.groups)

    def make(target: Any, args: tuple[Any, ...], role: str) -> fx.Node:
        node = graph.create_node("call_function", target, args, name=f"{name}_{role}")
        set_rewrite_role(node, site.name, role)
        return node

    with graph.inserting_before(relu):
        state, active, done = None, None, 0
        moments = params.rule == "ztest"
        # The exact rule: its bound's per-block norms of the positive weights, computed once into a buffer.
        norms, starts = _positive_norms_node(graph, site, weight, params, name) if params.exact else (None, ())
        for step, k in enumerate(params.checkpoints, start=1):
            state = make(_OPS.partial_sum.default,
                         (x, weight, state, active, done, k, site.n_units, *conv, moments, site.name),
                         f"partial_sum_{step}")
            if params.statistical and k in params.samples:  # (exact_samples are the exact test's alone)
                active = make(_OPS.early_exit.default,
                              (state, weight, bias, residual, active, k, site.fan_in, params.rule, params.param,
                               site.name), f"early_exit_{step}")
            if norms is not None and k in params.exact_checkpoints:  # pruned when the rule OR the proof says so
                active = make(_OPS.exact_exit.default,
                              (state, x, weight, norms, bias, residual, active, k, site.n_units, list(starts),
                               *conv, site.name), f"exact_exit_{step}")
            done = k
        pre = make(_OPS.complete.default,
                   (x, weight, state, bias, residual, active, done, site.n_units, *conv, site.name), "complete")
    relu.args = (pre, *relu.args[1:])  # a capped ReLU keeps its bounds: clamp(pre, 0.0, t)
    logger.debug("rewrote site %s (%s%s, samples %s)", site.name, params.rule,
                 " + exact" if params.exact and params.statistical else "", params.checkpoints)


def require_annotated(graph_module: fx.GraphModule, stage: str) -> None:
    """Raise unless every analysed site of ``graph_module`` carries its decision (the annotate step ran)."""
    bare = [match.name for node in graph_module.graph.nodes
            if (match := site_match(node)) is not None and site_decision(node) is None]
    if bare:
        raise PlanError(f"{stage}: sites {bare} carry no decision; run exfx.passes.AnnotatePass on the analysed "
                        f"GraphModule first (exfx.Analysis.compile does)")


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
                    f"but it comes from {describe_node(node)}; use rule='threshold' or 'ztest' without exact "
                    f"for this site")


def _positive_norms_node(graph: fx.Graph, site: SiteMatch, weight: Any, params: SiteParams,
                        name: str) -> tuple[fx.Node, tuple[int, ...]]:
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
    buffer = register_constant(gm, f"exfx_{name}_positive_norms", positive_block_norms(value, site.n_units, starts))
    node = graph.create_node("get_attr", buffer, name=f"{name}_positive_norms")
    set_rewrite_role(node, site.name, "positive_norms")
    return node, starts
