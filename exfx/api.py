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
import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from exfx.analysis.axes import AxisGroups
from exfx.capture import TRACE_LOCK, CaptureOptions, normalise_inputs
from exfx.capture import capture as capture_model
from exfx.capture.common import run_failure_message
from exfx.compiled import CompiledModule, Recapture
from exfx.config import Config, DominanceParams, Plan, fingerprint
from exfx.errors import UnsupportedModelError
from exfx.meta import REPORT_KEY, SHAPE_GUARDS_KEY, SiteDecision, SiteMatch
from exfx.passes import CanonicalizePass, ExchangeabilityPass, FoldBatchNormPass
from exfx.passes.annotate_pass import decide_head, decide_sites, resolve_lowering
from exfx.passes.attributes import owner_of
from exfx.passes.pipeline import compile_passes
from exfx.report import Report, SiteInfo, find_site, lowering_rows, lowering_summary

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
        #: (model, capture options) a compiled module captures again at sizes its graph does not hold for;
        #: set by :func:`analyse` for a Dynamo capture.
        self.recapture_source: tuple[torch.nn.Module, CaptureOptions] | None = None

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

    def explain(self, config: Config | None = None, plan: PlanLike = None, *,
                lowering: str | None = None) -> Report:
        """The report with the parameters ``plan`` (over ``config``) gives each site; see :func:`explain`."""
        return self._report(self.decide(*_split_plan(plan, config), lowering))

    def decide(self, plan: Plan | None, config: Config, lowering: str | None = None) -> dict[str, SiteDecision]:
        """Every site's decision for ``plan`` over ``config`` (:func:`exfx.passes.annotate_pass.decide_sites`)."""
        return decide_sites(self.sites, plan, config, lowering)

    def _report(self, decisions: Mapping[str, SiteDecision]) -> Report:
        return Report(sites=[SiteInfo.from_decision(s, decisions[s.name]) for s in self.sites],
                      groups={name: list(axes) for name, axes in self.groups.groups.items()}, model=self.model_name)

    def compile(self, plan: PlanLike = None, *, config: Config | None = None,
                lowering: str | None = None, dominance: DominanceParams | None = None) -> CompiledModule:
        """The model rewritten for ``plan``: a plan, a plan file's path, or a config (default ``Config()``).

        A plan overrides ``config`` at the sites it names. Each call rewrites a
        fresh copy of the analysed graph (sharing its weights, which no rewrite
        changes), so it can be called many times. Returns a
        :class:`~exfx.compiled.CompiledModule` whose ``meta["exfx_report"]`` is the
        :class:`~exfx.report.Report` of what was done.

        The passes run in the order :func:`exfx.passes.pipeline.compile_passes` states: the annotate step
        decides every site once and writes the decision on the graph, and the rewrites read it.

        ``lowering="native"`` (the default; ``$EXFX_LOWERING`` changes the default) runs each site in the
        fastest correct form
        measured on this machine (:class:`~exfx.passes.LowerPass`): the native early-exit
        kernel, or plain dense where pruning does not pay or no kernel exists; the report
        rows say which and why. The choice is made per call: each native site keeps the
        largest row count (batch x tokens) at which it measured faster than dense, and a
        call with more rows runs the site densely, exactly, counted as dense. If the
        lowered model as a whole measures slower than dense at the example inputs, every
        site runs dense. A plan's measured keep ratios (``Plan.keep``, written by
        :func:`exfx.calibrate`) are the ratios the choice is priced at. Timings are cached
        (``$EXFX_CACHE_DIR``, default ``~/.cache/exfx``); ``EXFX_FORCE_LOWERING=native|dense``
        skips them. ``lowering="reference"`` emits the reference ops instead: an exact FLOP
        simulation, slower than dense, for FLOP studies and calibration.

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
            exfx.PlanError: ``dominance`` does not fit the head (the message names the field), or ``plan`` asks
                for what cannot run at a site (the message names the site).
            ValueError: ``lowering`` is not one of ``"reference"``, ``"native"``.
        """
        plan, config = _split_plan(plan, config)  # once: a plan file is read once
        lowering = resolve_lowering(lowering)
        decisions = self.decide(plan, config, lowering)
        gm = _fresh_copy(self.graph_module)
        head = decide_head(gm, dominance, self.groups) if dominance is not None else None
        for graph_pass in compile_passes(decisions, head, lowering, self.example_inputs):
            graph_pass(gm)
        report = self._report(decisions)
        if lowering == "native":
            report = report.with_lowering(lowering_rows(gm.graph))
            _log_lowering(report, plan)
        gm.meta[REPORT_KEY] = report
        if not report.eligible:
            logger.info("exfx: no ENP site in %s; returning it unchanged\n%s", report.model, report)
        recapture = (Recapture(functools.partial(_compile_at, *self.recapture_source, plan, config, lowering,
                                                 dominance)) if self.recapture_source is not None else None)
        return CompiledModule(gm, self.example_inputs, recapture)

    def __repr__(self) -> str:
        eligible = sum(s.eligible for s in self.sites)
        relus = sum(s.relu_family for s in self.sites)
        return (f"Analysis({self.model_name}: {relus} ReLUs, {eligible} structurally eligible, "
                f"{len(self.groups.groups)} exchangeable groups)")


def _compile_at(model: torch.nn.Module, options: CaptureOptions, plan: Plan | None, config: Config,
                lowering: str, dominance: DominanceParams | None, inputs: tuple[Any, ...]) -> CompiledModule:
    """``model`` captured at ``inputs`` and compiled as a module was before: how a compiled module captures its
    model again at sizes its graph does not hold for (:class:`~exfx.compiled.Recapture`)."""
    analysis = analyse(model, inputs, capture_options=options)
    analysis.recapture_source = None  # the first module dispatches between its captures; this one only runs
    found = analysis.signatures
    if plan is not None and plan.signatures and found != plan.signatures \
            and all(plan.signatures.get(name) == signature for name, signature in found.items()):
        # Fewer sites are eligible at these sizes (the analysis is conservative where an axis has size 1): the
        # plan, checked at the first compile, applies by name to the sites left; the others run dense.
        dropped = sorted(set(plan.signatures) - set(found))
        logger.warning("exfx: at these input sizes %d site(s) of the plan are not eligible and run dense: %s",
                       len(dropped), ", ".join(dropped))
        plan = dataclasses.replace(plan, sites={n: p for n, p in plan.sites.items() if n in found},
                                   signatures=dict(found))
    return analysis.compile(plan, config=config, lowering=lowering, dominance=dominance)


def _log_lowering(report: Report, plan: Plan | None) -> None:
    """The one summary line of a native compile; a warning naming the sites where a plan's pruning is dropped
    because dense measured faster (never silent: the plan's FLOP savings do not happen there)."""
    logger.info("exfx: %s", lowering_summary(report))
    if plan is None:
        return
    dropped = [s for s in report.eligible if s.lowering == "dense" and s.name in plan.sites]
    if dropped:
        logger.warning("exfx: the plan prunes %d site(s) that run dense here, so their pruning saves no time: %s",
                       len(dropped), "; ".join(f"{s.name}: {s.lowering_reason}" for s in dropped))


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
            _annotate_stored(gm)
            return
        except Exception as err:  # noqa: BLE001 - any op without a fake kernel: the real run below decides
            logger.debug("fake shape propagation failed (%s: %s); propagating with real tensors",
                         type(err).__name__, err)
    run = _RealShapeProp(gm)
    try:
        with torch.no_grad():
            run.propagate(*inputs)
    except Exception as err:  # whatever the model raised, at the node run.failed
        where = _describe_node(gm, run.failed) if run.failed is not None else None
        raise UnsupportedModelError(run_failure_message(where, err)) from err
    _annotate_stored(gm)


def _annotate_stored(gm: fx.GraphModule) -> None:
    """``tensor_meta`` of every stored tensor the graph reads (``get_attr``), from the tensor itself.

    Whether a shape run annotates them depends on how its values came back (real or fake, and, with weights
    shared between concurrent compiles, on what another thread's fake run met first); a stored tensor's shape
    needs no run at all.
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            value = getattr(*owner_of(gm, str(node.target)))
        except AttributeError:  # not stored on the module: nothing to annotate
            continue
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _tensor_metadata(value)


class _RealShapeProp(fx.Interpreter):
    """:class:`ShapeProp` without its traceback on stderr and its multi-line message: a failure keeps the
    model's own exception and leaves the node it happened at in ``failed``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the exception's message stays the model's own
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        found = False

        def extract(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def propagate(self, *args: Any) -> Any:
        return self.run(*args)


def _describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node runs, for an error: `fc1` (Linear), input `x`, `block.0` (Block, op add) or `add_1` (add)."""
    if node.op == "placeholder":
        return f"input `{str(node.target).lstrip('*')}`"
    if node.op == "call_module":
        try:
            kind = type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            kind = "module"
        return f"`{node.target}` ({kind})"
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()), None) if stack else None
    if owner:
        path = str(owner[0]).removeprefix("L['self'].").removeprefix("L['self']")
        kind = getattr(owner[1], "__name__", None) or str(owner[1]).rsplit(".", 1)[-1]
        if path:
            return f"`{path}` ({kind}, op {op})"
    return f"`{node.name}` ({op})"


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
            capture: str = "auto", capture_options: CaptureOptions | Mapping[str, Any] | None = None) -> Analysis:
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
        capture_options: the four options above as one :class:`exfx.CaptureOptions` (or a dict
            of its fields), as :func:`exfx.calibrate` and the other tuners take them; give
            either it or the separate keywords.

    Raises:
        exfx.TrainingModeError: the model is in training mode.
        exfx.CaptureError: the model cannot be traced (the message says where and how to fix it).
        exfx.UnsupportedModelError: the model does not run on ``example_inputs``.
        TypeError: ``capture_options`` is given with one of the separate keywords.
    """
    options = _capture_options(capture_options, leaf_modules, concrete_args, hidden_inputs, capture)
    inputs = normalise_inputs(example_inputs)
    # Held until the model has stopped running: torch.fx tracing in another thread would intercept its calls.
    with TRACE_LOCK:
        gm = capture_model(model, inputs, options.leaf_modules, options.concrete_args, options.capture,
                           options.dynamic_shapes)
        _propagate_shapes(gm, inputs, fake=False)  # the one real run: does the model run on these inputs?
        CanonicalizePass()(gm)  # each rewritten producer keeps its node's shape, which is all BN folding reads
        FoldBatchNormPass()(gm)
        _propagate_shapes(gm, inputs, fake=True)  # the new weight and bias nodes, for the analysis
    _check_hidden_inputs(gm, options.hidden_inputs)
    analysis = ExchangeabilityPass(hidden_inputs=options.hidden_inputs)
    analysis(gm)
    result = Analysis(gm, analysis.sites, analysis.groups, inputs, type(model).__name__)
    if SHAPE_GUARDS_KEY in gm.meta:  # Dynamo specialised what the code fixes: capture again at other sizes
        result.recapture_source = (model, options)
    return result


def _capture_options(capture_options: CaptureOptions | Mapping[str, Any] | None, leaf_modules: Sequence[str],
                     concrete_args: Mapping[str, Any] | None, hidden_inputs: Sequence[str],
                     capture: str) -> CaptureOptions:
    """The one :class:`CaptureOptions` of a call: ``capture_options``, or the separate keywords (not both)."""
    keywords = CaptureOptions(leaf_modules, concrete_args, hidden_inputs, capture)  # checks them either way
    if capture_options is None:
        return keywords
    if not keywords.is_default:
        raise TypeError("give the capture options once: as capture_options=, or as leaf_modules=, "
                        "concrete_args=, hidden_inputs= and capture=, not both")
    return CaptureOptions.of(capture_options)


def _check_hidden_inputs(gm: fx.GraphModule, hidden_inputs: Sequence[str]) -> None:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = [name for name in hidden_inputs if name not in names]
    if unknown:
        raise UnsupportedModelError(f"hidden_inputs names {unknown}, which are not inputs of forward(); "
                                    f"its inputs are {names}")


def explain(model: torch.nn.Module, example_inputs: Any, config: Config | Plan | None = None,
            plan: Plan | str | os.PathLike[str] | None = None, *, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto", capture_options: CaptureOptions | Mapping[str, Any] | None = None,
            lowering: str | None = None) -> Report:
    """Report, for every ReLU of ``model``, whether it is an ENP site and why.

    ``exfx.analyse(model, example_inputs, ...).explain(config, plan)``.

    Args:
        model, example_inputs, leaf_modules, concrete_args, hidden_inputs, capture, capture_options: as for
            :func:`analyse`.
        config: global settings (default ``exfx.Config()``); a plan given here is taken as ``plan``.
        plan: per-site parameters overriding ``config``: an :class:`exfx.Plan`, or
            the path of its JSON file.
        lowering: with ``"native"`` (the default), each site's row also says what will run there: a native
            form (native or dense, whichever measures faster, per call), dense, or the reference ops, and why.
    """
    config, plan = _config_and_plan(config, plan)
    lowering = resolve_lowering(lowering)
    options = _capture_options(capture_options, leaf_modules, concrete_args, hidden_inputs, capture)
    return analyse(model, example_inputs, capture_options=options).explain(config, plan, lowering=lowering)


def compile(model: torch.nn.Module, example_inputs: Any, config: Config | Plan | None = None,  # noqa: A001
            plan: Plan | str | os.PathLike[str] | None = None, *, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto", capture_options: CaptureOptions | Mapping[str, Any] | None = None,
            lowering: str | None = None, dominance: DominanceParams | None = None) -> CompiledModule:
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
    config, plan = _config_and_plan(config, plan)
    lowering = resolve_lowering(lowering)
    if dominance is not None and not isinstance(dominance, DominanceParams):
        raise TypeError(f"dominance must be an exfx.DominanceParams, got {type(dominance).__name__}")
    options = _capture_options(capture_options, leaf_modules, concrete_args, hidden_inputs, capture)
    analysis = analyse(model, example_inputs, capture_options=options)
    return analysis.compile(plan, config=config, lowering=lowering, dominance=dominance)


def _config_and_plan(config: Any, plan: Any) -> tuple[Config | None, Any]:
    """``(config, plan)``, where a plan (or its file's path) given in the config's place is taken as the plan:
    ``exfx.compile(model, (x,), plan)`` reads as it is meant."""
    if isinstance(config, (Plan, str, os.PathLike)):
        if plan is not None:
            raise TypeError("give the plan once: as the third argument or as plan=, not both")
        return None, config
    _check_config(config)
    return config, plan


def _check_config(config: Any) -> None:
    """Fail before capture (which can take seconds) when the config is of the wrong type."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an exfx.Config, got {type(config).__name__}")
