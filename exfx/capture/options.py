"""The capture options: how a model is captured and which of its inputs carry hidden activations.

One frozen :class:`CaptureOptions` is the bundle that :func:`exfx.analyse`, :func:`exfx.explain` and
:func:`exfx.compile` build from their ``leaf_modules``/``concrete_args``/``hidden_inputs``/``capture``
keywords (or take whole, as ``capture_options=``), and that every tuner in :mod:`exfx.tune`
(``capture_options=``) and the ``torch.compile`` backend hand on to :func:`exfx.analyse`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from exfx.capture.shapes import check_dynamic_shapes

__all__ = ["CaptureOptions", "CAPTURE_METHODS"]

#: What ``capture=`` takes: symbolic tracing with the Dynamo fallback, symbolic tracing only, or Dynamo only.
CAPTURE_METHODS = ("auto", "fx", "dynamo")


def _names(field: str, value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of names; a TypeError naming ``field`` if it is a bare string or holds a non-string."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{field} must be a sequence of names, e.g. [{'features'!r}], got {value!r}")
    names = tuple(value)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{field} must hold names (str), got {bad!r}")
    return names


@dataclass(frozen=True)
class CaptureOptions:
    """How :func:`exfx.analyse` captures a model; every field is the keyword of the same name there.

    Attributes:
        leaf_modules: qualified names of submodules to keep opaque when tracing.
        concrete_args: passed to ``torch.fx`` tracing to fix Python arguments (None: none).
        hidden_inputs: names of ``forward()`` arguments that carry hidden activations
            (for example a backbone's features, when compiling only a head); their axes may
            then be exchangeable. Other inputs are pinned.
        capture: ``"auto"`` (``torch.fx.symbolic_trace``, falling back to Dynamo when it
            fails), ``"fx"`` or ``"dynamo"``.
        dynamic_shapes: for a Dynamo capture, which input dimensions are dynamic, in
            ``torch.export``'s convention: a mapping from ``forward()`` argument names (or
            positions) to ``{dim: torch.export.Dim(...)}`` (or a sequence, one spec per dim), or a
            sequence with one such spec per input. ``Dim(...)``/``Dim.DYNAMIC``: must stay
            symbolic; ``Dim.AUTO``: symbolic where the code allows; ``None``/``Dim.STATIC``:
            the example's size. Every dimension not named is ``Dim.AUTO`` (None: all of them).
            See :mod:`exfx.capture.shapes`.

    Raises:
        TypeError: ``leaf_modules`` or ``hidden_inputs`` is not a sequence of names,
            ``concrete_args`` is not a mapping, or ``dynamic_shapes`` is malformed (the message
            names the field).
        ValueError: ``capture`` is not one of ``"auto"``, ``"fx"``, ``"dynamo"``.
    """

    leaf_modules: tuple[str, ...] = ()
    concrete_args: Mapping[str, Any] | None = None
    hidden_inputs: tuple[str, ...] = ()
    capture: str = "auto"
    dynamic_shapes: Mapping[Any, Any] | Sequence[Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dynamic_shapes", check_dynamic_shapes(self.dynamic_shapes))
        object.__setattr__(self, "leaf_modules", _names("leaf_modules", self.leaf_modules))
        object.__setattr__(self, "hidden_inputs", _names("hidden_inputs", self.hidden_inputs))
        if self.concrete_args is not None:
            if not isinstance(self.concrete_args, Mapping):
                raise TypeError(f"concrete_args must map forward() argument names to values, got "
                                f"{type(self.concrete_args).__name__}")
            object.__setattr__(self, "concrete_args", dict(self.concrete_args))
        if self.capture not in CAPTURE_METHODS:
            raise ValueError(f"capture must be one of {CAPTURE_METHODS}, got {self.capture!r}")

    @classmethod
    def of(cls, value: CaptureOptions | Mapping[str, Any] | None) -> CaptureOptions:
        """``value`` as capture options: itself, the defaults for None, or built from a mapping of its fields.

        Raises:
            ValueError: a mapping names a key that is not a field (the message lists the fields).
            TypeError: ``value`` is neither.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"capture_options takes the capture options of exfx.compile {known}, "
                                 f"got {unknown}")
            return cls(**value)
        raise TypeError(f"capture_options must be an exfx.CaptureOptions or a dict of its fields, got "
                        f"{type(value).__name__}")

    @property
    def is_default(self) -> bool:
        """Whether these are the defaults (an already captured :class:`exfx.Analysis` takes no other)."""
        return self == CaptureOptions()
