"""Capture with ``torch.fx.symbolic_trace``, with errors that name the failing module and user line.

An argument fixed by ``concrete_args`` keeps its placeholder (torch.fx asserts
the fixed value), which then defaults to that value, so the captured module runs
on ``example_inputs`` alone.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import PH

from exfx.capture.common import TRACE_LOCK, mha_fastpath_disabled
from exfx.errors import CaptureError

logger = logging.getLogger(__name__)

__all__ = ["symbolic_capture"]


class _PathTracer(fx.Tracer):
    """A tracer that remembers which module it is inside, for error messages."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.exfx_path_stack: list[str] = []
        #: The innermost module whose tracing raised (the stack is unwound by the time the error is caught).
        self.exfx_failed_path: str | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_names or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.exfx_path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.exfx_failed_path is None:
                self.exfx_failed_path = path
            raise
        finally:
            self.exfx_path_stack.pop()


# Where torch and exfx live: frames from there are not the user's code (a path merely containing "exfx" may be).
_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
                 os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch and exfx: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS)]
    if not frames:
        return ""
    frame = frames[-1]
    code = f": {frame.line.strip()}" if frame.line else ""
    return f" at `{frame.name}` line {frame.lineno}{code}"


def symbolic_capture(model: torch.nn.Module, leaf_modules: Sequence[str],
           concrete_args: Mapping[str, Any] | None) -> fx.GraphModule:
    unknown = [name for name in leaf_modules if name not in dict(model.named_modules())]
    if unknown:
        raise CaptureError(f"leaf_modules names {unknown} that are not submodules of the model")
    tracer = _PathTracer(leaf_modules)
    try:
        with TRACE_LOCK, mha_fastpath_disabled():  # see exfx.capture.common: no fused transformer op
            graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as err:  # symbolic tracing raises many types; all mean the same to the user
        failed = tracer.exfx_failed_path
        where = f"module {failed!r}" if failed else "the model's forward"
        leaf_hint = f"exfx.compile(..., leaf_modules=[{failed!r}]) to keep it opaque, " if failed else ""
        raise CaptureError(
            f"torch.fx.symbolic_trace failed in {where}{_user_frame(err)}: {type(err).__name__}: {err}. "
            f"Fix: pass {leaf_hint}concrete_args={{...}} to fix Python-valued arguments, or trace the "
            f"model yourself and pass the torch.fx.GraphModule.") from err
    if concrete_args:
        _default_to_concrete(model, graph, concrete_args)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _default_to_concrete(model: torch.nn.Module, graph: fx.Graph, concrete_args: Mapping[str, Any]) -> None:
    """Make each fixed argument's placeholder default to its fixed value.

    torch.fx keeps a placeholder for a fixed argument, with the signature's
    default and an assert that the fixed value is passed; the captured module
    must run on ``example_inputs`` alone.
    """
    parameters = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(parameters) != len(placeholders):
        return
    for parameter, node in zip(parameters, placeholders):
        value = concrete_args.get(parameter.name, PH)
        if value is not PH and not isinstance(value, torch.Tensor):
            node.args = (value,)
