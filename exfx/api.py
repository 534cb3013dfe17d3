"""The user entry points: :func:`analyse` once, then :meth:`Analysis.compile` with as many plans as you like.

:func:`analyse` runs the stages that do not depend on a plan, once: capture ->
shape propagation -> canonicalize -> fold BatchNorm -> exchangeability analysis.
The :class:`Analysis` it returns holds the canonical graph (with one typed
:class:`~exfx.meta.SiteMatch` per ReLU in ``node.meta``), the exchangeable groups,
the sites and the fingerprint a plan is checked against. Its
:meth:`~Analysis.compile` rewrites a copy of that graph for one plan or config,
without capturing again, so calibration and sweeps pay for the analysis once.
:func:`compile` and :func:`explain` are the one-shot wrappers.

Shapes are propagated with real tensors once (the check that the model runs on
``example_inputs``, with the model's own error if not), then once more with fake
tensors after canonicalize and BatchNorm folding, for the nodes they created: the
analysis needs shapes and dtypes, not values. (Canonicalize copies each replaced
node's shape to its replacement, which is all BatchNorm folding reads.)

Example::

    >>> analysis = exfx.analyse(model.eval(), (torch.randn(8, 3, 32, 32),))
    >>> print(analysis.report)                                  # what exfx.explain prints
    >>> fast = analysis.compile(exfx.Config(threshold=0.0))
    >>> safe = analysis.compile(exfx.Config(rule="ztest", alpha=0.01))
    >>> tuned = analysis.compile(exfx.Plan.load("plan.json"))
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from exfx.analysis.axes import AxisGroups
from exfx.capture import TRACE_LOCK, normalise_inputs
from exfx.capture import capture as capture_model
from exfx.compiled import CompiledModule
from exfx.config import Config, DominanceParams, Plan, SiteParams, fingerprint
from exfx.errors import PlanError, UnsupportedModelError
from exfx.meta import REPORT_KEY, SiteMatch
from exfx.passes import CanonicalizePass, EnpPass, ExchangeabilityPass, FoldBatchNormPass, LowerPass
from exfx.passes.dominance_pass import DominancePass
from exfx.passes.enp_pass import exact_refusal
from exfx.passes.lower_pass import EXACT_LOWERING_REASON, check_lowering, lowering_rows, native_blocker, planned_keep
from exfx.report import Report, SiteInfo, find_site

logger = logging.getLogger(__name__)

__all__ = ["Analysis", "analyse", "compile", "explain", "PlanLike"]

#: What :meth:`Analysis.compile` takes: a plan, the path of its JSON file, a config, or None for the defaults.
PlanLike = Plan | Config | str | os.PathLike[str] | None


class Analysis:
    """One model, captured, canonicalized, folded and analysed: compile it with any number of plans.

    Built by :func:`analyse`; do not construct it directly.

    Attributes:
        graph_module: the canonical, analysed GraphModule. Every ReLU carries its
            :class:`~exfx.meta.SiteMatch`; compiling never modifies it.
        sites: the analysis record of every ReLU, in graph order.
        groups: the exchangeable groups of the graph's axes.
        example_inputs: the positional example inputs, as a tuple.
        model_name: the class name of the analysed model.
    """

    def __init__(self, graph_module: fx.GraphModule, sites: Sequence[SiteMatch], groups: AxisGroups,
                 example_inputs: tuple[Any, ...], model_name: str) -> None:
        self.graph_module = graph_module
        self.sites: tuple[SiteMatch, ...] = tuple(sites)
        self.groups = groups
        self.example_inputs = example_inputs
        self.model_name = model_name

    def site(self, name: str) -> SiteMatch:
        """The record of one site, by name."""
        return find_site(self.sites, name)

    @property
    def signatures(self) -> dict[str, str]:
        """Shape signatures of the structurally eligible sites: what a plan is checked against."""
        return {s.name: s.signature for s in self.sites if s.eligible}

    @property
    def fingerprint(self) -> str:
        """The hash of :attr:`signatures` that a plan made for this model carries."""
        return fingerprint(self.signatures)

    @property
    def report(self) -> Report:
        """The report with the default :class:`~exfx.config.Config`: what :func:`explain` returns."""
        return self.explain()

    def explain(self, config: Config | None = None, plan: PlanLike = None) -> Report:
        """The report with the parameters ``plan`` (over ``config``) gives each site; see :func:`explain`."""
        params = self._site_params(*_split_plan(plan, config))
        return Report(sites=[SiteInfo.from_match(s, params.get(s.name)) for s in self.sites],
                      groups={name: list(axes) for name, axes in self.groups.groups.items()}, model=self.model_name)

    def compile(self, plan: PlanLike = None, *, config: Config | None = None,
                lowering: str = "reference", dominance: DominanceParams | None = None) -> CompiledModule:
        """The model rewritten for ``plan``: a plan, a plan file's path, or a config (default ``Config()``).

        A plan overrides ``config`` at the sites it names. Each call rewrites a
        fresh copy of the analysed graph (sharing its weights, which no rewrite
        changes), so it can be called many times. Returns a
        :class:`~exfx.compiled.CompiledModule` whose ``meta["exfx_report"]`` is the
        :class:`~exfx.report.Report` of what was done.

        ``lowering="reference"`` (the default) emits the reference ops: an exact
        FLOP simulation, slower than dense. ``lowering="native"`` runs each site in
        the fastest correct form measured on this machine at the example inputs'
        batch size (:class:`~exfx.passes.LowerPass`): the native early-exit kernel,
        or plain dense where pruning does not pay or no kernel exists; the report
        rows say which and why. Timings are cached (``$EXFX_CACHE_DIR``, default
        ``~/.cache/exfx``); ``EXFX_FORCE_LOWERING=native|dense`` skips them.

        ``dominance`` (opt-in, off by default) also rewrites the model's prediction head for dominance
        prediction (:class:`~exfx.passes.dominance_pass.DominancePass`): the returned logits are exact for the
        classes that may still be the top-1 and ``-inf`` for the others, so use it only where the top-1 is all
        that is read (greedy decoding, classification), never for a loss or perplexity. It is an argument here,
        not a :class:`Config` field, because it changes what the output means for the whole model, not how a
        site prunes: a config is reused by calibration and plans, which must keep seeing every logit.

        Raises:
            exfx.PlanMismatchError: ``plan`` was made for another model.
            exfx.UnsupportedModelError: ``dominance`` is given but the model has no head it may rewrite (the
                message says why, e.g. the head's contraction axis is not exchangeable).
            exfx.PlanError: ``dominance`` does not fit the head (the message names the field).
            ValueError: ``lowering`` is not one of ``"reference"``, ``"native"``.
        """
        check_lowering(lowering)
        plan, config = _split_plan(plan, config)  # once: a plan file is read once
        report = self.explain(config, plan)
        params = {s.name: s.params for s in report.eligible if s.params is not None}
        gm = _fresh_copy(self.graph_module)
        if dominance is not None:  # first: the head is not a site, and LowerPass must not see it as a consumer
            DominancePass(dominance, self.groups)(gm)
        if lowering == "native":
            # Exact sites stay on the reference ops (recorded by LowerPass): the exact rule has no native kernel.
            blocked = {name: reason for name, p in params.items()
                       if not p.exact and (reason := native_blocker(self.site(name), p))}
            EnpPass({name: p for name, p in params.items() if name not in blocked})(gm)
            lower = LowerPass(self.example_inputs, keep_ratios=planned_keep(plan), dense_sites=blocked)
            lower(gm)
            report = report.with_lowering(lowering_rows(lower))
        else:
            EnpPass(params)(gm)
        gm.meta[REPORT_KEY] = report
        if not report.eligible:
            logger.info("exfx: no ENP site in %s; returning it unchanged\n%s", report.model, report)
        return CompiledModule(gm, self.example_inputs)

    def _site_params(self, plan: Plan | None, config: Config) -> dict[str, SiteParams]:
        """Every structurally eligible site's parameters: the plan's, else the config's.

        The config's ``exact`` applies only where the analysis proves the exact rule may run (elsewhere the
        statistical rule runs alone, or, under ``rule="exact"``, the site stays dense); a plan that asks for it
        elsewhere raises :class:`~exfx.errors.PlanError` naming the site and the reason.
        """
        fan_ins = {s.name: s.fan_in or 0 for s in self.sites if s.eligible}
        if plan is not None:
            plan.check_against(self.signatures, fan_ins)
        chosen = plan.sites if plan is not None else {}
        params = {}
        for site in (s for s in self.sites if s.eligible):
            given = chosen.get(site.name)
            if given is not None and given.enabled and given.exact and not site.exact_available:
                raise PlanError(exact_refusal(site))
            default = config.site_params if site.exact_available else config.site_params.without_exact()
            params[site.name] = given or default
        return params

    def __repr__(self) -> str:
        eligible = sum(s.eligible for s in self.sites)
        relus = sum(s.relu_family for s in self.sites)
        return (f"Analysis({self.model_name}: {relus} ReLUs, {eligible} structurally eligible, "
                f"{len(self.groups.groups)} exchangeable groups)")


def _split_plan(plan: PlanLike, config: Config | None) -> tuple[Plan | None, Config]:
    """``(plan, config)`` from what :meth:`Analysis.compile` takes (a config may come in the plan's place)."""
    if isinstance(plan, Config):
        if config is not None:
            raise TypeError("give the config once: as the first argument or as config=, not both")
        return None, plan
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an exfx.Config, got {type(config).__name__}")
    return _as_plan(plan), config or Config()


def _as_plan(plan: Plan | str | os.PathLike[str] | None) -> Plan | None:
    """A plan, loaded first when given as the path of its JSON file."""
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise TypeError(f"plan must be an exfx.Plan or the path of a plan JSON file, got {type(plan).__name__} "
                    f"(Analysis.compile also takes an exfx.Config in its place)")


def _fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (node meta shallow-copied), sharing its modules and weights."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...], *, fake: bool) -> None:
    """Write ``tensor_meta`` on every node: with real tensors, or with fake ones (shapes and dtypes only).

    The fake run falls back to a real one where an op has no fake implementation.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders) and not any(str(n.target).startswith("*") for n in placeholders):
        raise UnsupportedModelError(
            f"example_inputs has {len(inputs)} inputs but forward() takes {len(placeholders)} "
            f"({', '.join(str(n.target) for n in placeholders)}). "
            f"Check that example_inputs are what forward() expects.")
    if fake:
        try:
            with torch.no_grad():
                _fake_propagate(gm, inputs)
            return
        except Exception as err:  # noqa: BLE001 - any op without a fake kernel: the real run below decides
            logger.debug("fake shape propagation failed (%s: %s); propagating with real tensors",
                         type(err).__name__, err)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as err:  # ShapeProp re-raises whatever the model raised
        raise UnsupportedModelError(
            f"running the model on example_inputs failed: {type(err).__name__}: {err}. "
            f"Check that example_inputs are what forward() expects.") from err


def _fake_propagate(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """``tensor_meta`` from a run on fake tensors: no FLOP of the model is spent, and no value is read."""
    kept = {node: node.meta["val"] for node in gm.graph.nodes if "val" in node.meta}  # e.g. Dynamo's own
    try:
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
        values = {node: node.meta.get("val") for node in gm.graph.nodes}
    finally:  # the graph keeps no fake tensor, even when the run failed half-way
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
            if node in kept:
                node.meta["val"] = kept[node]
    for node, value in values.items():
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _tensor_metadata(value)
        elif isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            node.meta["tensor_meta"] = type(value)(_tensor_metadata(v) if isinstance(v, torch.Tensor) else v
                                                   for v in value)
        else:
            node.meta.pop("tensor_meta", None)


def _tensor_metadata(value: torch.Tensor) -> TensorMetadata:
    """What :class:`ShapeProp` records for a tensor (no quantisation parameters: fake tensors carry none)."""
    memory_format = next((f for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
                          if value.is_contiguous(memory_format=f)), None)
    return TensorMetadata(value.shape, value.dtype, value.requires_grad, value.stride(), memory_format,
                          value.is_quantized, {})


def analyse(model: torch.nn.Module, example_inputs: Any, *, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto") -> Analysis:
    """Capture, canonicalize, fold and analyse ``model`` once; compile the result with any plan.

    Args:
        model: an eval-mode ``nn.Module`` or ``torch.fx.GraphModule`` (never modified).
        example_inputs: a tensor or a tuple of positional inputs.
        leaf_modules: qualified names of submodules to keep opaque when tracing.
        concrete_args: passed to ``torch.fx`` tracing to fix Python arguments.
        hidden_inputs: names of ``forward()`` arguments that carry hidden
            activations (for example a backbone's features, when compiling only
            a head); their axes may then be exchangeable. Other inputs are pinned.
        capture: ``"auto"`` (``torch.fx.symbolic_trace``, falling back to Dynamo
            when it fails), ``"fx"`` or ``"dynamo"``. A Dynamo-captured module
            takes the tensor inputs and returns the outputs flattened to tensors.

    Raises:
        exfx.TrainingModeError: the model is in training mode.
        exfx.CaptureError: the model cannot be traced (the message says where and how to fix it).
        exfx.UnsupportedModelError: the model does not run on ``example_inputs``.
    """
    inputs = normalise_inputs(example_inputs)
    # Held until the model has stopped running: torch.fx tracing in another thread would intercept its calls.
    with TRACE_LOCK:
        gm = capture_model(model, inputs, leaf_modules, concrete_args, capture)
        _propagate_shapes(gm, inputs, fake=False)  # the one real run: does the model run on these inputs?
        CanonicalizePass()(gm)  # each rewritten producer keeps its node's shape, which is all BN folding reads
        FoldBatchNormPass()(gm)
        _propagate_shapes(gm, inputs, fake=True)  # the new weight and bias nodes, for the analysis
    _check_hidden_inputs(gm, hidden_inputs)
    analysis = ExchangeabilityPass(hidden_inputs=hidden_inputs)
    analysis(gm)
    return Analysis(gm, analysis.sites, analysis.groups, inputs, type(model).__name__)


def _check_hidden_inputs(gm: fx.GraphModule, hidden_inputs: Sequence[str]) -> None:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = [name for name in hidden_inputs if name not in names]
    if unknown:
        raise UnsupportedModelError(f"hidden_inputs names {unknown}, which are not inputs of forward(); "
                                    f"its inputs are {names}")


def explain(model: torch.nn.Module, example_inputs: Any, config: Config | None = None,
            plan: Plan | str | os.PathLike[str] | None = None, *, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto", lowering: str = "reference") -> Report:
    """Report, for every ReLU of ``model``, whether it is an ENP site and why.

    ``exfx.analyse(model, example_inputs, ...).explain(config, plan)``.

    Args:
        model, example_inputs, leaf_modules, concrete_args, hidden_inputs, capture: as for :func:`analyse`.
        config: global settings (default ``exfx.Config()``).
        plan: per-site parameters overriding ``config``: an :class:`exfx.Plan`, or
            the path of its JSON file.
        lowering: with ``"native"``, each site's row also says whether it can be lowered
            to a native kernel (the choice between native and dense is measured at compile time).
    """
    _check_config(config)
    check_lowering(lowering)
    analysis = analyse(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       hidden_inputs=hidden_inputs, capture=capture)
    report = analysis.explain(config, plan)
    if lowering == "reference":
        return report
    rows = {}
    for s in report.eligible:
        if s.params is not None and s.params.exact:
            rows[s.name] = ("reference", EXACT_LOWERING_REASON)
            continue
        blocker = native_blocker(analysis.site(s.name), s.params) if s.params is not None else ""
        rows[s.name] = ("dense", blocker) if blocker else (
            "native|dense", "native enp_linear or dense, whichever measures faster at compile time")
    return report.with_lowering(rows)


def compile(model: torch.nn.Module, example_inputs: Any, config: Config | None = None,  # noqa: A001
            plan: Plan | str | os.PathLike[str] | None = None, *, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto", lowering: str = "reference",
            dominance: DominanceParams | None = None) -> CompiledModule:
    """Compile ``model`` into a GraphModule with early negative prediction before each eligible ReLU.

    ``exfx.analyse(model, example_inputs, ...).compile(plan, config=config)``. The
    user's model is not modified. The result is a
    :class:`~exfx.compiled.CompiledModule` (a ``torch.fx.GraphModule`` that checks
    its inputs and fails with exfx errors); it runs at any batch size, and its
    ``meta["exfx_report"]`` holds the :class:`~exfx.report.Report` of what was done.
    Arguments are as for :func:`explain`; ``lowering`` and ``dominance`` as for :meth:`Analysis.compile`.

    Raises:
        exfx.TrainingModeError: the model is in training mode.
        exfx.CaptureError: the model cannot be traced (the message says where and how to fix it).
        exfx.PlanMismatchError: ``plan`` was made for another model.
    """
    _check_config(config)
    check_lowering(lowering)
    if dominance is not None and not isinstance(dominance, DominanceParams):
        raise TypeError(f"dominance must be an exfx.DominanceParams, got {type(dominance).__name__}")
    analysis = analyse(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       hidden_inputs=hidden_inputs, capture=capture)
    return analysis.compile(plan, config=config, lowering=lowering, dominance=dominance)


def _check_config(config: Any) -> None:
    """Fail before capture (which can take seconds) when the config is of the wrong type."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an exfx.Config, got {type(config).__name__}")
