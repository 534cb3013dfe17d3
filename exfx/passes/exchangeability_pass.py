"""Exchangeability analysis: label exchangeable groups and give every ReLU a typed verdict.

An analysis pass; it changes no node and no weight. It builds the axis graph of
:mod:`exfx.analysis.axes` (which axes must be permuted together), names its
exchangeable groups, and matches every canonical ReLU against the site pattern of
:mod:`exfx.analysis.sites`.

What it writes (accessors in :mod:`exfx.meta`):

- on every tensor node, the group of each axis (:func:`exfx.meta.axis_groups`);
- on every ReLU, one frozen :class:`~exfx.meta.SiteMatch`
  (:func:`exfx.meta.site_match`): the site name, the verdict and reason, the fan-in
  and signature, and the nodes the rewrite needs.

Why it is safe: it only reads the graph; a later rewrite acts only where the
record says the contraction axis is exchangeable, which is what makes a prefix of
its units a fair sample (ExPrune, arXiv 2506.02210).

Example::

    >>> analysis = ExchangeabilityPass()
    >>> analysis(gm)                    # gm: a 784-512-256-10 MLP, canonical, BN-folded, shape-propagated
    >>> [(s.name, s.eligible, s.reason) for s in analysis.sites]
    [('0', False, 'contraction axis is a model input (`input_1`)'), ('2', True, '')]
    >>> exfx.meta.site_match(gm.graph.find_nodes(op="call_function", target=torch.relu)[1]).fan_in
    512
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Collection

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.axes import AxisGroups, build_axis_graph, exchangeable_groups
from exfx.analysis.shapes import rank_of
from exfx.analysis.sites import match_site
from exfx.meta import SiteMatch, set_axis_groups, set_site_match
from exfx.analysis.opsets import is_relu

logger = logging.getLogger(__name__)

__all__ = ["ExchangeabilityPass"]


class ExchangeabilityPass(PassBase):
    """Label exchangeable groups and give every ReLU a verdict.

    Args:
        hidden_inputs: names of graph inputs that carry hidden activations
            (a backbone's features, or a value live across a graph break); their
            axes are not pinned as model inputs.

    After ``call``, ``self.sites`` holds one :class:`~exfx.meta.SiteMatch` per ReLU
    in graph order (also stored on the ReLU nodes) and ``self.groups`` the
    :class:`~exfx.analysis.axes.AxisGroups`.
    """

    def __init__(self, hidden_inputs: Collection[str] = (), samples: int | None = None) -> None:
        super().__init__()
        if samples is not None:
            warnings.warn("ExchangeabilityPass(samples=...) is deprecated and ignored: whether a site's fan-in fits "
                          "its schedule is decided per plan, by exfx.Analysis.explain / compile", DeprecationWarning,
                          stacklevel=2)
        self.hidden_inputs = frozenset(hidden_inputs)
        self.sites: list[SiteMatch] = []
        self.groups = AxisGroups({}, {}, {})

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        axes = build_axis_graph(graph_module, self.hidden_inputs)
        self.groups = exchangeable_groups(graph_module, axes)
        for node in graph_module.graph.nodes:
            node_rank = rank_of(node)
            if node_rank is not None:
                set_axis_groups(node, [self.groups.group_of.get((node.name, a)) for a in range(node_rank)])
        self.sites = []
        used: dict[str, int] = {}
        for node in graph_module.graph.nodes:
            if not is_relu(node):
                continue
            site = match_site(node, axes, self.groups)
            count = used.get(site.name, 0)
            used[site.name] = count + 1
            if count:  # a producer name seen before (a shared module): keep site names unique
                site = dataclasses.replace(site, name=f"{site.name}#{count + 1}")
            set_site_match(node, site)
            self.sites.append(site)
        logger.debug("exchangeability: %d groups, %d ReLUs, %d structurally eligible", len(self.groups.groups),
                     len(self.sites), sum(s.eligible for s in self.sites))
        return PassResult(graph_module, False)
