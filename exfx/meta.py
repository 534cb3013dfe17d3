"""Every key exfx writes into ``node.meta`` / ``GraphModule.meta``, the typed records stored under them, and accessors.

Passes talk to each other through the graph: the analysis writes one frozen
:class:`SiteMatch` per ReLU (ReLU6 included; other activations get a never-eligible
record) under :data:`SITE_KEY`. The annotate step (:mod:`exfx.passes.annotate_pass`)
then writes one :class:`SiteDecision` per site under :data:`DECISION_KEY`, and one
:class:`HeadDecision` on a head to rewrite for dominance prediction: what runs there
and why, decided once. The rewrites (ENP, lowering, dominance) and the report only
read those records, so a rewrite of a copy of the analysed graph does exactly what
was decided. The stages' inputs that are not per node (the example inputs the
lowering times on, its timing model) are the passes' constructor arguments; the
lowering's outcome is written back as :class:`Lowering` records.

Keys (all prefixed ``exfx_`` so they never collide with torch's own meta):

==========================  ==============  ====================================================
key                         where           value
==========================  ==============  ====================================================
``exfx_name``               producer node   dotted name of the module / parameter (the site name)
``exfx_relu_source``        ReLU node       name of the node the ReLU was canonicalized from
``exfx_groups``             any tensor node exchangeable group per axis (``"g3"`` or None)
``exfx_site``               ReLU node       :class:`SiteMatch` (analysis verdict)
``exfx_decision``           ReLU node       :class:`SiteDecision` (what runs at the site, and why)
``exfx_head``               head linear     :class:`HeadDecision` (dominance prediction asked for, and its head)
``exfx_role``               rewritten nodes :class:`RewriteRole` (site and role of an ``exfx::`` node)
``exfx_lowering``           lowered nodes   :class:`Lowering` (form a site or consumer was lowered to, and why)
``exfx_report``             GraphModule     :class:`exfx.report.Report` of a compiled module
``exfx_input_sizes``        GraphModule     per input, the sizes Dynamo specialised (or None)
``exfx_inputs``             GraphModule     the compiled module's input specs
``exfx_shape_guards``       GraphModule     :class:`~exfx.capture.shapes.ShapeGuards` of a Dynamo capture
``exfx_recapture``          GraphModule     how a compiled module captures its model again at new sizes
==========================  ==============  ====================================================

Example::

    >>> analysis = exfx.analyse(mlp_784_512_256_10, (torch.randn(8, 784),))
    >>> [site_match(n).name for n in analysis.graph_module.graph.nodes if site_match(n)]
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import torch.fx as fx

from exfx.config import DominanceParams, SiteParams

__all__ = [
    "NAME_KEY", "RELU_SOURCE_KEY", "GROUPS_KEY", "SITE_KEY", "ROLE_KEY", "REPORT_KEY", "INPUT_SIZES_KEY",
    "INPUT_SPECS_KEY", "SHAPE_GUARDS_KEY", "RECAPTURE_KEY", "LOWERING_KEY", "DECISION_KEY", "HEAD_KEY", "RELU_FAMILY",
    "SiteMatch", "RewriteRole", "Lowering", "LOWERING_FORMS", "SiteDecision", "HeadDecision", "HeadMatch",
    "LOWERING_INTENTS",
    "site_decision", "set_site_decision", "head_decision", "set_head_decision",
    "producer_name", "set_producer_name", "relu_source", "set_relu_source", "axis_groups", "set_axis_groups",
    "site_match", "set_site_match", "rewrite_role", "set_rewrite_role", "site_of", "lowering", "set_lowering",
]

NAME_KEY = "exfx_name"
RELU_SOURCE_KEY = "exfx_relu_source"
GROUPS_KEY = "exfx_groups"
SITE_KEY = "exfx_site"
ROLE_KEY = "exfx_role"
REPORT_KEY = "exfx_report"
INPUT_SIZES_KEY = "exfx_input_sizes"
INPUT_SPECS_KEY = "exfx_inputs"
SHAPE_GUARDS_KEY = "exfx_shape_guards"
RECAPTURE_KEY = "exfx_recapture"
LOWERING_KEY = "exfx_lowering"
DECISION_KEY = "exfx_decision"
HEAD_KEY = "exfx_head"

#: The forms the lowering pass chooses between: the masked reference ops, the native early-exit kernel, plain
#: dense (producer + ReLU, no pruning), and, for a ``relu -> F.linear`` consumer, the sparse-input kernel.
LOWERING_FORMS = ("reference", "native", "dense", "sparse_input")
#: What the annotate step intends for a site: the ENP reference ops, a native form (the lowering measures
#: native against dense), or dense (not rewritten); ``""`` for a record that is not a site.
LOWERING_INTENTS = ("reference", "native", "dense", "")
#: :attr:`SiteMatch.activation` of the ReLU family: plain ReLU, and the capped ReLU ``clamp(x, 0.0, t)``.
RELU_FAMILY = ("relu", "clamp")


@dataclass(frozen=True)
class SiteMatch:
    """What the analysis decided about one ReLU: the typed contract between analysis and rewrite.

    Attributes:
        name: the site name: the dotted name of the module or parameter producing
            the summed pre-activation (``layer1.0.conv1``); ``#2``, ``#3`` suffixes
            keep repeated producers apart. For a ReLU with no producer, the ReLU's
            own source name.
        relu: the ReLU node's name.
        eligible: structurally eligible: the rewrite may apply, given a schedule
            that fits ``fan_in``.
        reason: why not, when not eligible (one line), else empty.
        group: the exchangeable group of the contraction axis (``"g3"``), or None.
        fan_in: units summed per output neuron.
        n_units: units along the contraction axis of the producer's input.
        kind: ``linear``, ``conv1d``, ``conv2d`` or ``-``.
        signature: the shape signature a plan is checked against.
        producer: the producer node (``F.linear`` / ``F.convNd``).
        input: the producer's input node ``x``.
        left: the left operand ``A`` of ``A @ (x W)`` (GCN form), or empty.
        shifts: residual operands added to the pre-activation, in match order.
        concat_blocks: when the contraction axis concatenates blocks (DenseNet), the units of each block in order
            (adding up to ``n_units``); the rewrite samples every block in proportion. Empty: one population.
        exact_available: the lossless ``exact`` rule may run here: the producer's input is provably
            non-negative (:mod:`exfx.analysis.sign`). False for a site that is not eligible.
        exact_reason: why ``exact`` is not available at an eligible site (one line), else empty.
        propagation: message passing between the producer (a linear) and the pre-activation, as in PyG's
            ``GCNConv`` (gather, scale, scatter-add): the names of its nodes in graph order, the producer's side
            first and the propagated value last; the rewrite replays them on ``x``. Empty for other sites.
        propagation_resized: the nodes of ``propagation`` whose size arguments end with the feature count
            (scatter targets, broadcast indices), rebuilt with the replay's column count.
        activation: the activation the record is about: ``relu`` or ``clamp`` (the capped ReLU
            ``torch.clamp(x, 0.0, t)`` of ReLU6 and its kin) for the ReLU family (:attr:`relu_family`), else
            the name of an activation that is never a site (``gelu``, ``sigmoid``, ...), recorded so the
            report says why.
    """

    name: str
    relu: str
    eligible: bool = False
    reason: str = ""
    group: str | None = None
    fan_in: int | None = None
    n_units: int = 0
    kind: str = "-"
    signature: str = ""
    producer: str = ""
    input: str = ""
    left: str = ""
    shifts: tuple[str, ...] = ()
    concat_blocks: tuple[int, ...] = ()
    exact_available: bool = False
    exact_reason: str = ""
    propagation: tuple[str, ...] = ()
    propagation_resized: tuple[str, ...] = ()
    activation: str = "relu"

    @property
    def relu_family(self) -> bool:
        """A ReLU-family activation (which may be a site), not a record of an activation that never is."""
        return self.activation in RELU_FAMILY


@dataclass(frozen=True)
class SiteDecision:
    """What runs at one site and why: written once by the annotate step, read by every pass and the report.

    Attributes:
        site: the site name (:attr:`SiteMatch.name`).
        params: the resolved parameters (the plan's, else the config's, with ``exact`` only where it may run);
            None where the site is not structurally eligible.
        eligible: the ENP rewrite applies (structurally eligible, enabled, the schedule fits the fan-in).
        reason: why not, when not eligible (one line), else empty.
        exact_available: the lossless ``exact`` rule may run here.
        exact_reason: why not, at a structurally eligible site (one line), else empty.
        lowering: the intent, one of :data:`LOWERING_INTENTS`: ``reference`` (the ENP reference ops),
            ``native`` (the lowering chooses the native kernel or dense), ``dense`` (left as the model had it),
            ``""`` for an ineligible record.
        lowering_reason: why that intent (one line), empty when there is nothing to say.
        keep: the share of neurons calibration measured this site keeping under ``params``, or None (unknown).
    """

    site: str
    params: SiteParams | None = None
    eligible: bool = False
    reason: str = ""
    exact_available: bool = False
    exact_reason: str = ""
    lowering: str = ""
    lowering_reason: str = ""
    keep: float | None = None

    def __post_init__(self) -> None:
        if self.lowering not in LOWERING_INTENTS:
            raise ValueError(f"site {self.site!r}: lowering intent must be one of {LOWERING_INTENTS}, "
                             f"got {self.lowering!r}")
        if self.eligible and (self.params is None or not self.lowering):
            raise ValueError(f"site {self.site!r}: an eligible decision needs its parameters and a lowering intent")
        if not self.eligible and self.lowering in ("reference", "native"):
            raise ValueError(f"site {self.site!r}: an ineligible site cannot be lowered to {self.lowering!r}")
        if self.keep is not None and not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"site {self.site!r}: keep ratio must be in [0, 1], got {self.keep!r}")

    @property
    def rewritten(self) -> bool:
        """Whether the ENP reference rewrite runs here (the native intent is built by the lowering instead)."""
        return self.eligible and self.lowering == "reference"


@dataclass(frozen=True)
class HeadMatch:
    """What the head analysis decided: the typed contract between it and the dominance rewrite.

    Attributes:
        name: the head's name (the dotted name of its weight's module or parameter), or ``"-"``.
        eligible: the rewrite may apply.
        reason: why not, when not eligible (one line), else empty.
        linear: the head's ``F.linear`` node name.
        input: the head's input node name.
        group: the exchangeable group of the contraction axis, or None.
        n_units: features along the contraction axis.
        classes: output features (classes).
        blocks: units of each concat block along the contraction axis (empty: one population).
    """

    name: str
    eligible: bool = False
    reason: str = ""
    linear: str = ""
    input: str = ""
    group: str | None = None
    n_units: int = 0
    classes: int = 0
    blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class HeadDecision:
    """Dominance prediction asked for at a head: the head analysis's record and the parameters (checked)."""

    head: HeadMatch
    params: DominanceParams


@dataclass(frozen=True)
class RewriteRole:
    """The site and role (``partial_sum_1``, ``early_exit_1``, ``complete``, ...) of a node the rewrite made."""

    site: str
    role: str = ""


@dataclass(frozen=True)
class Lowering:
    """What the lowering pass chose for one site (or one ``relu -> F.linear`` consumer of a site) and why.

    Attributes:
        site: the site name (for a consumer, the consumer's own producer name).
        form: one of :data:`LOWERING_FORMS`.
        reason: one line: why this form (``"native enp_linear: 1.2 ms vs dense 3.1 ms at batch 1"``,
            ``"dense: conv sites have no native kernel yet"``).
        keep: the keep ratio (site) or input density (consumer) the choice was priced at, or None.
        timings: ``(form, milliseconds)`` pairs that were measured or read from the timing cache.
        input_site: for a consumer, the site whose ReLU output it reads; else empty.
        max_rows: for a native form, the crossover: a call of more rows than this runs dense (per call, in the
            op); -1: native at every size.
    """

    site: str
    form: str
    reason: str = ""
    keep: float | None = None
    timings: tuple[tuple[str, float], ...] = ()
    input_site: str = ""
    max_rows: int = -1

    def __post_init__(self) -> None:
        if self.form not in LOWERING_FORMS:
            raise ValueError(f"lowering form must be one of {LOWERING_FORMS}, got {self.form!r}")

    def describe(self) -> str:
        """``form: reason`` (or just the form)."""
        return f"{self.form}: {self.reason}" if self.reason else self.form


def producer_name(node: fx.Node) -> str:
    """The dotted module / parameter name of a canonical producer (its node name if canonicalize gave none)."""
    return str(node.meta.get(NAME_KEY, node.name))


def set_producer_name(node: fx.Node, name: str, *, overwrite: bool = True) -> None:
    if overwrite or NAME_KEY not in node.meta:
        node.meta[NAME_KEY] = name


def relu_source(node: fx.Node) -> str:
    """The name a canonical ReLU had before canonicalize rewrote it (its own name otherwise)."""
    return str(node.meta.get(RELU_SOURCE_KEY, node.name))


def set_relu_source(node: fx.Node, name: str, *, overwrite: bool = True) -> None:
    if overwrite or RELU_SOURCE_KEY not in node.meta:
        node.meta[RELU_SOURCE_KEY] = name


def axis_groups(node: fx.Node) -> tuple[str | None, ...] | None:
    """The exchangeable group of each axis of ``node``'s tensor, or None if the analysis did not label it."""
    return node.meta.get(GROUPS_KEY)


def set_axis_groups(node: fx.Node, groups: Sequence[str | None]) -> None:
    node.meta[GROUPS_KEY] = tuple(groups)


def site_match(node: fx.Node) -> SiteMatch | None:
    """The analysis verdict stored on a ReLU node, or None."""
    record = node.meta.get(SITE_KEY)
    return record if isinstance(record, SiteMatch) else None


def set_site_match(node: fx.Node, record: SiteMatch) -> None:
    node.meta[SITE_KEY] = record


def rewrite_role(node: fx.Node) -> RewriteRole | None:
    """The site and role of a node inserted by the ENP rewrite, or None."""
    record = node.meta.get(ROLE_KEY)
    return record if isinstance(record, RewriteRole) else None


def set_rewrite_role(node: fx.Node, site: str, role: str = "") -> None:
    node.meta[ROLE_KEY] = RewriteRole(site, role)


def site_of(node: fx.Node) -> str | None:
    """The site a node belongs to: an analysed ReLU's site, or a rewritten node's site."""
    match = site_match(node)
    if match is not None:
        return match.name
    role = rewrite_role(node)
    return role.site if role is not None else None


def lowering(node: fx.Node) -> Lowering | None:
    """The lowering record of a node the lowering pass made or kept (a site's output, a consumer), or None."""
    record = node.meta.get(LOWERING_KEY)
    return record if isinstance(record, Lowering) else None


def set_lowering(node: fx.Node, record: Lowering) -> None:
    node.meta[LOWERING_KEY] = record


def site_decision(node: fx.Node) -> SiteDecision | None:
    """The annotate step's decision stored on a site's ReLU node, or None."""
    record = node.meta.get(DECISION_KEY)
    return record if isinstance(record, SiteDecision) else None


def set_site_decision(node: fx.Node, record: SiteDecision) -> None:
    node.meta[DECISION_KEY] = record


def head_decision(node: fx.Node) -> HeadDecision | None:
    """The dominance decision stored on a head's linear node, or None."""
    record = node.meta.get(HEAD_KEY)
    return record if isinstance(record, HeadDecision) else None


def set_head_decision(node: fx.Node, record: HeadDecision) -> None:
    node.meta[HEAD_KEY] = record
