"""Exchangeability analysis: label exchangeable groups and give every ReLU a typed verdict.

An analysis pass; it changes no node and no weight. It builds the axis graph of
:mod:`exfx.analysis.axes` (which axes must be permuted together), names its
exchangeable groups, and matches every canonical ReLU-family activation (``torch.relu``
and the capped ReLU ``torch.clamp(x, 0.0, t)`` of ReLU6) against the site pattern of
:mod:`exfx.analysis.sites`. Every other activation (GELU, SiLU, sigmoid, ...) gets a
record too, never eligible, saying it is not a site, and so does a ReLU hidden in a
fused transformer op or an opaque ``torch.nn`` transformer module
(:mod:`exfx.analysis.hidden`), whose reason says how to capture it.

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
from collections.abc import Collection

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.axes import AxisGroups, build_axis_graph, exchangeable_groups
from exfx.analysis.hidden import hidden_relu_site
from exfx.analysis.shapes import rank_of
from exfx.analysis.sites import match_site
from exfx.meta import SiteMatch, relu_source, set_axis_groups, set_site_match
from exfx.analysis.opsets import activation_name, is_capped_relu, is_site_activation

logger = logging.getLogger(__name__)

__all__ = ["ExchangeabilityPass"]


class ExchangeabilityPass(PassBase):
    """Label exchangeable groups and give every ReLU a verdict.

    Args:
        hidden_inputs: names of graph inputs that carry hidden activations
            (a backbone's features, or a value live across a graph break); their
            axes are not pinned as model inputs.

    After ``call``, ``self.sites`` holds one :class:`~exfx.meta.SiteMatch` per activation
    in graph order (also stored on the activation nodes; :attr:`~exfx.meta.SiteMatch.relu_family`
    tells the ReLU family's from the others') and ``self.groups`` the
    :class:`~exfx.analysis.axes.AxisGroups`.
    """

    def __init__(self, hidden_inputs: Collection[str] = ()) -> None:
        super().__init__()
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
        records: list[tuple[fx.Node, SiteMatch]] = []
        used: dict[str, int] = {}
        others: list[tuple[fx.Node, str]] = []
        for node in graph_module.graph.nodes:
            hidden = hidden_relu_site(graph_module, node)  # a fused layer or an opaque module: reported, not a site
            if hidden is not None:
                records.append((node, _unique(hidden, used)))
                continue
            if not is_site_activation(node):
                activation = activation_name(node)
                if activation is not None:
                    others.append((node, activation))
                continue
            site = match_site(node, axes, self.groups)
            if is_capped_relu(node):
                site = dataclasses.replace(site, activation="clamp")
            records.append((node, _unique(site, used)))
        # Named after the ReLU family's records, so adding them never renames a site.
        records += [(node, _unique(_not_a_site(node, activation), used)) for node, activation in others]
        order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
        records.sort(key=lambda record: order[record[0]])
        for node, site in records:
            set_site_match(node, site)
        self.sites = [site for _, site in records]
        logger.debug("exchangeability: %d groups, %d ReLU-family activations, %d structurally eligible, "
                     "%d other activations", len(self.groups.groups), len(records) - len(others),
                     sum(s.eligible for s in self.sites), len(others))
        return PassResult(graph_module, False)


def _unique(site: SiteMatch, used: dict[str, int]) -> SiteMatch:
    """``site``, renamed ``name#2``, ``name#3``, ... when its name was seen before (a shared module)."""
    count = used.get(site.name, 0)
    used[site.name] = count + 1
    return dataclasses.replace(site, name=f"{site.name}#{count + 1}") if count else site


def _not_a_site(node: fx.Node, activation: str) -> SiteMatch:
    """The record of an activation that is never a site: it is not 0 on the whole half-line ``x <= 0``, so a
    neuron predicted negative cannot be skipped exactly."""
    return SiteMatch(name=relu_source(node) if node.op != "call_module" else str(node.target), relu=node.name,
                     reason=f"not a site: activation `{activation}` is not zero on a half-line",
                     activation=activation)
