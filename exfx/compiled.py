"""The module :func:`exfx.compile` returns: a ``torch.fx.GraphModule`` that fails clearly.

:class:`CompiledModule` is a GraphModule (it prints, re-traces, exports and runs
under ``torch.compile`` like any other). Calling it checks the inputs against the
example inputs it was compiled with: the number of inputs, and each tensor's
device, dtype and rank. Any other failure while running (a wrong feature size,
say) is re-raised as :class:`~exfx.errors.UnsupportedModelError` that shows the
example and actual input shapes, with torch's own message and the original
exception chained, instead of a bare traceback from deep inside torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from exfx.errors import ExfxError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = ["CompiledModule", "InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """What an example input looked like: enough to tell a caller what is expected."""

    name: str
    shape: tuple[int, ...] | None  # None for a non-tensor input
    dtype: torch.dtype | None
    device: torch.device | None

    @classmethod
    def of(cls, name: str, value: Any) -> InputSpec:
        if isinstance(value, torch.Tensor):
            return cls(name, tuple(value.shape), value.dtype, value.device)
        return cls(name, None, None, None)

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: non-tensor"
        return f"{self.name}: {str(self.dtype).replace('torch.', '')}{list(self.shape)} on {self.device}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)} on {value.device}"
    return type(value).__name__


class CompiledModule(fx.GraphModule):
    """A GraphModule with input checks and clear errors (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
        super().__init__(gm, gm.graph, gm.__class__.__name__)
        self.meta.update(gm.meta)
        names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
        self.exfx_inputs = tuple(InputSpec.of(name, value) for name, value in zip(names, example_inputs))

    def _check_inputs(self, args: tuple[Any, ...]) -> None:
        specs = self.exfx_inputs
        if len(args) != len(specs):
            raise UnsupportedModelError(f"the compiled module takes {len(specs)} positional inputs "
                                        f"({', '.join(s.name for s in specs)}), got {len(args)}")
        for spec, value in zip(specs, args):
            if spec.shape is None or not isinstance(value, torch.Tensor):
                continue
            problems = []
            if value.device != spec.device:
                problems.append(f"device {value.device} (compiled for {spec.device})")
            if value.dtype != spec.dtype:
                problems.append(f"dtype {value.dtype} (compiled for {spec.dtype})")
            if value.dim() != len(spec.shape):
                problems.append(f"{value.dim()} dims (compiled for {len(spec.shape)})")
            if problems:
                raise UnsupportedModelError(f"input {spec.name!r} has {', '.join(problems)}; "
                                            f"call the compiled module with inputs like the example: {spec.describe()}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs:
            self._check_inputs(args)
        try:
            return super().__call__(*args, **kwargs)
        except ExfxError:
            raise
        except (RuntimeError, ValueError, IndexError) as err:
            first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            expected = "; ".join(s.describe() for s in self.exfx_inputs)
            given = "; ".join(_describe(a) for a in args)
            raise UnsupportedModelError(
                f"the compiled module failed on inputs [{given}]: {first_line}. It was compiled for example "
                f"inputs [{expected}]; only the batch size (and sizes the model itself allows) may differ") from err
