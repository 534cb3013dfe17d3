"""Dominance rewrite: compute a linear head's top-1 from a sample of its input units (opt-in).

For the model's head ``logits = F.linear(x, W, b)`` (found and checked by :func:`exfx.analysis.heads.match_head`)
and :class:`~exfx.config.DominanceParams` ``(samples=(k1, k2, ...), alpha, always_sampled=F)`` the pass emits::

    xs            = index_select(x, -1, order)   # only when F is given or the axis concatenates blocks
    pair          = exfx.dominance_linear(xs, head, squares, rest, b, [k1, k2, ...], f, alpha, site)
    logits        = pair[0]                       # pair[1]: the tested counts the FLOP formula reads

and drops the original linear. ``order`` puts the ``f`` always-sampled units first, then the others in sample
order (every prefix samples the concat blocks in proportion, :func:`exfx.passes.operands.sample_order`). The
weight is split once, here, into buffers named after the head (``exfx_<site>_dominance_head`` and friends; see
:mod:`exfx.ops.dominance` for their layout), so at batch 1 the first test reads ``f + k1`` contiguous weight rows
and later checkpoints and the completion gather only the kept classes' rows.

Why it is safe: the same permutation of the contraction axis in ``x`` and ``W`` only reorders the terms of every
logit. ``dominance_linear`` returns, for each kept class, the sum of all ``n`` terms plus the bias (the dense
logit up to float reassociation) and ``-inf`` for the others, so the argmax equals the dense argmax whenever the
true argmax is kept, and the caller's softmax gives the dropped classes probability 0. The head analysis refuses
a head whose contraction axis is not exchangeable (the fair-sample assumption behind the bounds) or whose
output reaches anything but the model output. ``graph.lint()`` runs after the rewrite.

:func:`outlier_units` picks ``always_sampled`` from calibration data: trained transformers have a few hidden
dimensions of outsized magnitude, which a fair sample of a few units represents badly; summing them exactly
outside the sample removes them from the variance.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.config import DominanceParams
from exfx.meta import HeadDecision, head_decision, set_rewrite_role
from exfx.passes.attributes import owner_of, register_constant, slug
from exfx.passes.operands import sample_order

logger = logging.getLogger(__name__)

__all__ = ["DominancePass", "outlier_units", "unit_order"]

_OPS = torch.ops.exfx


def unit_order(n_units: int, always_sampled: tuple[int, ...] = (), blocks: tuple[int, ...] = ()) -> list[int]:
    """The head's input units in the order the rewrite reads them: ``always_sampled`` first, then the rest in
    sample order (concat blocks in proportion, else natural order).

    Example::

        >>> unit_order(6, always_sampled=(4,), blocks=(4, 2))
        [4, 0, 1, 2, 3, 5]
    """
    always = set(always_sampled)
    rest = sample_order(blocks) if blocks else range(n_units)
    return list(always_sampled) + [unit for unit in rest if unit not in always]


def outlier_units(rms: torch.Tensor, factor: float = 6.0, limit: int | None = None) -> tuple[int, ...]:
    """The units whose root mean square exceeds ``factor`` times the median unit's, largest first (at most
    ``limit``): the ``always_sampled`` set for :class:`~exfx.config.DominanceParams`.

    ``rms`` comes from :func:`exfx.analysis.heads.head_input_rms` on calibration data (not the test set).
    """
    if rms.dim() != 1 or rms.numel() == 0:
        raise ValueError(f"rms must be a non-empty 1-D tensor of per-unit magnitudes, got shape {tuple(rms.shape)}")
    median = float(rms.median())
    order = torch.argsort(rms, descending=True).tolist()
    chosen = [unit for unit in order if float(rms[unit]) > factor * median]
    return tuple(chosen[:limit] if limit is not None else chosen)


class DominancePass(PassBase):
    """Rewrite the head whose :class:`~exfx.meta.HeadDecision` the annotate step wrote (see module docstring).

    The head analysis, and the check that the parameters fit the head, ran when the decision was made
    (:func:`exfx.passes.annotate_pass.decide_head`); with no decision on the graph the pass does nothing.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        decided = [(node, record) for node in graph_module.graph.nodes if (record := head_decision(node)) is not None]
        for node, record in decided:
            self._rewrite(graph_module, node, record)
        if decided:
            graph_module.graph.eliminate_dead_code()
            graph_module.recompile()
        return PassResult(graph_module, bool(decided))

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()

    @staticmethod
    def _split_weight(gm: fx.GraphModule, params: DominanceParams, weight: fx.Node, order: list[int],
                      prefix: str) -> tuple[str, str, str]:
        """Store the head weight in sample order, split as :mod:`exfx.ops.dominance` reads it; the buffer names."""
        value = getattr(*owner_of(gm, str(weight.target))).detach()
        permuted = value.index_select(1, torch.tensor(order, dtype=torch.long, device=value.device))
        exact, first = len(params.always_sampled), params.samples[0]
        head = permuted[:, :exact + first].t().contiguous()
        if params.variance == "pooled":  # each class's mean squared weight over the sampled population
            squares = (permuted[:, exact:] ** 2).mean(1).contiguous()
        else:
            squares = (head[exact:] ** 2).contiguous()
        rest = permuted[:, exact + first:].contiguous()
        return (register_constant(gm, f"exfx_{prefix}_dominance_head", head),
                register_constant(gm, f"exfx_{prefix}_dominance_squares", squares),
                register_constant(gm, f"exfx_{prefix}_dominance_rest", rest))

    def _rewrite(self, gm: fx.GraphModule, linear: fx.Node, decision: HeadDecision) -> None:
        graph, head, params = gm.graph, decision.head, decision.params
        x, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        assert isinstance(x, fx.Node) and isinstance(weight, fx.Node)
        prefix = slug(head.name, "head")
        order = unit_order(head.n_units, params.always_sampled, head.blocks)
        exact = len(params.always_sampled)

        def make(op: str, target: Any, args: tuple[Any, ...], role: str) -> fx.Node:
            node = graph.create_node(op, target, args, name=f"{prefix}_{role}")
            set_rewrite_role(node, head.name, role)
            return node

        with graph.inserting_before(linear):
            names = self._split_weight(gm, params, weight, order, prefix)
            head_w, squares, rest = (make("get_attr", name, (), role) for name, role in
                                     zip(names, ("dominance_head", "dominance_squares", "dominance_rest")))
            if order != list(range(head.n_units)):
                index = torch.tensor(order, dtype=torch.long, device=getattr(*owner_of(gm, names[0])).device)
                order_node = make("get_attr", register_constant(gm, f"exfx_{prefix}_dominance_order", index), (),
                                  "dominance_order")
                x = make("call_function", torch.index_select, (x, -1, order_node), "dominance_input")
            pair = make("call_function", _OPS.dominance_linear.default,
                        (x, head_w, squares, rest, bias, list(params.samples), exact, params.alpha, head.name),
                        "dominance_linear")
            out = make("call_function", operator.getitem, (pair, 0), "dominance_logits")
        out.meta.update({k: v for k, v in linear.meta.items() if k == "tensor_meta"})
        linear.replace_all_uses_with(out)
        graph.erase_node(linear)
        logger.info("dominance prediction on head %s: %d classes from %d units, samples %s, alpha %g, %s "
                    "variance, %d always sampled", head.name, head.classes, head.n_units, params.samples,
                    params.alpha, params.variance, exact)
