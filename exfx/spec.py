"""Model specs: ``module:factory`` strings naming a function that returns ``(model, example_inputs)``.

The ``exfx`` command and :func:`exfx.testing.assert_graph_matches` take a spec so
that a CI job can name a model without writing Python.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from exfx.capture import normalise_inputs
from exfx.errors import ExfxError

__all__ = ["load_spec", "DEFAULT_SPEC"]

DEFAULT_SPEC = "exfx.examples:small_cnn"


def load_spec(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Import ``module:factory`` and call it; returns ``(model, example_inputs)``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ExfxError(f"SPEC must look like 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ExfxError(f"cannot import {module_name!r} from SPEC {spec!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExfxError(f"{module_name!r} has no callable {attr!r} (SPEC {spec!r})")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ExfxError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, normalise_inputs(inputs)
