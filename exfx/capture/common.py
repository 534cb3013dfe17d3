"""What every capture path shares: the trace lock, the MHA fast-path switch, the eval-mode check, input normalisation.

The fast path: in eval mode (and under ``no_grad``) ``nn.TransformerEncoderLayer``
runs as one fused op (``torch._transformer_encoder_layer_fwd``) and
``nn.MultiheadAttention`` as another (``torch._native_multi_head_attention``).
A capture taken there hides the FFN's ``linear1 -> ReLU -> linear2`` (so no site)
and the attention projections, and ``FlopCounterMode`` counts neither.
:func:`mha_fastpath_disabled` switches it off for a capture or a FLOP count. That
is safe because the fast path is an optimisation of the same math: the slow path
computes the same function, op by op.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from exfx.errors import TrainingModeError, UnsupportedModelError

__all__ = ["TRACE_LOCK", "check_eval_mode", "mha_fastpath_disabled", "normalise_inputs", "relu_hiding_layers",
           "run_failure_message", "failing_module", "eager_failure"]


# Containers have no behaviour of their own, so their training flag cannot matter; torch.fx creates plain
# nn.Module containers (in training mode) for the module hierarchy of a traced GraphModule.
_CONTAINERS = (torch.nn.Module, torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict,
               torch.nn.ParameterList, torch.nn.ParameterDict)


#: torch.fx tracing patches ``nn.Module.__call__`` process-wide while it runs, so two traces in two
#: threads would see each other's modules; exfx serialises its captures (the rest of compile is per call).
TRACE_LOCK = threading.RLock()


class _FastPathState:
    """How many callers have the fast path switched off, and the flag they found (guarded by ``lock``).

    Its own lock, not :data:`TRACE_LOCK`: a ``count_flops`` in one thread must not wait for a whole
    capture in another, only for the counter update.
    """

    lock = threading.Lock()
    users = 0
    saved = True


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Run the body with ``torch.backends.mha`` 's fast path off; the flag is restored afterwards, even on error.

    The flag is process-wide, so nested and concurrent callers share one switch:
    the first to enter saves the flag and turns it off, the last to leave puts the
    saved value back (the counter has its own lock). Another
    thread running a transformer meanwhile takes the slow path: same math, slower.
    """
    with _FastPathState.lock:
        if _FastPathState.users == 0:
            _FastPathState.saved = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _FastPathState.users += 1
    try:
        yield
    finally:
        with _FastPathState.lock:
            _FastPathState.users -= 1
            if _FastPathState.users == 0:
                torch.backends.mha.set_fastpath_enabled(_FastPathState.saved)


#: torch.nn's transformer layers, whose FFN runs ``linear1 -> activation -> linear2`` inside the module.
_TRANSFORMER_LAYERS = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)


def relu_hiding_layers(module: torch.nn.Module) -> list[str]:
    """The qualified names of ``module``'s transformer layers (itself included, as ``""``) with a ReLU FFN.

    torch.fx keeps every ``torch.nn`` module opaque, so a capture holding one of
    these as a ``call_module`` node hides the ReLUs of the layers listed here.
    """
    return [name for name, layer in module.named_modules()
            if isinstance(layer, _TRANSFORMER_LAYERS) and _is_relu(getattr(layer, "activation", None))]


def _is_relu(activation: Any) -> bool:
    return activation is torch.relu or activation is torch.nn.functional.relu or isinstance(activation, torch.nn.ReLU)


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


def run_failure_message(where: str | None, err: BaseException) -> str:
    """One line for a model that fails on its example inputs: where, its own error's first line, what to check.

    ``where`` names the module or op, e.g. ```fc1` (Linear)``; ``None`` when not known.
    """
    lines = str(err).strip().splitlines()
    cause = lines[0].strip() if lines else type(err).__name__
    if len(cause) > 200:
        cause = cause[:197] + "..."
    at = f" at {where}" if where else ""
    return (f"running the model on example_inputs failed{at}: {cause}; "
            f"check that example_inputs are what forward() expects")


def failing_module(model: torch.nn.Module, err: BaseException) -> str | None:
    """```fc1` (Linear)``: the innermost submodule of ``model`` whose code ``err``'s traceback passes through."""
    names = {id(module): name for name, module in model.named_modules()}
    where = None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            name = names[id(owner)]
            where = f"`{name}` ({type(owner).__name__})" if name else f"the model's forward ({type(owner).__name__})"
        tb = tb.tb_next
    return where


def eager_failure(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> UnsupportedModelError | None:
    """The exfx error for ``model`` failing to run on ``example_inputs`` eagerly (``no_grad``), or None if it runs."""
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as err:  # noqa: BLE001 - whatever the model raised is the user's error, reported in one line
        failure = UnsupportedModelError(run_failure_message(failing_module(model, err), err))
        failure.__cause__ = err
        return failure
    return None
