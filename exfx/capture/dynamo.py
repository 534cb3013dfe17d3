"""Capture through Dynamo: the fallback for models ``torch.fx.symbolic_trace`` cannot trace.

Dynamo (``torch.compile``'s front end) captures a model by running its Python
bytecode, so it handles much that symbolic tracing cannot: Hugging Face models,
``**kwargs`` plumbing, Python control flow on non-tensor values. Its graph is at
the same level as ``torch.fx``'s (``F.linear``, ``torch.relu``), but it lifts
parameters and buffers to graph inputs (``L_self_modules_fc1_parameters_weight_``).
:func:`recover_parameters` puts them back as ``get_attr`` nodes under their
dotted paths (``fc1.weight``), taken from Dynamo's record of where each input
came from, so that site names are the same however the model was captured; a
parameter is registered as a parameter and a buffer as a buffer. The
torch.compile backend uses it too.

A captured graph takes the model's tensor inputs, under the names of
``forward``'s arguments. It returns a tensor where the model returns one, and
otherwise every tensor of the model's output, in order, as a tuple: a model
returning a dict or a dataclass (a Hugging Face ``ModelOutput``) returns a tuple
after capture. The tensors of an object it cannot look into (a ``DynamicCache``)
come last.

Shapes: every dimension of every tensor input is captured symbolically where the
model's code allows (:mod:`exfx.capture.shapes`; ``dynamic_shapes=`` declares
dimensions dynamic or static, in ``torch.export``'s convention), so the graph runs
at any batch size, sequence length, node or edge count. Where the code fixes a
size (a size of 0 or 1, a reshape to a constant, a branch on ``x.shape[1]``),
the graph holds the example's size; the graph's ``meta`` records where it holds
(:class:`~exfx.capture.shapes.ShapeGuards`), and the compiled module captures the
model again at other sizes. A graph break (data-dependent control flow) makes
capture fail with :class:`~exfx.errors.CaptureError`; a model that does not run on
its example inputs even eagerly, with :class:`~exfx.errors.UnsupportedModelError`
naming the submodule that failed.

Example::

    >>> gm = dynamo_capture(hf_model.eval(), (input_ids,))
    >>> [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    ['input_ids']
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from exfx.capture.common import TRACE_LOCK, eager_failure, mha_fastpath_disabled
from exfx.errors import CaptureError, ExfxError, TrainingModeError
from exfx.capture.shapes import mark_dynamic_dims, shape_guards
from exfx.meta import INPUT_SIZES_KEY, SHAPE_GUARDS_KEY

logger = logging.getLogger(__name__)

__all__ = ["dynamo_capture", "recover_parameters"]

_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def _source_path(source: Any) -> tuple[str, bool]:
    """The dotted attribute path a Dynamo source denotes, and whether it is a parameter or buffer."""
    parts: list[str] = []
    is_state = False
    while source is not None:
        kind = type(source).__name__
        if "ParamBuffer" in kind:
            is_state = True
        member = getattr(source, "member", None)
        index = getattr(source, "index", None)
        if member is not None:
            if member in ("_parameters", "_buffers"):
                is_state = True
            if member not in _CONTAINERS:
                parts.append(str(member))
        elif index is not None and "GetItem" in kind:
            parts.append(str(index))
        source = getattr(source, "base", None)
    return ".".join(reversed(parts)), is_state


def _size_of(source: Any) -> tuple[Any, int] | None:
    """``(tensor source, dim)`` when ``source`` denotes one dimension's size of a tensor."""
    prop = getattr(source, "prop", None)
    if type(source).__name__ == "TensorPropertySource" and getattr(prop, "name", None) == "SIZE":
        return source.base, int(source.idx)
    return None


def _set_tensor(root: torch.nn.Module, path: str, value: torch.Tensor) -> None:
    *modules, leaf = path.split(".")
    owner = root
    for name in modules:
        if not hasattr(owner, name):
            owner.add_module(name, torch.nn.Module())
        owner = getattr(owner, name)
    if isinstance(value, torch.nn.Parameter):
        # A parameter stays a parameter: the analysis tells stored constants (buffers) from weights.
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
    else:
        owner.register_buffer(leaf, value.detach(), persistent=True)


def _model_input_names() -> set[str] | None:
    """In a graph-break resume frame, the names of the model's own ``forward`` arguments.

    None when this graph is not a resume frame (or Dynamo's frame is not visible):
    then every graph input is treated as a model input.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        if not tx.f_code.co_name.startswith("torch_dynamo_resume_in_"):
            return None
        owner = tx.f_locals.get("self")
    except Exception:  # noqa: BLE001 - private Dynamo API; fall back to the conservative answer
        return None
    if not isinstance(owner, torch.nn.Module):
        return None
    return set(inspect.signature(owner.forward).parameters)


def recover_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any], input_names: Sequence[str] | None = None
                       ) -> tuple[fx.GraphModule, list[int], list[str]]:
    """Turn Dynamo's lifted parameter inputs back into ``get_attr`` nodes with their dotted paths.

    A symbolic size input (``s0``, the batch size of ``x``) becomes ``x.size(0)``
    when its tensor is an input too, so the graph runs on tensors alone. The
    inputs left are named after the local variables they come from (``x``, not
    Dynamo's ``L_x_``), or ``input_names`` when given (one per input left), so
    that ``hidden_inputs`` and error messages use the names of ``forward``'s
    arguments.

    Returns the new GraphModule (eval mode), the indices of the inputs it still
    takes, and the names of those inputs that carry hidden activations: in a
    graph-break resume frame, the locals that are not the model's own inputs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ExfxError(f"exfx: the Dynamo graph has {len(placeholders)} inputs but came with "
                        f"{len(example_inputs)} example inputs")
    sources = [getattr(node.meta.get("grapharg"), "source", None) for node in placeholders]
    state: dict[int, str] = {}
    for index, (source, value) in enumerate(zip(sources, example_inputs)):
        path, is_state = _source_path(source) if source is not None else ("", False)
        if is_state and path and isinstance(value, torch.Tensor):
            state[index] = path
    tensors = {source: index for index, (source, value) in enumerate(zip(sources, example_inputs))
               if source is not None and isinstance(value, torch.Tensor)}
    sizes: dict[int, tuple[int, int]] = {}
    for index, (source, value) in enumerate(zip(sources, example_inputs)):
        size = _size_of(source) if not isinstance(value, torch.Tensor) else None
        if size is not None and size[0] in tensors:
            sizes[index] = (tensors[size[0]], size[1])
    kept = [i for i in range(len(placeholders)) if i not in state and i not in sizes]
    if input_names is not None and len(input_names) != len(kept):
        input_names = None  # the caller's check on the inputs reports the mismatch

    model_inputs = _model_input_names()
    root = torch.nn.Module()
    graph = fx.Graph()  # a new graph: Dynamo reads the one it handed over to decide what to pass at run time
    env: dict[fx.Node, fx.Node] = {}
    hidden: list[str] = []
    for position, index in enumerate(kept):
        node, value = placeholders[index], example_inputs[index]
        local = getattr(sources[index], "local_name", None)
        name = input_names[position] if input_names is not None else (
            local if isinstance(local, str) and local.isidentifier() else str(node.target))
        env[node] = graph.placeholder(name, type_expr=node.type)
        env[node].meta.update(node.meta)
        if model_inputs is not None and local and local not in model_inputs and isinstance(value, torch.Tensor):
            hidden.append(str(env[node].target))
    for index, path in state.items():
        _set_tensor(root, path, example_inputs[index])
        env[placeholders[index]] = graph.get_attr(path)
        env[placeholders[index]].meta.update({k: v for k, v in placeholders[index].meta.items() if k != "grapharg"})
    for index, (tensor, dim) in sizes.items():
        env[placeholders[index]] = graph.call_method("size", (env[placeholders[tensor]], dim))
    graph.output(graph.graph_copy(gm.graph, env))
    _check_inference(graph)
    recovered = fx.GraphModule(root, graph, "ExfxDynamoGraph").eval()
    recovered.graph.lint()
    return recovered, kept, hidden


#: Functions whose behaviour depends on a training flag: the flag's (name, position, default).
_TRAINING_FLAGS: dict[Any, tuple[str, int, bool | None]] = {
    F.batch_norm: ("training", 5, False), torch.batch_norm: ("training", 5, None),
    F.dropout: ("training", 2, True), F.dropout1d: ("training", 2, True), F.dropout2d: ("training", 2, True),
    F.dropout3d: ("training", 2, True), F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False), torch.dropout: ("train", 2, None),
    torch.alpha_dropout: ("train", 2, None), torch.feature_dropout: ("train", 2, None),
    torch.feature_alpha_dropout: ("train", 2, None),
}


def _check_inference(graph: fx.Graph) -> None:
    """Refuse a graph that runs BatchNorm or any dropout in training mode."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _TRAINING_FLAGS:
            continue
        name, position, default = _TRAINING_FLAGS[node.target]
        training = node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
        if training:
            raise TrainingModeError(f"exfx backend: node `{node.name}` ({getattr(node.target, '__name__', '?')}) "
                                    f"runs in training mode; exfx compiles inference only. Call model.eval().")


def _argument_names(model: torch.nn.Module, count: int) -> list[str]:
    """The names ``forward``'s parameters give the first ``count`` positional inputs."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = next((p.name for p in parameters if p.kind is p.VAR_POSITIONAL), "input")
    return [positional[i] if i < len(positional) else f"{rest}_{i - len(positional)}" for i in range(count)]


def _call(model: torch.nn.Module, *inputs: Any) -> Any:
    return model(*inputs)


def dynamo_capture(model: torch.nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any = None
                   ) -> fx.GraphModule:
    """Capture ``model`` as one graph with Dynamo, parameters as ``get_attr`` nodes.

    The graph must take exactly the tensor ``example_inputs``, in order; its
    inputs are named after ``forward``'s arguments. The caller's tensors and
    Dynamo's caches for the model's code are left untouched: the capture runs
    through a throwaway function, whose cache entry goes with it. ``dynamic_shapes``: see
    :mod:`exfx.capture.shapes` (None: every dimension symbolic where the model's code allows).
    """
    captured: dict[str, Any] = {}
    names = [name for name, value in zip(_argument_names(model, len(example_inputs)), example_inputs)
             if isinstance(value, torch.Tensor)]
    # Aliases carry the dynamic-dimension marks, so the caller's tensors are not marked.
    aliases = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in example_inputs)
    expected = [v for v in aliases if isinstance(v, torch.Tensor)]
    positional = _argument_names(model, len(example_inputs))
    declared = mark_dynamic_dims(aliases, positional, dynamic_shapes)

    def grab(gm: fx.GraphModule, inputs: list[Any]) -> Any:
        captured["gm"], kept, _ = recover_parameters(gm, inputs, names)
        captured["inputs"] = [inputs[i] for i in kept]

        def run(*args: Any) -> Any:
            captured["outputs"] = gm.forward(*args)
            return captured["outputs"]

        return run

    # A new code object per capture: Dynamo caches compiled frames per code object, so capturing through
    # the model's own forward would fill (and, after 8 captures, exhaust) the cache of the user's model class.
    capture_fn = types.FunctionType(_call.__code__.replace(co_name="exfx_dynamo_capture"), _call.__globals__,
                                    "exfx_dynamo_capture")
    try:
        # Automatic dynamic shapes off: sizes seen in earlier captures (of other models) must not matter.
        # The MHA fast path off: the graph then holds the transformer layers op by op, not as one fused op.
        # Duck shaping off: two dimensions of the same example size (16 tokens at batch 16) stay two symbols.
        with (TRACE_LOCK, mha_fastpath_disabled(), torch.no_grad(),
              torch._dynamo.config.patch(automatic_dynamic_shapes=False),
              torch.fx.experimental._config.patch(use_duck_shape=False)):
            output = torch.compile(capture_fn, backend=grab, fullgraph=True)(model, *aliases)
    except ExfxError:
        raise
    except Exception as err:  # Dynamo raises many types; all mean "cannot capture as one graph"
        if declared and "Constraint" in type(err).__name__:
            dims = ", ".join(f"{name}[{', '.join(map(str, d))}]" for name, d in declared.items())
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CaptureError(f"dynamic_shapes declares {dims} dynamic, but the model's code fixes a size among "
                               f"them ({message}); declare it Dim.AUTO or None instead") from err
        failure = eager_failure(model, example_inputs)  # unless the model does not run on these inputs at all
        if failure is not None:
            raise failure from failure.__cause__
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if dynamic_shapes is None and any(isinstance(v, torch.Tensor) and v.dim() > 1 for v in example_inputs):
            # Symbolic sizes everywhere can take Dynamo where it cannot go (an op without a symbolic-size rule):
            # capture again with only the leading dimensions symbolic, as before dimensions were all dynamic.
            logger.info("Dynamo could not capture the model with every dimension symbolic (%s: %s); capturing "
                        "with only the leading dimensions symbolic", type(err).__name__, message)
            leading = tuple([torch.export.Dim.AUTO] + [None] * (v.dim() - 1) if isinstance(v, torch.Tensor)
                            and v.dim() else None for v in example_inputs)
            return dynamo_capture(model, example_inputs, leading)
        raise CaptureError(f"Dynamo could not capture the model as one graph: {type(err).__name__}: {message}") from err
    if "gm" not in captured:
        raise CaptureError("Dynamo captured no graph (the forward has no tensor operations)")
    graph_inputs = captured["inputs"]
    if len(graph_inputs) != len(expected) or any(a is not b for a, b in zip(graph_inputs, expected)):
        raise CaptureError(f"the Dynamo graph takes {len(graph_inputs)} inputs, not the {len(expected)} tensor "
                           f"example inputs in their order (an input is unused or not a tensor); pass only the "
                           f"tensors forward() uses, as positional example inputs")
    gm: fx.GraphModule = captured["gm"]
    guards = shape_guards(gm.graph)
    gm.meta[SHAPE_GUARDS_KEY] = guards
    gm.meta[INPUT_SIZES_KEY] = guards.fixed
    if guards.guards:
        logger.info("Dynamo capture: the model's code checks its input sizes (%s); the compiled module captures "
                    "it again where they do not hold", ", ".join(map(str, guards.guards)))
    _return_like_the_model(gm, output, captured["outputs"], expected)
    return gm


def _return_like_the_model(gm: fx.GraphModule, output: Any, graph_outputs: Sequence[Any],
                           inputs: Sequence[torch.Tensor]) -> None:
    """Make ``gm`` return what the model returned: a tensor as a tensor, anything else as a tuple of its tensors.

    Dynamo's graph returns only the tensors it computed, each once, and its
    bytecode assembles the model's output from them, from inputs and from
    constants. So each tensor of the model's output is found, by identity, among
    the graph's outputs or inputs; non-tensor leaves (``None``, numbers) are left
    out. An object ``torch.utils._pytree`` cannot look into (a Hugging Face
    ``DynamicCache``) is replaced by the graph's other outputs, after the tensors
    found.
    """
    leaves = [output] if isinstance(output, torch.Tensor) else pytree.tree_leaves(output)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    opaque = [type(leaf).__name__ for leaf in leaves
              if not isinstance(leaf, (torch.Tensor, type(None), bool, int, float, str))]
    node = next(n for n in gm.graph.nodes if n.op == "output")
    computed, placeholders = node.args[0], [n for n in gm.graph.nodes if n.op == "placeholder"]
    returned = []
    for leaf in tensors:
        found = ([computed[i] for i, t in enumerate(graph_outputs) if t is leaf]
                 or [placeholders[i] for i, t in enumerate(inputs) if t is leaf])
        if not found:
            raise CaptureError("a tensor the model returns is neither computed by the Dynamo graph nor one of its "
                               "inputs (a parameter or a global tensor?); return values computed from the inputs")
        returned.append(found[0])
    if opaque:
        returned += [computed[i] for i, t in enumerate(graph_outputs) if not any(t is leaf for leaf in tensors)]
        logger.warning("Dynamo capture: the model returns %s, whose tensors the captured module returns after the "
                       "model's other output tensors", ", ".join(sorted(set(opaque))))
    node.args = (returned[0] if isinstance(output, torch.Tensor) else tuple(returned),)
    gm.recompile()
