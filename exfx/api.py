"""The user entry points: :func:`compile` and :func:`explain`.

They only arrange the pieces: capture -> shape propagation -> canonicalize ->
fold BatchNorm -> exchangeability analysis -> (compile only) ENP rewrite.

Example::

    >>> model = torchvision_like_cnn().eval()
    >>> x = torch.randn(8, 3, 32, 32)
    >>> print(exfx.explain(model, (x,)))
    >>> gm = exfx.compile(model, (x,), exfx.Config(rule="ztest", alpha=0.05))
    >>> y = gm(x)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from exfx.capture import capture as capture_model
from exfx.capture import TRACE_LOCK, normalise_inputs
from exfx.compiled import CompiledModule
from exfx.config import Config, Plan
from exfx.errors import UnsupportedModelError
from exfx.passes import CanonicalizePass, EnpPass, ExchangeabilityPass, FoldBatchNormPass
from exfx.report import Report, SiteInfo

logger = logging.getLogger(__name__)

__all__ = ["compile", "explain"]


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders) and not any(str(n.target).startswith("*") for n in placeholders):
        raise UnsupportedModelError(
            f"example_inputs has {len(inputs)} inputs but forward() takes {len(placeholders)} "
            f"({', '.join(str(n.target) for n in placeholders)}). "
            f"Check that example_inputs are what forward() expects.")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as err:  # ShapeProp re-raises whatever the model raised
        raise UnsupportedModelError(
            f"running the model on example_inputs failed: {type(err).__name__}: {err}. "
            f"Check that example_inputs are what forward() expects.") from err


def _analyse(model: torch.nn.Module, example_inputs: Any, config: Config, leaf_modules: Sequence[str] = (),
             concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
             capture: str = "auto") -> tuple[fx.GraphModule, Report]:
    if not isinstance(config, Config):
        raise TypeError(f"config must be an exfx.Config, got {type(config).__name__}")
    inputs = normalise_inputs(example_inputs)
    # Held until the model has stopped running: torch.fx tracing in another thread would intercept its calls.
    with TRACE_LOCK:
        gm = capture_model(model, inputs, leaf_modules, concrete_args, capture)
        _propagate_shapes(gm, inputs)
        CanonicalizePass()(gm)
        _propagate_shapes(gm, inputs)
        FoldBatchNormPass()(gm)
        _propagate_shapes(gm, inputs)
    _check_hidden_inputs(gm, hidden_inputs)
    analysis = ExchangeabilityPass(samples=config.samples[-1], hidden_inputs=hidden_inputs)  # type: ignore[index]
    analysis(gm)
    report = Report(sites=analysis.sites, groups=analysis.groups, model=type(model).__name__)
    return gm, report


def _check_hidden_inputs(gm: fx.GraphModule, hidden_inputs: Sequence[str]) -> None:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = [name for name in hidden_inputs if name not in names]
    if unknown:
        raise UnsupportedModelError(f"hidden_inputs names {unknown}, which are not inputs of forward(); "
                                    f"its inputs are {names}")


def _as_plan(plan: Plan | str | os.PathLike[str] | None) -> Plan | None:
    """A plan, loaded first when given as the path of its JSON file."""
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise TypeError(f"plan must be an exfx.Plan or the path of a plan JSON file, got {type(plan).__name__}")


def _assign_params(report: Report, config: Config, plan: Plan | str | os.PathLike[str] | None) -> None:
    """Give every structurally eligible site its parameters, from the plan or the config."""
    plan = _as_plan(plan)
    fan_ins = {s.name: s.fan_in or 0 for s in report.sites if s.structurally_eligible}
    if plan is not None:
        plan.check_against(report.signatures, fan_ins)
    for site in report.sites:
        if not site.structurally_eligible:
            continue
        params = plan.sites.get(site.name) if plan is not None else None
        params = params or config.site_params
        site.params = params
        site.samples = params.samples  # type: ignore[assignment]
        site.eligible, site.reason = _eligibility(site, params)


def _eligibility(site: SiteInfo, params: Any) -> tuple[bool, str]:
    if not params.enabled:
        return False, "disabled by the plan"
    if (site.fan_in or 0) < params.samples[-1]:
        return False, f"fan-in {site.fan_in} < samples {params.samples[-1]}"
    return True, ""


def explain(model: torch.nn.Module, example_inputs: Any, config: Config | None = None, *,
            plan: Plan | str | os.PathLike[str] | None = None, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto") -> Report:
    """Report, for every ReLU of ``model``, whether it is an ENP site and why.

    Args:
        model: an eval-mode ``nn.Module`` or ``torch.fx.GraphModule``.
        example_inputs: a tensor or a tuple of positional inputs.
        config: global settings (default ``exfx.Config()``).
        plan: per-site parameters overriding ``config``: an :class:`exfx.Plan`, or
            the path of its JSON file.
        leaf_modules: qualified names of submodules to keep opaque when tracing.
        concrete_args: passed to ``torch.fx`` tracing to fix Python arguments.
        hidden_inputs: names of ``forward()`` arguments that carry hidden
            activations (for example a backbone's features, when compiling only
            a head); their axes may then be exchangeable. Other inputs are pinned.
        capture: ``"auto"`` (``torch.fx.symbolic_trace``, falling back to Dynamo
            when it fails), ``"fx"`` or ``"dynamo"``. A Dynamo-captured module
            takes the tensor inputs and returns the outputs flattened to tensors.
    """
    config = config or Config()
    _, report = _analyse(model, example_inputs, config, leaf_modules, concrete_args, hidden_inputs, capture)
    _assign_params(report, config, plan)
    return report


def compile(model: torch.nn.Module, example_inputs: Any, config: Config | None = None,  # noqa: A001
            plan: Plan | str | os.PathLike[str] | None = None, *, leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, hidden_inputs: Sequence[str] = (),
            capture: str = "auto") -> fx.GraphModule:
    """Compile ``model`` into a GraphModule with early negative prediction before each eligible ReLU.

    The user's model is not modified. The result is a
    :class:`~exfx.compiled.CompiledModule` (a ``torch.fx.GraphModule`` that checks
    its inputs and fails with exfx errors); it runs at any batch size, and its
    ``meta["exfx_report"]`` holds the :class:`~exfx.report.Report` of what was done.
    Arguments are as for :func:`explain`.

    Raises:
        exfx.TrainingModeError: the model is in training mode.
        exfx.CaptureError: the model cannot be traced (the message says where and how to fix it).
        exfx.PlanMismatchError: ``plan`` was made for another model.
    """
    config = config or Config()
    gm, report = _analyse(model, example_inputs, config, leaf_modules, concrete_args, hidden_inputs, capture)
    return _rewrite(gm, report, example_inputs, config, plan)


def _rewrite(gm: fx.GraphModule, report: Report, example_inputs: Any, config: Config,
             plan: Plan | None) -> CompiledModule:
    """Second half of :func:`compile`: parameters per site, the ENP rewrite, the checked module."""
    _assign_params(report, config, plan)
    EnpPass(report.sites)(gm)
    gm.meta["exfx_report"] = report
    if not report.eligible:
        logger.info("exfx: no ENP site in %s; returning it unchanged\n%s", report.model, report)
    return CompiledModule(gm, normalise_inputs(example_inputs))
