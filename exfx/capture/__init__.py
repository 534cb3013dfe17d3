"""Capture: an ``nn.Module`` (or an existing ``GraphModule``) -> a private ``torch.fx.GraphModule``.

exfx compiles eval-mode inference only, so a model in training mode is refused.
The model is deep-copied first: later passes fold BatchNorm into weights and must
never touch the user's parameters.

``torch.fx.symbolic_trace`` is the capture. When it fails (untraceable calls,
``**kwargs`` plumbing, Python control flow), exfx falls back to capturing the
model with Dynamo (:mod:`exfx.capture.dynamo`), which handles much more, such as
Hugging Face models. When both fail (data-dependent control flow),
:class:`~exfx.errors.CaptureError` names the module being traced and the line of
user code that failed, and suggests the fixes: ``leaf_modules=[...]`` to keep a
module opaque, ``concrete_args={...}`` to fix a Python argument, or tracing the
model yourself and passing the GraphModule.

The stages: :mod:`.common` (trace lock, eval-mode check, input normalisation),
:mod:`.symbolic` (symbolic tracing) and :mod:`.dynamo` (the Dynamo fallback); this
package's :func:`capture` picks one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from exfx.capture.common import TRACE_LOCK, check_eval_mode, normalise_inputs
from exfx.capture.dynamo import dynamo_capture, recover_parameters
from exfx.capture.symbolic import symbolic_capture
from exfx.errors import CaptureError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = ["capture", "check_eval_mode", "normalise_inputs", "dynamo_capture", "recover_parameters",
           "symbolic_capture", "TRACE_LOCK", "CAPTURE_METHODS"]


CAPTURE_METHODS = ("auto", "fx", "dynamo")


def capture(model: torch.nn.Module, example_inputs: tuple[Any, ...] = (), leaf_modules: Sequence[str] = (),
            concrete_args: Mapping[str, Any] | None = None, method: str = "auto") -> fx.GraphModule:
    """A private GraphModule of ``model``: the user's model is never modified.

    ``method="fx"`` uses ``torch.fx.symbolic_trace`` only, ``"dynamo"`` uses
    Dynamo only (see :mod:`exfx.capture.dynamo`), and ``"auto"`` (the default)
    tries symbolic tracing first and falls back to Dynamo when it fails.
    """
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"exfx compiles torch.nn.Module instances, got {type(model).__name__}")
    if method not in CAPTURE_METHODS:
        raise ValueError(f"capture must be one of {CAPTURE_METHODS}, got {method!r}")
    check_eval_mode(model)
    private = copy.deepcopy(model)
    if isinstance(private, fx.GraphModule):
        logger.debug("using the given GraphModule as captured")
        return private
    if method == "dynamo":
        return dynamo_capture(private, example_inputs)
    try:
        return symbolic_capture(private, leaf_modules, concrete_args)
    except CaptureError as fx_error:
        if method == "fx" or leaf_modules or concrete_args:
            raise
        try:
            captured = dynamo_capture(private, example_inputs)
        except CaptureError as dynamo_error:
            raise CaptureError(f"{fx_error} (The Dynamo fallback failed too: {dynamo_error})") from fx_error
        logger.info("symbolic tracing failed (%s); captured with Dynamo instead", fx_error)
        return captured
