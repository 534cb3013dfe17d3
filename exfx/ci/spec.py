"""Model specs: ``module:factory`` strings naming a function that returns ``(model, example_inputs)``.

The ``exfx`` command and :func:`exfx.testing.assert_graph_matches` take a spec so
that a CI job can name a model without writing Python. The module is imported
from ``sys.path`` or, failing that, from the current directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch

from exfx.capture import normalise_inputs
from exfx.errors import ExfxError

__all__ = ["load_spec", "DEFAULT_SPEC"]

DEFAULT_SPEC = "exfx.examples:small_cnn"


def _import(module_name: str) -> Any:
    """Import ``module_name``; a module not found on ``sys.path`` is looked for in the current directory.

    ``python -m exfx`` has the current directory on ``sys.path``, but the ``exfx``
    console script (and pytest run as ``pytest``) does not, and a CI job names
    the project's own, uninstalled, modules.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        here = os.getcwd()
        if err.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
    sys.path.append(here)
    return importlib.import_module(module_name)


def load_spec(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Import ``module:factory`` and call it; returns ``(model, example_inputs)``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ExfxError(f"SPEC must look like 'package.module:factory', got {spec!r}")
    try:
        module = _import(module_name)
    except ImportError as err:
        raise ExfxError(f"cannot import {module_name!r} from SPEC {spec!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExfxError(f"{module_name!r} has no callable {attr!r} (SPEC {spec!r})")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        got = (f"({', '.join(type(v).__name__ for v in result)})" if isinstance(result, tuple)
               else type(result).__name__)
        raise ExfxError(f"{spec} must return (model, example_inputs) with model a torch.nn.Module, got {got}")
    model, inputs = result
    return model, normalise_inputs(inputs)
