"""The ``torch.compile`` backend: ``torch.compile(model, backend="exfx")``.

Registered under the ``torch_dynamo_backends`` entry point, so it works without
importing exfx first. Options arrive as
``torch.compile(model, backend="exfx", options={"plan": plan_or_path, "config": {...}, "inner": "eager",
"lowering": "native"})`` or through ``torch.compile(model, backend=exfx.backend(plan=..., config=...))``;
``torch.compile``'s ``mode=`` is passed on to Inductor. ``lowering`` is as for :func:`exfx.compile`: ``"native"``
(the default, the fastest correct form measured here, chosen per call) or ``"reference"`` (the reference ops).

What it does with each graph Dynamo hands it:

1. **Recover parameters.** Dynamo lifts parameters and buffers to graph inputs
   (``L_self_modules_fc1_parameters_weight_``). Their Dynamo *source* gives the
   dotted path (``fc1.weight``); they become ``get_attr`` nodes of a module tree
   with those paths, so sites get the same names as under :func:`exfx.compile`
   and one plan serves both.
2. **Compile** that GraphModule as :func:`exfx.compile` does (canonicalize, fold BN,
   analyse, rewrite) on the real example inputs.
3. **Lower** the result with the inner backend: Inductor by default
   (``inner="inductor"``), or ``"eager"`` to run the GraphModule as is.

Several graphs (graph breaks) and recompiles (new shapes, symbolic batch sizes)
each go through the same steps; a plan's sites are matched per graph, so a
plan may name sites that live in another graph. A graph that resumes after a
break takes the model's live locals as inputs: those that are not arguments of
the model's ``forward`` carry hidden activations and are not pinned as model
inputs, so a site right after a break is found as in :func:`exfx.compile`.

Inference only: weights are frozen into the graph at compile time, and a graph
that runs BatchNorm or dropout in training mode raises
:class:`~exfx.errors.TrainingModeError`. In grad mode the forward is the same,
but no gradient flows through exfx graphs (they are inference graphs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from exfx.api import analyse
from exfx.config import Config, Plan
from exfx.capture import CaptureOptions, recover_parameters
from exfx.errors import ExfxError, PlanMismatchError
from exfx.meta import REPORT_KEY
from exfx.passes.annotate_pass import resolve_lowering

logger = logging.getLogger(__name__)

__all__ = ["exfx_backend", "backend"]

_INNER = ("inductor", "eager")
_OPTION_NAMES = ("config", "plan", "inner", "lowering")


@dataclass(frozen=True)
class _Options:
    """The backend's options, checked: the plan (cut per graph later), config, inner backend and lowering."""

    plan: Plan | None
    config: Config
    inner: str
    lowering: str


def _resolve_options(options: Mapping[str, Any] | None, plan: Plan | str | None,
                     config: Config | Mapping[str, Any] | None, inner: str | None,
                     lowering: str | None = None) -> _Options:
    options = dict(options or {})
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise ExfxError(f"exfx backend: unknown option(s) {sorted(unknown)}; known: {', '.join(_OPTION_NAMES)}")
    plan = options.get("plan", plan)
    config = options.get("config", config)
    inner = options.get("inner", inner) or "inductor"
    lowering = options.get("lowering", lowering)
    if isinstance(plan, str) or hasattr(plan, "__fspath__"):
        plan = Plan.load(plan)  # type: ignore[arg-type]
    if config is None:
        config = Config()
    elif isinstance(config, Mapping):
        config = Config.from_dict(config)
    if not isinstance(config, Config):
        raise ExfxError(f"exfx backend: option 'config' must be an exfx.Config or a dict, got {type(config).__name__}")
    if plan is not None and not isinstance(plan, Plan):
        raise ExfxError(f"exfx backend: option 'plan' must be an exfx.Plan or a path, got {type(plan).__name__}")
    if inner not in _INNER:
        raise ExfxError(f"exfx backend: option 'inner' must be one of {_INNER}, got {inner!r}")
    try:
        lowering = resolve_lowering(lowering)
    except ValueError as error:
        raise ExfxError(f"exfx backend: option 'lowering': {error}") from None
    return _Options(plan, config, inner, lowering)


def _plan_for_graph(plan: Plan | None, here: Mapping[str, str]) -> Plan | None:
    """The part of ``plan`` that concerns this graph, whose sites have the signatures ``here``.

    A graph break splits the model's sites across graphs. A plan with
    signatures lists every site of the model it was made for, so each site of
    this graph must be there with the same signature (as :func:`exfx.compile`
    checks); sites of other graphs are left out. A hand-made plan without
    signatures is matched by site name only.
    """
    if plan is None:
        return None
    mismatched = [f"{name}: plan has {plan.signatures.get(name, 'no such site')}, model has {here[name]}"
                  for name in here if plan.signatures and plan.signatures.get(name) != here[name]]
    if mismatched:
        raise PlanMismatchError("plan does not match this model; mismatched sites:\n  " + "\n  ".join(mismatched)
                                + "\nMake a new plan for this model (exfx.Plan.from_report / exfx.calibrate).")
    sites = {name: params for name, params in plan.sites.items() if name in here}
    return Plan(sites=sites, meta=dict(plan.meta), keep={name: r for name, r in plan.keep.items() if name in here})


def exfx_backend(gm: fx.GraphModule, example_inputs: list[Any], *, options: Mapping[str, Any] | None = None,
                 plan: Plan | str | None = None, config: Config | Mapping[str, Any] | None = None,
                 inner: str | None = None, mode: str | None = None, lowering: str | None = None) -> Callable[..., Any]:
    """The Dynamo backend function (see module docstring).

    ``mode`` is ``torch.compile``'s ``mode=``, passed on to Inductor.
    """
    resolved = _resolve_options(options, plan, config, inner, lowering)
    if mode is not None and resolved.inner != "inductor":
        raise ExfxError(f"exfx backend: torch.compile(mode={mode!r}) configures Inductor, but the inner backend is "
                        f"{resolved.inner!r}; drop mode, or use inner='inductor'")
    exfx_gm, kept, hidden = recover_parameters(gm, example_inputs)
    inputs = [example_inputs[i] for i in kept]
    # Outside Dynamo's tracing context: there, shape propagation would run on Dynamo's fake tensors, and
    # exfx reading a symbolic batch size as a number would make Dynamo specialise (and recompile) every size.
    with torch._guards.tracing(None):
        # One analysis: the plan is cut to this graph's sites from it, then compiled from it.
        analysis = analyse(exfx_gm, inputs, capture_options=CaptureOptions(hidden_inputs=hidden))
        compiled = analysis.compile(_plan_for_graph(resolved.plan, analysis.signatures), config=resolved.config,
                                    lowering=resolved.lowering)
    logger.info("exfx backend: %d sites rewritten in a graph of %d nodes",
                len(compiled.meta[REPORT_KEY].eligible), len(compiled.graph.nodes))
    if resolved.inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        run = compile_fx(compiled, inputs, config_patches=list_mode_options(mode) if mode else None)
    else:
        run = compiled.forward

    def call(*args: Any) -> Any:
        return run(*[args[i] for i in kept])

    call.exfx_graph = compiled  # type: ignore[attr-defined]
    return call


def backend(*, plan: Plan | str | None = None, config: Config | Mapping[str, Any] | None = None,
            inner: str = "inductor", lowering: str | None = None) -> Callable[..., Any]:
    """A configured backend: ``torch.compile(model, backend=exfx.backend(plan=plan, inner="eager"))``.

    The options are checked, and a plan file read, here rather than at each graph.
    """
    resolved = _resolve_options(None, plan, config, inner, lowering)

    def configured(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
        return exfx_backend(gm, example_inputs, plan=resolved.plan, config=resolved.config, inner=resolved.inner,
                            lowering=resolved.lowering, **kwargs)

    return configured
