"""The analysis stage: the axis graph and its exchangeable groups (:mod:`.axes`, with the per-op rules in
:mod:`.axis_rules`), and ReLU site verdicts (:mod:`.sites`, with message passing in :mod:`.message_passing`)."""

from exfx.analysis.axes import AxisGraph, AxisGroups, Layout, axis_rule, build_axis_graph, exchangeable_groups
from exfx.analysis import axis_rules  # noqa: F401  (registers the per-op axis rules; axes.py cannot import it)
from exfx.analysis.sites import match_site

__all__ = ["AxisGraph", "AxisGroups", "Layout", "axis_rule", "build_axis_graph", "exchangeable_groups", "match_site"]
