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
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.config import SiteParams
from exfx.errors import PlanError
from exfx.meta import SiteMatch, set_rewrite_role, site_match

logger = logging.getLogger(__name__)

__all__ = ["EnpPass"]

_OPS = torch.ops.exfx


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "site"


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
        if params.samples[-1] > (site.fan_in or 0):
            raise PlanError(f"site {site.name!r}: samples {params.samples} exceed its fan-in {site.fan_in}")

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
            residual = None
            if site.left:
                left = nodes[site.left]
                x = make(torch.matmul, (left, x), "left_matmul")
                if bias is not None:
                    # A @ (x W + 1 b) = (A @ x) W + (A @ 1) b: the bias becomes a per-row shift.
                    rows = make(torch.sum, (left, -1, True), "left_row_sum")
                    residual = make(torch.mul, (rows, bias), "left_bias")
                    bias = None
            for shift in site.shifts:
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
        logger.debug("rewrote site %s (%s, samples %s)", site.name, params.rule, params.samples)
