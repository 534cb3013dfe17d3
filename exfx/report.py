"""The ``explain()`` report: every ReLU, its site name, group, verdict, reason and parameters.

ReLU6, ``hardtanh(0, t)`` and ``clamp(min=0)`` count as ReLUs (the ReLU family). Every
other activation (GELU, SiLU, sigmoid, ...) has a row too, never eligible, whose
reason says it is not a site (:attr:`SiteInfo.relu_family` is False).

``str(report)`` is a table for people; ``report.to_dict()`` is JSON-ready for machines.

Example::

    >>> report = exfx.explain(model, (x,))
    >>> [(s.name, s.eligible, s.reason) for s in report.sites]
    [('net.0', False, 'contraction axis is a model input (`x`)'), ('net.2', True, '')]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch.fx as fx

from exfx.config import EXACT_RULE, SiteParams, fingerprint
from exfx.meta import RELU_FAMILY, SiteDecision, SiteMatch, lowering

logger = logging.getLogger(__name__)

__all__ = ["SiteInfo", "Report", "find_site", "lowering_rows", "lowering_summary", "reason_lines"]


@dataclass(frozen=True)
class SiteInfo:
    """One ReLU and what exfx decided about it: a row of the report.

    A view of two records: the analysis's (:class:`~exfx.meta.SiteMatch`) and the
    decision the annotate step made for the site (:class:`~exfx.meta.SiteDecision`).

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
        signature: the shape signature a plan is checked against.
        params: the site's parameters when structurally eligible.
        relu_node: the name of the ReLU node in the analysed graph.
        structurally_eligible: eligible whatever the parameters (fan-in and
            disabling aside).
        lowering: with ``lowering="native"``, the form the site runs as
            (``native``, ``dense``, ``reference``; before compiling, the intent:
            ``native`` means native or dense, whichever measures faster); empty otherwise.
        lowering_reason: why that form (one line), empty when ``lowering`` is.
        exact_available: the lossless ``exact`` rule may run here (the input is
            provably non-negative); False at a site that is not structurally eligible.
        exact_reason: why ``exact`` is unavailable at a structurally eligible
            site (one line), else empty.
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
    lowering: str = ""
    lowering_reason: str = ""
    exact_available: bool = False
    exact_reason: str = ""
    activation: str = "relu"

    @property
    def relu_family(self) -> bool:
        """A ReLU-family activation (``relu``, or ``clamp`` for ReLU6 and its kin), not another activation's
        record (``gelu``, ``sigmoid``, ...), which is never a site."""
        return self.activation in RELU_FAMILY

    @classmethod
    def from_decision(cls, match: SiteMatch, decision: SiteDecision) -> SiteInfo:
        """The row for one analysed ReLU: the analysis's record and the annotate step's decision, read as is."""
        return cls(name=match.name, eligible=decision.eligible, reason=decision.reason, group=match.group,
                   fan_in=match.fan_in, samples=decision.params.samples if decision.eligible and decision.params
                   else (), kind=match.kind, signature=match.signature, params=decision.params,
                   relu_node=match.relu, structurally_eligible=match.eligible,
                   lowering=decision.lowering if decision.lowering != "reference" or decision.lowering_reason
                   else "", lowering_reason=decision.lowering_reason, exact_available=decision.exact_available,
                   exact_reason=decision.exact_reason, activation=match.activation)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eligible": self.eligible, "reason": self.reason, "group": self.group,
                "fan_in": self.fan_in, "samples": list(self.samples), "kind": self.kind,
                "signature": self.signature, "relu": self.relu_node,
                "params": self.params.to_dict() if self.params else None,
                "exact_available": self.exact_available, "exact_reason": self.exact_reason,
                "activation": self.activation,
                **({"lowering": self.lowering, "lowering_reason": self.lowering_reason} if self.lowering else {})}


def lowering_rows(graph: fx.Graph) -> dict[str, tuple[str, str]]:
    """What the lowering recorded on ``graph``: site -> ``(form, reason)``, each consumer's choice appended to its
    input site's reason."""
    sites: dict[str, list[str]] = {}
    consumers: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        record = lowering(node)
        if record is None:
            continue
        if record.input_site:
            consumers.setdefault(record.site, (record.input_site, record.describe()))
        else:
            sites.setdefault(record.site, [record.form, record.reason])
    for name, (site, text) in consumers.items():
        if site in sites:
            sites[site][1] += f"; consumer {name}: {text}"
    return {name: (form, reason) for name, (form, reason) in sites.items()}


def lowering_summary(report: Report) -> str:
    """One line on what runs at the sites of a compiled model: ``native: 2 of 3 sites lowered; 1 runs dense
    (conv2d sites have no native kernel yet)``."""
    eligible = report.eligible
    if not eligible:
        return "native: no ENP site; the model runs as it was"
    native = [s for s in eligible if s.lowering == "native"]
    others: dict[str, list[str]] = {}
    for s in eligible:
        if s.lowering != "native":
            form = s.lowering or "reference"
            others.setdefault(form, []).append(s.name)
    parts = [f"native: {len(native)} of {len(eligible)} sites lowered"]
    for form, names in others.items():
        reasons = sorted({_first_clause(s.lowering_reason) for s in eligible if s.name in names and s.lowering_reason})
        because = f" ({'; '.join(reasons)})" if reasons else ""
        verb = "runs" if len(names) == 1 else "run"
        parts.append(f"{len(names)} {verb} {'on the reference ops' if form == 'reference' else form}{because}")
    return "; ".join(parts)


def reason_lines(reasons: Iterable[tuple[str, str]], limit: int = 12) -> str:
    """``name: reason`` pairs as indented lines, for a warning that says why nothing was done; beyond
    ``limit`` pairs, a last line counts the rest."""
    reasons = list(reasons)
    lines = [f"  {name}: {reason}" for name, reason in reasons[:limit]]
    if len(reasons) > limit:
        lines.append(f"  ... and {len(reasons) - limit} more")
    return "\n".join(lines)


def _first_clause(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0]


_Named = TypeVar("_Named", SiteInfo, SiteMatch)


def find_site(sites: Iterable[_Named], name: str) -> _Named:
    """The site called ``name``; a KeyError that lists the site names if there is none."""
    sites = list(sites)
    for site in sites:
        if site.name == name:
            return site
    raise KeyError(f"no site named {name!r}; sites are {[s.name for s in sites]}")


def _describe(params: SiteParams | None) -> str:
    if params is None:
        return "-"
    extra = f" (at {','.join(map(str, params.exact_checkpoints))})" if params.exact_samples else ""
    if params.rule == EXACT_RULE:
        return "exact" + extra
    text = f"threshold T={params.threshold:g}" if params.rule == "threshold" else f"ztest alpha={params.alpha:g}"
    return text + " + exact" + extra if params.exact else text


def _exact_cell(site: SiteInfo) -> tuple[str, str]:
    """The report's ``exact`` column (``yes``: the lossless rule may run here) and a note for the reason column."""
    if not site.structurally_eligible:
        return "-", ""
    if site.exact_available:
        return "yes", ""
    return "no", f"exact unavailable: {site.exact_reason}"


@dataclass(frozen=True)
class Report:
    """What exfx found (and, after ``compile``, did) at every ReLU of a model: a view of the analysis."""

    sites: list[SiteInfo]
    groups: dict[str, list[str]] = field(default_factory=dict)
    model: str = ""

    @property
    def eligible(self) -> list[SiteInfo]:
        return [s for s in self.sites if s.eligible]

    def site(self, name: str) -> SiteInfo:
        return find_site(self.sites, name)

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

    def with_lowering(self, choices: Mapping[str, tuple[str, str]]) -> Report:
        """A copy whose rows named in ``choices`` (site -> ``(form, reason)``) record how they were lowered."""
        sites = [replace(s, lowering=choices[s.name][0], lowering_reason=choices[s.name][1])
                 if s.name in choices else s for s in self.sites]
        return replace(self, sites=sites)

    def __str__(self) -> str:
        lowered = any(s.lowering not in ("", "reference") for s in self.sites)
        header = ("site", "kind", "group", "fan-in", "samples", "rule", "exact", "eligible", "reason")
        header = header[:-1] + ("lowering",) + header[-1:] if lowered else header
        rows = [header]
        for s in self.sites:
            exact, note = _exact_cell(s)
            row = (s.name, s.kind, s.group or "-", str(s.fan_in) if s.fan_in is not None else "-",
                   ",".join(map(str, s.samples)) if s.eligible else "-", _describe(s.params), exact,
                   "yes" if s.eligible else "no", "; ".join(r for r in (s.reason, note) if r))
            if lowered:
                reason = "; ".join(r for r in (s.reason, note, s.lowering_reason) if r)
                row = row[:-1] + (s.lowering or "-", reason)
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = []
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        return self._summary() + "\n" + "\n".join(line.rstrip() for line in lines)

    def _summary(self) -> str:
        """``3 of 4 ReLUs are ENP sites``, and how many other activations are not sites."""
        prefix = f"{self.model + ': ' if self.model else ''}"
        family = [s for s in self.sites if s.relu_family]
        others = list(dict.fromkeys(s.activation for s in self.sites if not s.relu_family))
        count = len(self.sites) - len(family)
        other_text = (f"{count} other activation{'s are' if count > 1 else ' is'} not a site "
                      f"({', '.join(others)})")
        if not self.sites:
            return f"{prefix}no ReLU-family activation found: nothing to rewrite"
        if not family:
            return f"{prefix}no ReLU-family activation: nothing to rewrite; {other_text}"
        summary = f"{prefix}{len(self.eligible)} of {len(family)} ReLUs are ENP sites"
        return f"{summary}; {other_text}" if count else summary
