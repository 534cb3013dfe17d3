"""Annotate: decide, once, what runs at every site, and write the decision on the site's node.

This is the one place where a site's fate is decided. For each analysed ReLU
(:class:`~exfx.meta.SiteMatch`) :func:`decide` resolves:

- the parameters: the plan's for the site, else the config's (the config's ``exact`` only where the analysis
  proves the exact rule may run);
- eligibility and its reason (structurally eligible, enabled, the schedule fits the fan-in);
- exact availability (the analysis's verdict, carried over);
- the lowering intent and its reason: the ENP reference ops, a native form (the lowering pass measures native
  against dense), or dense (no native kernel runs this site);
- the keep ratio calibration measured for the site (``Plan.keep``), or None when unknown.

:class:`AnnotatePass` writes each :class:`~exfx.meta.SiteDecision` under ``exfx_decision`` on the site's ReLU
node, and, when dominance prediction is asked for, a :class:`~exfx.meta.HeadDecision` on the head's linear node;
then :func:`validate` checks every record once. :class:`~exfx.passes.enp_pass.EnpPass`,
:class:`~exfx.passes.lower_pass.LowerPass`, :class:`~exfx.passes.dominance_pass.DominancePass`, ``explain()``
and the :class:`~exfx.report.Report` only read the records, in the way torchao's pt2e ``Quantizer.annotate``
writes one typed annotation that ``prepare`` and ``convert`` read.

Why it is safe: the pass changes no node, argument or weight; it only adds records. A plan that asks for what
cannot run (the exact rule on an input not proved non-negative, a schedule longer than the fan-in) is refused
here with a :class:`~exfx.errors.PlanError` naming the site, before any rewrite; a config that does the same
leaves the site dense, with the reason in the report.

Example::

    >>> decisions = decide_sites(analysis.sites, plan=None, config=exfx.Config(), lowering="native")
    >>> decisions["net.2"].lowering, decisions["net.2"].lowering_reason
    ('native', 'native enp_linear or dense, whichever measures faster at compile time')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.axes import AxisGroups
from exfx.analysis.heads import HeadMatch, match_head
from exfx.config import EXACT_RULE, Config, DominanceParams, Plan, SiteParams
from exfx.errors import ExfxError, PlanError, UnsupportedModelError
from exfx.meta import (HeadDecision, SiteDecision, SiteMatch, set_head_decision, set_site_decision, site_decision,
                       site_match)

logger = logging.getLogger(__name__)

__all__ = ["AnnotatePass", "decide", "decide_sites", "decide_head", "validate", "native_blocker", "check_lowering",
           "exact_refusal", "resolve_lowering", "LOWERINGS", "DEFAULT_LOWERING", "LOWERING_ENV", "EXACT_LOWERING_REASON", "NATIVE_INTENT_REASON"]

#: The values of ``compile(..., lowering=...)``.
LOWERINGS = ("reference", "native")
#: What ``exfx.compile``, ``Analysis.compile``, ``explain``, the backend and the CLI lower to by default: the
#: fastest correct form measured on this machine. FLOP studies and calibration ask for ``"reference"``.
DEFAULT_LOWERING = "native"
#: Overrides :data:`DEFAULT_LOWERING` where no ``lowering`` is given.
LOWERING_ENV = "EXFX_LOWERING"
#: Why a site under the exact rule keeps its reference ops in native mode.
EXACT_LOWERING_REASON = ("the exact rule has no native kernel yet: kept on the reference ops (masked dense "
                         "compute, slower than dense; its FLOPs are what the masks save)")
#: The intent of a site a native kernel can run: the lowering pass measures which form is faster.
NATIVE_INTENT_REASON = "native enp_linear or dense, whichever measures faster, per call (by rows)"


def check_lowering(lowering: str) -> None:
    """Raise ``ValueError`` unless ``lowering`` is one of :data:`LOWERINGS`."""
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")


def resolve_lowering(lowering: str | None) -> str:
    """``lowering`` if given, else ``$EXFX_LOWERING`` if set (e.g. ``reference`` for a FLOP study), else
    :data:`DEFAULT_LOWERING`; checked."""
    if lowering is None:
        lowering = os.environ.get(LOWERING_ENV, "") or DEFAULT_LOWERING
        if lowering not in LOWERINGS:
            raise ValueError(f"${LOWERING_ENV} must be one of {LOWERINGS}, got {lowering!r}")
    check_lowering(lowering)
    return lowering


def native_blocker(match: SiteMatch, params: SiteParams) -> str:
    """Why no native kernel can run this site under ``params`` (one line), or ``""`` when one can."""
    if match.kind != "linear":
        return f"{match.kind} sites have no native kernel yet"
    if match.left:
        return "GCN left-matmul sites have no native kernel yet"
    if len(params.samples) > 1:
        return (f"the native kernel tests once; this schedule has {len(params.samples)} checkpoints "
                f"{params.samples}")
    return ""


def exact_refusal(site: SiteMatch) -> str:
    """The PlanError message for a plan that asks for the exact rule where the analysis refused it."""
    return (f"site {site.name!r}: the plan asks for the exact rule, but {site.exact_reason or 'it is unavailable'}; "
            f"the exact rule needs a provably non-negative input (a ReLU, or a pool of one). Set exact=false (and "
            f"a statistical rule) for this site, or disable it")


def _resolved_params(match: SiteMatch, given: SiteParams | None, config: Config) -> SiteParams:
    """The plan's parameters for a structurally eligible site (refused when they cannot run), else the config's."""
    if given is None:
        return config.site_params if match.exact_available else config.site_params.without_exact()
    fan_in = match.fan_in or 0
    if given.enabled and given.exact and not match.exact_available:
        raise PlanError(exact_refusal(match))
    if given.enabled and given.checkpoints[-1] > fan_in:
        raise PlanError(f"plan site {match.name!r}: samples {given.checkpoints} exceed its fan-in {fan_in}; "
                        f"use at most {fan_in} samples or set enabled=false")
    return given


def _eligibility(match: SiteMatch, params: SiteParams) -> tuple[bool, str]:
    if not params.enabled and params.rule == EXACT_RULE and not match.exact_available:
        return False, f"rule 'exact' is unavailable here: {match.exact_reason}"
    if not params.enabled:
        return False, "disabled by the plan"
    if (match.fan_in or 0) < params.checkpoints[-1]:
        return False, f"fan-in {match.fan_in} < samples {params.checkpoints[-1]}"
    return True, ""


def _lowering_intent(match: SiteMatch, params: SiteParams, lowering: str) -> tuple[str, str]:
    if lowering == "reference":
        return "reference", ""
    if params.exact:
        return "reference", EXACT_LOWERING_REASON
    blocker = native_blocker(match, params)
    return ("dense", blocker) if blocker else ("native", NATIVE_INTENT_REASON)


def decide(match: SiteMatch, given: SiteParams | None, config: Config, lowering: str,
           keep: float | None = None) -> SiteDecision:
    """The decision for one analysed ReLU: ``given`` are the plan's parameters for it (None: the config's).

    Raises:
        exfx.PlanError: ``given`` asks for what cannot run here (the message names the site and what to do).
    """
    record = SiteDecision(site=match.name, reason=match.reason, exact_available=match.exact_available,
                          exact_reason=match.exact_reason)
    if not match.eligible:
        return record
    params = _resolved_params(match, given, config)
    eligible, reason = _eligibility(match, params)
    if not eligible:
        return replace(record, params=params, reason=reason)
    form, why = _lowering_intent(match, params, lowering)
    return replace(record, params=params, eligible=True, reason="", lowering=form, lowering_reason=why, keep=keep)


def decide_sites(sites: Sequence[SiteMatch], plan: Plan | None, config: Config,
                 lowering: str | None = None) -> dict[str, SiteDecision]:
    """Every site's decision, by name, for ``plan`` over ``config`` (see :func:`decide`).

    Raises:
        exfx.PlanMismatchError: ``plan`` was made for another model.
        exfx.PlanError: ``plan`` asks for what cannot run at one of its sites.
    """
    lowering = resolve_lowering(lowering)
    if plan is not None:
        plan.check_against({s.name: s.signature for s in sites if s.eligible})
    chosen = plan.sites if plan is not None else {}
    keep = plan.keep if plan is not None else {}
    return {s.name: decide(s, chosen.get(s.name), config, lowering, keep.get(s.name)) for s in sites}


def _check_head_params(head: HeadMatch, params: DominanceParams) -> None:
    """Raise, naming the field, when the dominance parameters do not fit the head."""
    outside = [u for u in params.always_sampled if u >= head.n_units]
    if outside:
        raise PlanError(f"dominance.always_sampled names units {outside} but head {head.name!r} has "
                        f"{head.n_units} input units (0..{head.n_units - 1})")
    population = head.n_units - len(params.always_sampled)
    if params.samples[-1] > population:
        raise PlanError(f"dominance.samples {params.samples} exceed the {population} units head {head.name!r} can "
                        f"sample ({head.n_units} inputs, {len(params.always_sampled)} always sampled); use at most "
                        f"{population}")


def decide_head(gm: fx.GraphModule, params: DominanceParams, groups: AxisGroups) -> HeadDecision:
    """The dominance decision for ``gm``'s prediction head.

    Raises:
        exfx.UnsupportedModelError: the model has no head dominance prediction may rewrite (the message says why).
        exfx.PlanError: the parameters do not fit the head (the message names the field).
    """
    if not isinstance(params, DominanceParams):
        raise TypeError(f"dominance must be an exfx.DominanceParams, got {type(params).__name__}")
    head = match_head(gm, groups)
    if not head.eligible:
        raise UnsupportedModelError(f"dominance prediction: head {head.name!r} cannot be rewritten: {head.reason}")
    _check_head_params(head, params)
    return HeadDecision(head, params)


def validate(gm: fx.GraphModule) -> None:
    """Check every decision on ``gm`` once: each sits on its site's ReLU, and asks only for what can run there.

    Raises:
        exfx.ExfxError: a record contradicts its site's analysis (a bug in whatever wrote it).
    """
    for node in gm.graph.nodes:
        record, match = site_decision(node), site_match(node)
        if record is None:
            continue
        problem = _contradiction(record, match)
        if problem:
            raise ExfxError(f"site {record.site!r} (node {node.name}): its decision {problem}; decisions are "
                            f"written by exfx.passes.annotate_pass.AnnotatePass only")


def _contradiction(record: SiteDecision, match: SiteMatch | None) -> str:
    if match is None or match.name != record.site:
        return "is not on the ReLU of that site"
    if record.eligible and not match.eligible:
        return f"is eligible, but the analysis refused the site: {match.reason}"
    params = record.params
    if not record.eligible or params is None:
        return ""
    if params.checkpoints[-1] > (match.fan_in or 0):
        return f"samples {params.checkpoints} exceed the fan-in {match.fan_in}"
    if params.exact and not match.exact_available:
        return "asks for the exact rule where it is unavailable"
    blocker = native_blocker(match, params) if record.lowering == "native" else ""
    if blocker:
        return f"asks for a native form, but {blocker}"
    return ""


class AnnotatePass(PassBase):
    """Write each site's :class:`~exfx.meta.SiteDecision` (and the head's, for dominance prediction).

    Args:
        decisions: site name -> decision, from :func:`decide_sites`.
        head: the dominance decision, from :func:`decide_head`, or None.
    """

    def __init__(self, decisions: Mapping[str, SiteDecision], head: HeadDecision | None = None) -> None:
        super().__init__()
        self.decisions = dict(decisions)
        self.head = head

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        written = set()
        for node in graph_module.graph.nodes:
            match = site_match(node)
            if match is not None and match.name in self.decisions:
                set_site_decision(node, self.decisions[match.name])
                written.add(match.name)
            if self.head is not None and node.name == self.head.head.linear:
                set_head_decision(node, self.head)
        missing = sorted(set(self.decisions) - written)
        if missing:
            raise PlanError(f"annotate: no analysed site named {missing}; run the exchangeability analysis on this "
                            f"graph first (exfx.analyse), and name sites as its report does")
        return PassResult(graph_module, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        validate(graph_module)
