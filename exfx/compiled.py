"""The module :func:`exfx.compile` returns: a ``torch.fx.GraphModule`` that fails clearly.

:class:`CompiledModule` is a GraphModule (it prints, re-traces, exports and runs
under ``torch.compile`` like any other). Calling it, positionally or by input
name, checks the inputs against the example inputs it was compiled with: their
names and number, and each tensor's device, dtype and rank. Any
other failure while running (a wrong feature size, say) is re-raised as
:class:`~exfx.errors.UnsupportedModelError` that shows the example and actual
inputs, with the first line of torch's message and the original exception
chained, instead of a bare traceback from deep inside torch.

A compiled module is for inference. Its outputs still require grad where the
weights do (as the original's would), but a backward through them raises
:class:`~exfx.errors.ExfxError` saying so (a hook on each output), as does a
backward through an ``exfx::`` reference op of a graph run directly: pruned neurons
and the native kernels have no gradient, so autograd would otherwise fail deep in
torch or, through the native kernels, leave gradients silently missing. Train the
original model.

Sizes: a Dynamo-captured graph holds for the sizes its
:class:`~exfx.capture.shapes.ShapeGuards` allow (every dimension the model's code left
symbolic varies freely). At sizes outside them, the module captures the original model
again with the same capture options, plan, config, lowering and dominance (logged at INFO),
keeps the result, and runs it; a later call at sizes some captured graph holds for (the
first, or one captured since) runs that graph, with no new capture. Recapture costs compile
time, never correctness; a model that rejects the new inputs itself fails as it would have
at compile time. A module that cannot capture again (it was unpickled, or built without its
model) refuses such sizes with a message that says why.

Example::

    >>> gm = exfx.compile(model, (x,))
    >>> gm(x.double())
    UnsupportedModelError: input 'x' has dtype torch.float64 (compiled for torch.float32); ...
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from exfx import ops  # noqa: F401  (the exfx:: reference ops, given a backward that refuses below)
from exfx.errors import ExfxError, UnsupportedModelError
from exfx.meta import INPUT_SIZES_KEY, INPUT_SPECS_KEY, RECAPTURE_KEY, SHAPE_GUARDS_KEY

logger = logging.getLogger(__name__)

__all__ = ["CompiledModule", "InputSpec", "Recapture"]



@dataclass(frozen=True)
class InputSpec:
    """What an example input looked like: enough to tell a caller what is expected.

    ``sizes`` gives, per dimension, the size the input must have (None: any);
    when it is None, only the rank is checked.
    """

    name: str
    shape: tuple[int, ...] | None  # None for a non-tensor input
    dtype: torch.dtype | None
    device: torch.device | None
    sizes: tuple[int | None, ...] | None = None

    @classmethod
    def of(cls, name: str, value: Any, sizes: tuple[int | None, ...] | None = None) -> InputSpec:
        if isinstance(value, torch.Tensor):
            return cls(name, tuple(value.shape), value.dtype, value.device, sizes)
        return cls(name, None, None, None)

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: non-tensor"
        return f"{self.name}: {_describe(self.dtype, self.shape, self.device)}"

    def problems(self, value: torch.Tensor) -> list[str]:
        """How ``value`` differs from what this input must be (empty when it fits)."""
        assert self.shape is not None
        problems = []
        if value.device != self.device:
            problems.append(f"device {value.device} (compiled for {self.device})")
        if value.dtype != self.dtype:
            problems.append(f"dtype {value.dtype} (compiled for {self.dtype})")
        if value.dim() != len(self.shape):
            problems.append(f"{value.dim()} dims (compiled for {len(self.shape)})")
        elif self.sizes is not None:
            fixed = [f"size {value.shape[d]} in dim {d} where the Dynamo-captured graph holds {size}"
                     for d, size in enumerate(self.sizes) if size is not None and value.shape[d] != size]
            if fixed:
                problems.append("; ".join(fixed) + ". Compile with example inputs of the sizes you will use (a "
                                "batch of at least 2 keeps the batch size free, unless the model's code depends on it)")
        return problems


class Recapture:
    """How a compiled module captures its model again at new input sizes, and the modules captured so far.

    ``build`` captures and compiles the original model (a reference to it, captured afresh, as it is then) at
    the given inputs with the arguments of the first compile (:func:`exfx.api` makes it). A deep copy of the
    compiled module gets a new record with the same ``build`` and no captures; a pickled one none (its module
    then refuses sizes its graph does not hold for).
    """

    #: Past this many captures of one module, each new one is logged as a warning: the shapes keep changing.
    WARN_AFTER = 8
    #: Input-size tuples remembered per module (which graph runs them); forgotten all at once past this.
    MAX_SEEN = 4096

    def __init__(self, build: Callable[[tuple[Any, ...]], CompiledModule]) -> None:
        self.build = build
        self.modules: list[CompiledModule] = []
        self.seen: dict[Any, Any] = {}
        self.lock = threading.Lock()

    def compile(self, inputs: tuple[Any, ...]) -> CompiledModule:
        """The model captured at ``inputs`` and compiled as before."""
        return self.build(inputs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Recapture:
        return Recapture(self.build)

    def __reduce__(self) -> Any:
        return (type(None), ())


def _describe(dtype: torch.dtype | None, shape: Any, device: torch.device | None) -> str:
    return f"{str(dtype).replace('torch.', '')}{list(shape)} on {device}"


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _describe(value.dtype, value.shape, value.device)
    return type(value).__name__


class CompiledModule(fx.GraphModule):
    """A GraphModule with input checks and clear errors (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...],
                 recapture: Recapture | None = None) -> None:
        super().__init__(gm, gm.graph, gm.__class__.__name__)
        self.meta.update(gm.meta)
        self.meta[RECAPTURE_KEY] = recapture
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # With shape guards, sizes are checked against them (and a new size may capture again), not fixed here.
        sizes = ((None,) * len(placeholders) if SHAPE_GUARDS_KEY in self.meta
                 else self.meta.get(INPUT_SIZES_KEY) or (None,) * len(placeholders))
        specs: list[InputSpec] = []
        examples = list(example_inputs)
        for node, required in zip(placeholders, sizes):
            name = str(node.target)
            if name.startswith("**"):
                continue
            if name.startswith("*"):  # *args takes the remaining example inputs
                specs += [InputSpec.of(f"{name[1:]}[{i}]", value) for i, value in enumerate(examples)]
                break
            if not examples:
                break
            specs.append(InputSpec.of(name, examples.pop(0), required))
        # In meta, not an attribute: GraphModule's deepcopy re-runs only GraphModule.__init__, but copies meta.
        self.meta[INPUT_SPECS_KEY] = tuple(specs)

    @property
    def exfx_inputs(self) -> tuple[InputSpec, ...]:
        """One :class:`InputSpec` per example input, in order."""
        return self.meta.get(INPUT_SPECS_KEY, ())

    def _positional_names(self) -> tuple[str, ...] | None:
        """The names of ``forward``'s inputs when it takes plain positional ones only (the common case, bound
        without ``inspect`` on every call), else None. Cached per instance."""
        cached = self.__dict__.get("_exfx_positional")
        if cached is None:
            parameters = inspect.signature(self.forward).parameters.values()
            plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
                        for p in parameters)
            cached = (tuple(p.name for p in parameters),) if plain else (None,)
            self.__dict__["_exfx_positional"] = cached
        return cached[0]

    def _bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Input name -> value, as ``forward`` would bind them; an exfx error when it would not."""
        names = self._positional_names()
        if names is not None and not kwargs and len(args) == len(names):
            return dict(zip(names, args))
        signature = inspect.signature(self.forward)
        parameters = signature.parameters
        kinds = {p.kind for p in parameters.values()}
        if inspect.Parameter.VAR_POSITIONAL not in kinds and len(args) > len(parameters):
            raise UnsupportedModelError(f"the compiled module takes {len(parameters)} positional inputs "
                                        f"({', '.join(parameters)}), got {len(args)}")
        unknown = [name for name in kwargs if name not in parameters]
        if unknown and inspect.Parameter.VAR_KEYWORD not in kinds:
            problem = f"no input named {', '.join(map(repr, unknown))}"
        else:
            try:
                bound = signature.bind(*args, **kwargs)
                problem = ""
            except TypeError as err:
                problem = str(err)
        if problem:
            raise UnsupportedModelError(f"the compiled module cannot take these inputs ({problem}); it takes "
                                        f"{', '.join(parameters)}, like the example inputs "
                                        f"[{'; '.join(s.describe() for s in self.exfx_inputs)}]")
        values = {}
        for name, value in bound.arguments.items():
            if parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
                values.update({f"{name}[{i}]": v for i, v in enumerate(value)})
            else:
                values[name] = value
        return values

    def _check_inputs(self, values: Mapping[str, Any]) -> None:
        for spec in self.exfx_inputs:
            if spec.shape is None or spec.name not in values:
                continue
            value = values[spec.name]
            if not isinstance(value, torch.Tensor):
                raise UnsupportedModelError(f"input {spec.name!r} is a {type(value).__name__}, not a tensor; call the "
                                            f"compiled module with inputs like the example: {spec.describe()}")
            problems = spec.problems(value)
            if problems:
                raise UnsupportedModelError(f"input {spec.name!r} has {', '.join(problems)}; "
                                            f"call the compiled module with inputs like the example: {spec.describe()}")

    def _select(self, values: Mapping[str, Any]) -> CompiledModule:
        """The module whose graph holds at these input sizes: this one, one captured again before, or a new
        capture (see the module docstring)."""
        guards = self.meta.get(SHAPE_GUARDS_KEY)
        if guards is None or torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return self
        shapes = tuple(tuple(values[s.name].shape) if s.shape is not None and s.name in values
                       and isinstance(values[s.name], torch.Tensor) else None for s in self.exfx_inputs)
        if any(not isinstance(size, int) for shape in shapes if shape is not None for size in shape):
            return self  # a tracer's symbolic sizes (torch.export of this module): the graph as it is
        recapture: Recapture | None = self.meta.get(RECAPTURE_KEY)
        seen = recapture.seen if recapture is not None else self.__dict__.setdefault("_exfx_seen", {})
        known = seen.get(shapes)
        if known is not None:
            if isinstance(known, Exception):
                raise UnsupportedModelError(str(known)) from known
            return known
        reason = guards.check(shapes)
        chosen: CompiledModule | None = self if not reason else None
        if chosen is None and recapture is not None:
            chosen = next((m for m in recapture.modules if not m.meta[SHAPE_GUARDS_KEY].check(shapes)), None)
        if chosen is None:
            chosen = self._recapture(values, shapes, reason, recapture)
        if len(seen) >= Recapture.MAX_SEEN:
            seen.clear()
        seen[shapes] = chosen
        return chosen

    def _recapture(self, values: Mapping[str, Any], shapes: tuple[Any, ...], reason: str,
                   recapture: Recapture | None) -> CompiledModule:
        """The model captured and compiled again at the call's sizes (``reason``: why this graph does not hold)."""
        described = ", ".join(f"{s.name}: {list(shape)}" for s, shape in zip(self.exfx_inputs, shapes)
                              if shape is not None)
        example = "; ".join(s.describe() for s in self.exfx_inputs)
        if recapture is None:
            raise UnsupportedModelError(
                f"the compiled module's graph does not hold at input sizes [{described}]: {reason}. It was captured "
                f"for [{example}] and cannot capture its model again (it was loaded from a file or built without "
                f"its model); compile with example inputs of these sizes")
        with recapture.lock:
            done = recapture.seen.get(shapes)
            if isinstance(done, CompiledModule):
                return done
            count = len(recapture.modules) + 1
            log = logger.warning if count > Recapture.WARN_AFTER else logger.info
            log("exfx: input sizes [%s] are outside what the captured graph holds for (%s); capturing the model "
                "again at these sizes (capture %d of this module)", described, reason, count)
            inputs = tuple(values[s.name] for s in self.exfx_inputs if s.name in values)
            try:
                module = recapture.compile(inputs)
            except ExfxError as err:  # the model rejects these inputs itself (or cannot be captured at them)
                recapture.seen[shapes] = err
                raise
            recapture.modules.append(module)
            return module

    def module_for(self, *args: Any, **kwargs: Any) -> CompiledModule:
        """The compiled module that runs these inputs: this one, or the one captured again at their sizes
        (captured now if none holds yet). Its graph is the one a call with these inputs runs."""
        values = self._bind(args, kwargs)
        self._check_inputs(values)
        return self._select(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = self._bind(args, kwargs)
        self._check_inputs(values)
        target = self._select(values)
        if target is not self:
            return target._run(args, kwargs, values)
        return self._run(args, kwargs, values)

    def _run(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
        try:
            if _hooked(self):  # nn.Module's call runs the hooks; without any it only adds per-call overhead
                outputs = super().__call__(*args, **kwargs)
            else:
                outputs = self.forward(*args, **kwargs)
            return (_inference_only(outputs, type(self).__name__, values.values()) if torch.is_grad_enabled()
                    else outputs)
        except ExfxError:
            raise
        except (RuntimeError, ValueError, IndexError) as err:
            message = str(err).strip()
            first_line = message.splitlines()[0] if message else type(err).__name__
            expected = "; ".join(s.describe() for s in self.exfx_inputs)
            given = "; ".join(f"{name}: {_describe_value(value)}" for name, value in values.items())
            raise UnsupportedModelError(
                f"the compiled module failed on inputs [{given}]: {first_line}. It was compiled for example "
                f"inputs [{expected}]") from err


def inference_only_message(what: str) -> str:
    """Why a backward through compiled ``what`` (a module, a site) fails, and what to do instead."""
    return (f"exfx compiled modules are for inference: backward through {what} is not supported (pruned "
            f"neurons and the native kernels have no gradient); train the original model and compile it "
            f"again, or run the compiled module under torch.no_grad()")


def _refuse(what: str) -> Callable[[torch.Tensor], None]:
    """A tensor hook that raises the exfx error when a gradient reaches the tensor it is on (not kept when the
    tensor is saved: a saved output has no autograd history to guard)."""
    @torch.utils.hooks.unserializable_hook
    def hook(grad: torch.Tensor) -> None:
        raise ExfxError(inference_only_message(what))

    return hook


def _refuse_backward_through(name: str) -> None:
    """Give the ``exfx::name`` reference op a backward that raises the exfx error, naming its site.

    For a graph run without :meth:`CompiledModule.__call__` (``gm.forward``, ``torch.compile``); every
    one of these ops takes its site's name as its last argument.
    """
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.site = inputs[-1]

    def backward(ctx: Any, *grads: Any) -> Any:
        raise ExfxError(inference_only_message(f"site {ctx.site!r} (exfx::{name})"))

    torch.library.register_autograd(f"exfx::{name}", backward, setup_context=setup_context)


for _name in ("partial_sum", "early_exit", "complete", "exact_exit", "dominance_linear"):
    _refuse_backward_through(_name)
del _name


def _inference_only(outputs: Any, model: str, inputs: Iterable[Any]) -> Any:
    """``outputs``, with a hook on each one that requires grad that raises the exfx error once a gradient
    reaches it: without it, autograd would run through the reference ops to torch's "no autograd formula"
    error, and through the native kernels to silently wrong (missing) gradients. A hook, not an autograd
    node, so that the outputs are neither copies nor views and take in-place ops as before. Leaves (a
    parameter returned as is) and the caller's own tensors passed through are left alone, as is every
    output while a tracer (Dynamo, export, jit) runs the module, whose graph must not hold the hook."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return outputs
    hook = _refuse(f"the compiled {model}")
    given = {id(value) for value in inputs}

    def guard(value: Any) -> None:
        if (type(value) is torch.Tensor and value.grad_fn is not None and value.requires_grad
                and id(value) not in given):
            value.register_hook(hook)

    if isinstance(outputs, torch.Tensor):  # the common case, without a tree walk
        guard(outputs)
    else:
        pytree.tree_map(guard, outputs)
    return outputs


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs any hook (its own or a global one), so it must go through ``nn.Module``."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    hooks = torch.nn.modules.module
    shared = (hooks._global_forward_hooks, hooks._global_forward_pre_hooks, hooks._global_backward_hooks,
              hooks._global_backward_pre_hooks)
    return any(own) or any(shared) or torch._C._get_tracing_state() is not None
