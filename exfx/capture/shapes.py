"""Dynamic dimensions of a Dynamo capture: which to mark, and the guards that say where a captured graph holds.

A Dynamo capture marks every dimension of every tensor input as dynamic (``maybe_mark_dynamic``), so that
Dynamo keeps a symbol (``s0``) wherever the model's code allows it, and specialises to the example's size
only where the code forces it (a size of 0 or 1, a reshape to a constant, a branch on a size). The user can
override that per dimension with ``dynamic_shapes=`` (:class:`exfx.CaptureOptions`), in
``torch.export``'s convention: per input (a mapping keyed by ``forward``'s argument name or position, or a
sequence in input order), a mapping ``{dim: spec}`` or a sequence with one spec per dimension, where a spec
is

* ``torch.export.Dim("name", min=, max=)`` or ``Dim.DYNAMIC``: must stay symbolic (capture fails with
  :class:`~exfx.errors.CaptureError` naming the dimension if the model's code fixes it);
* ``Dim.AUTO`` (the default for every dimension not named): symbolic where the code allows;
* ``None``, ``Dim.STATIC`` or an int: captured at the example's size.

After capture, :class:`ShapeGuards` records, per input dimension, its symbol (or the size it was specialised
to), each symbol's range and the shape guards Dynamo recorded (``s1 <= 64``: the code branched on a size).
:meth:`ShapeGuards.check` tells whether a call's sizes satisfy them all: then the graph computes what the
model would; otherwise :class:`~exfx.compiled.CompiledModule` captures the model again at those sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

logger = logging.getLogger(__name__)

__all__ = ["ShapeGuards", "check_dynamic_shapes", "mark_dynamic_dims", "shape_guards"]

AUTO, DYNAMIC, STATIC = "auto", "dynamic", "static"


def _spec_kind(spec: Any, where: str) -> tuple[str, int | None, int | None]:
    """``(kind, min, max)`` of one dimension's spec."""
    if spec is None or isinstance(spec, bool) and not spec:
        return STATIC, None, None
    if spec is True:
        return DYNAMIC, None, None
    if isinstance(spec, int):
        return STATIC, None, None
    from torch.export.dynamic_shapes import Dim, _DimHint, _DimHintType

    if isinstance(spec, _DimHint):
        kind = {_DimHintType.AUTO: AUTO, _DimHintType.DYNAMIC: DYNAMIC, _DimHintType.STATIC: STATIC}[spec.type]
        return kind, spec.min, spec.max
    if isinstance(spec, Dim):
        high = spec.max if isinstance(spec.max, int) and spec.max < 2 ** 62 else None
        return DYNAMIC, (spec.min or None), high
    raise TypeError(f"dynamic_shapes: {where} must be a torch.export.Dim, Dim.AUTO, Dim.DYNAMIC, Dim.STATIC, "
                    f"None or an int, got {spec!r}")


def _input_dims(spec: Any, where: str) -> dict[int, tuple[str, int | None, int | None]] | None:
    """One input's spec as ``{dim: (kind, min, max)}``; None for an input spec of None (every dim static)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        bad = [key for key in spec if not isinstance(key, int) or isinstance(key, bool)]
        if bad:
            raise TypeError(f"dynamic_shapes: {where} maps dimension indices (int) to Dims, got keys {bad!r}")
        return {int(dim): _spec_kind(value, f"{where}[{dim}]") for dim, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return {dim: _spec_kind(value, f"{where}[{dim}]") for dim, value in enumerate(spec)}
    kind = _spec_kind(spec, where)  # one Dim hint for every dimension (Dim.AUTO, Dim.STATIC)
    return {-1: kind}


def check_dynamic_shapes(value: Any) -> Any:
    """``value`` validated (the TypeError names the bad part): None, a mapping name/position -> spec, or a
    sequence of per-input specs. Returned as given, mappings copied."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        for key, spec in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"dynamic_shapes keys are forward() argument names or positions, got {key!r}")
            _input_dims(spec, f"input {key!r}")
        return dict(value)
    if isinstance(value, (list, tuple)):
        for position, spec in enumerate(value):
            _input_dims(spec, f"input {position}")
        return tuple(value)
    raise TypeError(f"dynamic_shapes must map forward() argument names (or positions) to per-dimension specs, "
                    f"or list one spec per input, like torch.export's; got {type(value).__name__}")


def mark_dynamic_dims(inputs: Sequence[Any], names: Sequence[str], dynamic_shapes: Any) -> dict[str, list[int]]:
    """Mark the dimensions of the tensors in ``inputs`` (aliases the caller owns) for Dynamo.

    ``names`` are the positional inputs' names. Every dimension not declared otherwise is marked
    ``maybe_mark_dynamic`` (sizes 0 and 1 are left to Dynamo, which specialises them). Returns, per input
    name, the dimensions declared dynamic (``Dim``/``Dim.DYNAMIC``), for the error when one specialises.

    Raises:
        ValueError: ``dynamic_shapes`` names an input that is not one of ``names`` or a dimension the input
            does not have.
    """
    per_input: list[Any] = [{} for _ in inputs]
    if isinstance(dynamic_shapes, Mapping):
        unknown = [key for key in dynamic_shapes
                   if not (key in names or isinstance(key, int) and 0 <= key < len(inputs))]
        if unknown:
            raise ValueError(f"dynamic_shapes names {unknown}, which are not inputs of forward(); its inputs are "
                             f"{list(names)}")
        for key, spec in dynamic_shapes.items():
            per_input[names.index(key) if isinstance(key, str) else key] = _input_dims(spec, f"input {key!r}")
    elif dynamic_shapes is not None:
        if len(dynamic_shapes) != len(inputs):
            raise ValueError(f"dynamic_shapes lists {len(dynamic_shapes)} inputs, but there are {len(inputs)} "
                             f"example inputs ({', '.join(names)})")
        per_input = [_input_dims(spec, f"input {i}") for i, spec in enumerate(dynamic_shapes)]
    declared: dict[str, list[int]] = {}
    for name, value, dims in zip(names, inputs, per_input):
        if not isinstance(value, torch.Tensor):
            continue
        if dims is None:  # the whole input declared static
            continue
        for key in dims:
            if key != -1 and not 0 <= key < value.dim():
                raise ValueError(f"dynamic_shapes: input {name!r} has {value.dim()} dimensions, no dimension {key}")
        for dim in range(value.dim()):
            kind, low, high = dims.get(dim, dims.get(-1, (AUTO, None, None)))
            if kind == STATIC:
                continue
            if kind == DYNAMIC:
                torch._dynamo.mark_dynamic(value, dim, min=low, max=high)
                declared.setdefault(name, []).append(dim)
            elif value.shape[dim] >= 2 or low is not None or high is not None:
                torch._dynamo.maybe_mark_dynamic(value, dim)
    return declared


def _hint(size: Any) -> int:
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


@dataclass(frozen=True)
class ShapeGuards:
    """Where a Dynamo-captured graph holds: per input, per dimension, its symbol or fixed size; the symbols'
    ranges; the shape guards Dynamo recorded.

    Attributes:
        dims: per graph input, None for a non-tensor, else per dimension an ``int`` (specialised: calls must
            have that size) or a sympy expression over the symbols (``s0``).
        ranges: per symbol, the sizes it was captured for (Dynamo assumes ``>= 2`` for a symbol).
        guards: the shape guards over the symbols that must hold (simplified, trivially true ones dropped).
        example: the example inputs' sizes.
    """

    dims: tuple[tuple[int | Any, ...] | None, ...]
    ranges: Mapping[Any, tuple[int, int | None]] = field(default_factory=dict)
    guards: tuple[Any, ...] = ()
    example: tuple[tuple[int, ...] | None, ...] = ()

    @property
    def fixed(self) -> tuple[tuple[int | None, ...] | None, ...]:
        """Per input the specialised size of each dimension, None where it is symbolic."""
        return tuple(None if dims is None else tuple(d if isinstance(d, int) else None for d in dims)
                     for dims in self.dims)

    @property
    def symbolic(self) -> bool:
        return any(not isinstance(d, int) for dims in self.dims if dims is not None for d in dims)

    def describe(self) -> str:
        """``x: [s0, 16]; mask: [s0, 16]``: which sizes are free (symbols) and which are fixed."""
        return "; ".join(f"input {i}: [{', '.join(map(str, dims))}]" for i, dims in enumerate(self.dims)
                         if dims is not None)

    def check(self, shapes: Sequence[tuple[int, ...] | None]) -> str:
        """Why the graph does not hold at these input sizes (one line), or ``""`` when it does."""
        if len(shapes) != len(self.dims):
            return f"{len(shapes)} inputs, not {len(self.dims)}"
        binding: dict[Any, int] = {}
        derived: list[tuple[Any, int, str]] = []
        for index, (dims, shape) in enumerate(zip(self.dims, shapes)):
            if dims is None or shape is None:
                continue
            if len(shape) != len(dims):
                return f"input {index} has {len(shape)} dimensions, not {len(dims)}"
            for dim, (want, size) in enumerate(zip(dims, shape)):
                where = f"dim {dim} of input {index}"
                if isinstance(want, int):
                    if size != want:
                        return f"{where} is {size}; the captured graph is specialised to {want}"
                elif isinstance(want, sympy.Symbol):
                    if binding.setdefault(want, size) != size:
                        return f"{where} is {size}, but the graph takes it equal to another size ({binding[want]})"
                else:
                    derived.append((want, size, where))
        for symbol, size in binding.items():
            low, high = self.ranges.get(symbol, (0, None))
            if size < low or (high is not None and size > high):
                return f"size {size} is outside the range [{low}, {high if high is not None else 'inf'}] " \
                       f"the graph was captured for ({symbol})"
        try:
            for expr, size, where in derived:
                value = expr.xreplace({s: sympy.Integer(v) for s, v in binding.items()})
                if value.free_symbols or int(value) != size:
                    return f"{where} is {size}, not {expr} = {value}"
            for guard in self.guards:
                value = guard.xreplace({s: sympy.Integer(v) for s, v in binding.items()})
                if getattr(value, "free_symbols", None) or not bool(value):
                    return f"the model's code checked {guard}, which does not hold here"
        except (TypeError, ValueError, ZeroDivisionError) as err:  # an undecidable guard: capture again
            return f"a shape guard could not be decided ({err})"
        return ""


def shape_guards(graph: fx.Graph) -> ShapeGuards:
    """The :class:`ShapeGuards` of a graph Dynamo captured (placeholders carrying fake ``example_value``\\ s)."""
    examples = [node.meta.get("example_value") for node in graph.nodes if node.op == "placeholder"]
    symbols = [size for value in examples if isinstance(value, torch.Tensor) for size in value.shape
               if isinstance(size, torch.SymInt)]
    shape_env = symbols[0].node.shape_env if symbols else None
    dims: list[tuple[Any, ...] | None] = []
    example: list[tuple[int, ...] | None] = []
    for value in examples:
        if not isinstance(value, torch.Tensor):
            dims.append(None)
            example.append(None)
            continue
        example.append(tuple(_hint(size) for size in value.shape))
        entry: list[Any] = []
        for size in value.shape:
            if isinstance(size, torch.SymInt):
                expr = shape_env.simplify(size.node.expr)
                entry.append(int(expr) if expr.is_Integer else expr)
            else:
                entry.append(int(size))
        dims.append(tuple(entry))
    if shape_env is None:
        return ShapeGuards(tuple(dims), {}, (), tuple(example))
    free = {s for entry in dims if entry is not None for d in entry if not isinstance(d, int) for s in d.free_symbols}
    ranges: dict[Any, tuple[int, int | None]] = {}
    for symbol in free:
        bounds = shape_env.var_to_range.get(symbol)
        low = int(bounds.lower) if bounds is not None and isinstance(bounds.lower, sympy.Integer) else 0
        high = int(bounds.upper) if bounds is not None and isinstance(bounds.upper, sympy.Integer) else None
        ranges[symbol] = (low, high)
    guards = []
    for guard in shape_env.guards:
        expr = shape_env.simplify(guard.expr)
        if expr.free_symbols and expr not in guards:
            guards.append(expr)
    return ShapeGuards(tuple(dims), ranges, tuple(guards), tuple(example))
