"""The ``explain()`` report: every ReLU, its site name, group, verdict, reason and parameters.

``str(report)`` is a table for people; ``report.to_dict()`` is JSON-ready for machines.

Example::

    >>> report = exfx.explain(model, (x,))
    >>> [(s.name, s.eligible, s.reason) for s in report.sites]
    [('net.0', False, 'contraction axis is a model input (`x`)'), ('net.2', True, '')]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from exfx.config import SiteParams, fingerprint

logger = logging.getLogger(__name__)

__all__ = ["SiteInfo", "Report"]


@dataclass
class SiteInfo:
    """One ReLU and what exfx decided about it.

    Attributes:
        name: dotted name of the module or parameter producing the summed
            pre-activation (``layer1.0.conv1``, ``w1``); for a ReLU with no
            producer, the ReLU's own module path or node name.
        eligible: whether ENP nodes were (or would be) inserted.
        reason: one line saying why not, empty when eligible.
        group: the exchangeable group of the contraction axis (``"g3"``), or None.
        fan_in: units summed per output neuron (input features, input channels
            per group, or channels of a flattened conv output).
        samples: the early-exit checkpoints, in units.
        kind: ``linear``, ``conv1d``, ``conv2d`` or ``-``.
        params: the site's parameters when eligible.
    """

    name: str
    eligible: bool
    reason: str
    group: str | None = None
    fan_in: int | None = None
    samples: tuple[int, ...] = ()
    kind: str = "-"
    signature: str = ""
    params: SiteParams | None = None
    relu_node: str = ""
    structurally_eligible: bool = False
    # Rewrite details (not part of the public report).
    n_units: int = 0
    producer_node: str = ""
    input_node: str = ""
    left_node: str = ""
    shift_nodes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eligible": self.eligible, "reason": self.reason, "group": self.group,
                "fan_in": self.fan_in, "samples": list(self.samples), "kind": self.kind,
                "signature": self.signature, "relu": self.relu_node,
                "params": self.params.to_dict() if self.params else None}


def _describe(params: SiteParams | None) -> str:
    if params is None:
        return "-"
    if params.rule == "threshold":
        return f"threshold T={params.threshold:g}"
    return f"ztest alpha={params.alpha:g}"


@dataclass
class Report:
    """What exfx found (and, after ``compile``, did) at every ReLU of a model."""

    sites: list[SiteInfo]
    groups: dict[str, list[str]] = field(default_factory=dict)
    model: str = ""

    @property
    def eligible(self) -> list[SiteInfo]:
        return [s for s in self.sites if s.eligible]

    def site(self, name: str) -> SiteInfo:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no site named {name!r}; sites are {[s.name for s in self.sites]}")

    @property
    def signatures(self) -> dict[str, str]:
        """Shape signatures of the structurally eligible sites (what a plan is checked against)."""
        return {s.name: s.signature for s in self.sites if s.structurally_eligible}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signatures)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "fingerprint": self.fingerprint,
                "sites": [s.to_dict() for s in self.sites], "groups": {k: list(v) for k, v in self.groups.items()}}

    def __str__(self) -> str:
        header = ("site", "kind", "group", "fan-in", "samples", "rule", "eligible", "reason")
        rows = [header]
        for s in self.sites:
            rows.append((s.name, s.kind, s.group or "-", str(s.fan_in) if s.fan_in is not None else "-",
                         ",".join(map(str, s.samples)) if s.eligible else "-", _describe(s.params),
                         "yes" if s.eligible else "no", s.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = []
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        n = len(self.eligible)
        summary = f"{self.model + ': ' if self.model else ''}{n} of {len(self.sites)} ReLUs are ENP sites"
        if not self.sites:
            summary = f"{self.model + ': ' if self.model else ''}no ReLU found: nothing to rewrite"
        return summary + "\n" + "\n".join(line.rstrip() for line in lines)
