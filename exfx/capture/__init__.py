"""Capture: an ``nn.Module`` (or an existing ``GraphModule``) -> a private ``torch.fx.GraphModule``.

exfx compiles eval-mode inference only, so a model in training mode is refused.
The model is deep-copied first: later passes fold BatchNorm into weights and must
never touch the user's parameters.

``torch.fx.symbolic_trace`` is the capture. When it fails (untraceable calls,
``**kwargs`` plumbing, Python control flow), exfx falls back to capturing the
model with Dynamo (:mod:`exfx.capture.dynamo`), which handles much more, such as
Hugging Face models. torch.fx keeps every ``torch.nn`` module opaque, so a
symbolic capture holding ``nn.TransformerEncoder``/``nn.TransformerDecoderLayer``
and friends as one ``call_module`` node hides their FFN ReLUs; the ``"auto"``
capture then takes Dynamo's graph, which holds them op by op, and keeps the
symbolic one only if Dynamo fails. Every capture runs with
``nn.MultiheadAttention``'s eval fast path switched off
(:func:`~exfx.capture.common.mha_fastpath_disabled`), so the graph holds the
slow path's ops, not a fused op, whatever the flag is when the compiled module
runs. When both fail (data-dependent control flow),
:class:`~exfx.errors.CaptureError` names the module being traced and the line of
user code that failed, and suggests the fixes: ``leaf_modules=[...]`` to keep a
module opaque, ``concrete_args={...}`` to fix a Python argument, or tracing the
model yourself and passing the GraphModule.

The stages: :mod:`.common` (trace lock, eval-mode check, input normalisation),
:mod:`.symbolic` (symbolic tracing) and :mod:`.dynamo` (the Dynamo fallback); this
package's :func:`capture` picks one. :mod:`.options` holds :class:`CaptureOptions`, the
one bundle of capture options the API, the tuners and the ``torch.compile`` backend pass on.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from exfx.capture.common import (TRACE_LOCK, check_eval_mode, mha_fastpath_disabled, normalise_inputs,
                                 relu_hiding_layers)
from exfx.capture.dynamo import dynamo_capture, recover_parameters
from exfx.capture.options import CAPTURE_METHODS, CaptureOptions
from exfx.capture.symbolic import symbolic_capture
from exfx.errors import CaptureError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = ["capture", "check_eval_mode", "normalise_inputs", "dynamo_capture", "recover_parameters",
           "symbolic_capture", "TRACE_LOCK", "CAPTURE_METHODS", "CaptureOptions", "mha_fastpath_disabled",
           "relu_hiding_layers"]


def capture(model: torch.nn.Module, example_inputs: tuple[Any, ...] = (), leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, method: str = "auto",
            dynamic_shapes: Any = None) -> fx.GraphModule:
    """A private GraphModule of ``model``: the user's model is never modified.

    ``method="fx"`` uses ``torch.fx.symbolic_trace`` only, ``"dynamo"`` uses
    Dynamo only (see :mod:`exfx.capture.dynamo`), and ``"auto"`` (the default)
    tries symbolic tracing first and falls back to Dynamo when it fails, or when
    it keeps a ``torch.nn`` transformer module with a ReLU FFN opaque. ``dynamic_shapes`` applies to a
    Dynamo capture (:mod:`exfx.capture.shapes`); a symbolic trace is shape-generic already.
    """
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"exfx compiles torch.nn.Module instances, got {type(model).__name__}")
    if method not in CAPTURE_METHODS:
        raise ValueError(f"capture must be one of {CAPTURE_METHODS}, got {method!r}")
    check_eval_mode(model)
    private = _private_copy(model)
    if isinstance(private, fx.GraphModule):
        logger.debug("using the given GraphModule as captured")
        return private
    if method == "dynamo":
        return dynamo_capture(private, example_inputs, dynamic_shapes)
    try:
        traced = symbolic_capture(private, leaf_modules, concrete_args)
    except CaptureError as fx_error:
        if method == "fx" or leaf_modules or concrete_args:
            raise
        try:
            captured = dynamo_capture(private, example_inputs, dynamic_shapes)
        except CaptureError as dynamo_error:
            raise CaptureError(f"{fx_error} (The Dynamo fallback failed too: {dynamo_error})") from fx_error
        logger.info("symbolic tracing failed (%s); captured with Dynamo instead", fx_error)
        return captured
    hiding = _opaque_relu_modules(traced, leaf_modules)
    if not hiding:
        return traced
    if method == "auto" and not concrete_args and not leaf_modules:
        try:
            captured = dynamo_capture(private, example_inputs, dynamic_shapes)
        except CaptureError as dynamo_error:
            logger.warning("torch.fx keeps %s opaque, with ReLUs inside, and Dynamo could not capture the model "
                           "(%s); the ReLUs stay hidden", ", ".join(hiding), dynamo_error)
            return traced
        logger.info("torch.fx keeps %s opaque, with ReLUs inside; captured with Dynamo instead", ", ".join(hiding))
        return captured
    logger.warning("torch.fx keeps %s opaque, with ReLUs inside; capture='dynamo' (without leaf_modules or "
                   "concrete_args) sees them", ", ".join(hiding))
    return traced


def _opaque_relu_modules(gm: fx.GraphModule, leaf_modules: Sequence[str]) -> list[str]:
    """``call_module`` nodes of torch.nn transformer modules with a ReLU FFN, as "`name` (Class)"; the user's own
    ``leaf_modules`` are left out (kept opaque on purpose)."""
    return [f"`{node.target}` ({type(gm.get_submodule(str(node.target))).__name__})" for node in gm.graph.nodes
            if node.op == "call_module" and str(node.target) not in leaf_modules
            and relu_hiding_layers(gm.get_submodule(str(node.target)))]


def _private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers.

    The passes never write a weight in place: they assign new tensors to the private copy's attributes (folded
    BatchNorm, relaid weights), so the user's model is never modified, and a large model's weights are not
    held twice. The compiled module therefore reads the model's weights: change them, and compile again.

    Each tensor gets a new wrapper over the same memory, never the model's own object: torch.fx's tracer makes
    every access to a parameter of the module it traces return a proxy, process-wide, so a parameter object
    shared with another thread's module would turn into a proxy there while this one traces.
    """
    shared: dict[int, Any] = {id(b): b.detach() for b in model.buffers()}
    shared.update({id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()})
    return copy.deepcopy(model, memo=shared)
