"""The analysis stage: the axis graph and its exchangeable groups (:mod:`.axes`), and ReLU site verdicts
(:mod:`.sites`)."""

from exfx.analysis.axes import AxisGraph, AxisGroups, Layout, axis_rule, build_axis_graph, exchangeable_groups
from exfx.analysis.sites import match_site

__all__ = ["AxisGraph", "AxisGroups", "Layout", "axis_rule", "build_axis_graph", "exchangeable_groups", "match_site"]
