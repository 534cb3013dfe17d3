"""What every capture path shares: the trace lock, the eval-mode check and input normalisation."""

from __future__ import annotations

import threading
from typing import Any

import torch

from exfx.errors import TrainingModeError, UnsupportedModelError

__all__ = ["TRACE_LOCK", "check_eval_mode", "normalise_inputs"]


# Containers have no behaviour of their own, so their training flag cannot matter; torch.fx creates plain
# nn.Module containers (in training mode) for the module hierarchy of a traced GraphModule.
_CONTAINERS = (torch.nn.Module, torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict,
               torch.nn.ParameterList, torch.nn.ParameterDict)


#: torch.fx tracing patches ``nn.Module.__call__`` process-wide while it runs, so two traces in two
#: threads would see each other's modules; exfx serialises its captures (the rest of compile is per call).
TRACE_LOCK = threading.RLock()


def check_eval_mode(model: torch.nn.Module) -> None:
    """Raise :class:`TrainingModeError` if any submodule is in training mode."""
    for name, module in model.named_modules():
        if module.training and type(module) not in _CONTAINERS:
            where = f"submodule {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
            raise TrainingModeError(f"{where} is in training mode; exfx compiles inference only. "
                                    f"Call model.eval() before exfx.compile/explain.")


def normalise_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """A single tensor or a sequence of inputs -> a tuple of positional inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UnsupportedModelError(f"example_inputs must be a tensor or a tuple of positional inputs, "
                                f"got {type(example_inputs).__name__}")
