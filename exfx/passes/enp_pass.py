"""ENP rewrite: insert partial-sum, early-exit and completion nodes before each eligible ReLU.

For a site ``relu([A @] producer(x, W, b) + r1 + r2 ...)`` with schedule
``(k1, k2, ...)`` the pass emits::

    x_in   = A @ x                                   # GCN form only: (A @ x) @ W == A @ (x @ W)
    shift  = rowsum(A) * b                           # GCN form with a bias: A @ (x W + b)
    res    = r1 + r2 + ...                           # residuals, joined into one shift
    s1     = exfx.partial_sum(x_in, W, None, None, 0, k1, ...)
    keep1  = exfx.early_exit(s1, W, b, res, None, k1, n, rule, param)
    s2     = exfx.partial_sum(x_in, W, s1, keep1, k1, k2, ...)
    keep2  = exfx.early_exit(s2, W, b, res, keep1, k2, n, rule, param)
    pre    = exfx.complete(x_in, W, s2, b, res, keep2, k2, ...)
    out    = relu(pre)

and drops the original chain. New nodes are named after the site
(``layer1_0_conv1_partial_sum_1``) so graphs are stable across runs.

Why it is safe: ``complete`` returns ``partial + rest + b + res`` for every kept
neuron, which is the original pre-activation reassociated; a pruned neuron's
pre-activation is 0, so it is exactly 0 after the ReLU, which is where a
correctly predicted negative neuron would have been anyway. The GCN form
reassociates ``A @ (x @ W)`` into ``(A @ x) @ W``, exact up to rounding.
``graph.lint()`` runs after the rewrite.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.report import SiteInfo

logger = logging.getLogger(__name__)

__all__ = ["EnpPass"]

_OPS = torch.ops.exfx


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "site"


class EnpPass(PassBase):
    """Rewrite every eligible site of ``sites`` (see module docstring)."""

    def __init__(self, sites: list[SiteInfo]) -> None:
        super().__init__()
        self.sites = [s for s in sites if s.eligible and s.params is not None]

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if not self.sites:
            return PassResult(graph_module, False)
        nodes = {n.name: n for n in graph_module.graph.nodes}
        for site in self.sites:
            self._rewrite(graph_module.graph, site, nodes)
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    def _rewrite(self, graph: fx.Graph, site: SiteInfo, nodes: dict[str, fx.Node]) -> None:
        relu, producer = nodes[site.relu_node], nodes[site.producer_node]
        assert site.params is not None
        params, slug = site.params, _slug(site.name)
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
            node.meta["exfx"] = {"site": site.name, "role": role}
            return node

        with graph.inserting_before(relu):
            residual = None
            if site.left_node:
                left = nodes[site.left_node]
                x = make(torch.matmul, (left, x), "left_matmul")
                if bias is not None:
                    # A @ (x W + 1 b) = (A @ x) W + (A @ 1) b: the bias becomes a per-row shift.
                    rows = make(torch.sum, (left, -1, True), "left_row_sum")
                    residual = make(torch.mul, (rows, bias), "left_bias")
                    bias = None
            for shift in site.shift_nodes:
                residual = nodes[shift] if residual is None else make(
                    torch.add, (residual, nodes[shift]), "residual")
            state, active, done = None, None, 0
            moments = params.rule == "ztest"
            for step, k in enumerate(params.samples, start=1):
                state = make(_OPS.partial_sum.default,
                             (x, weight, state, active, done, k, site.n_units, conv["stride"], conv["padding"],
                              conv["dilation"], conv["groups"], moments, site.name), f"partial_sum_{step}")
                active = make(_OPS.early_exit.default,
                              (state, weight, bias, residual, active, k, site.fan_in, params.rule, params.param,
                               site.name), f"early_exit_{step}")
                done = k
            pre = make(_OPS.complete.default,
                       (x, weight, state, bias, residual, active, done, site.n_units, conv["stride"],
                        conv["padding"], conv["dilation"], conv["groups"], site.name), "complete")
        relu.args = (pre,)
        relu.meta.setdefault("exfx", {})["site"] = site.name
        logger.debug("rewrote site %s (%s, samples %s)", site.name, params.rule, params.samples)
