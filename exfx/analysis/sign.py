"""Sign analysis: is a site's input provably non-negative? (What the lossless ``exact`` rule needs.)

The ``exact`` rule (:mod:`exfx.ops.exact`) bounds a neuron's unsampled terms
``sum_u w_u x_u`` from above by ``sum_b (sum of the positive weights in block b) *
max(x in block b)``. That bound holds only when ``x >= 0``, so the rule is offered
only where the graph proves it. A value is proven non-negative when it is

- the output of a ReLU-family activation: canonical ``torch.relu``, the canonical
  ReLU6 form ``torch.clamp(x, 0.0, t)`` (any ``clamp``/``clamp_min`` whose lower
  bound is a number ``>= 0``), ``F.relu6``, ``F.hardtanh(x, m, t)`` with ``m >= 0``;
- the output of an op that is non-negative whatever its input: ``sigmoid``,
  ``softmax``, ``exp``, ``abs``, ``hardsigmoid``;
- a max, average or adaptive pool, a flatten / reshape / view, a transpose or
  permute, a dropout or identity, a slice, or an ``index_select`` of a proven
  value; a ``cat`` / ``stack`` of proven values; a sum, product, mean or
  ``index_add`` of proven values, or a constant zeros / ones tensor.

Anything else (a linear or conv output, a model input, a stored tensor, a
subtraction, an op this module does not know) is not proven, and the reason names
it (:func:`~exfx.analysis.opsets.describe_node`): ``input `flatten` is not provably non-negative: it comes from
`fc1` (linear) through `flatten```.

Why it is safe: every rule above is a fact about the op's values (each maps
non-negative inputs to non-negative outputs, or has a non-negative range), so a
value proven here is ``>= 0`` (or NaN, which the rule never prunes on) for every
input. It only reads the graph.

Example::

    >>> nonnegativity_reason(flatten_node)        # flatten(max_pool2d(relu(conv(x))))
    ''
    >>> exact_availability(x_node, None)           # x = linear(...) + y
    (False, 'input `add` is not provably non-negative: it comes from `fc1` (linear) through `add`')
    >>> exact_availability(h_node, adj_node)       # a GCN layer relu(adj @ (h @ W)), h = relu(...)
    (False, 'the left operand `adj` of the matmul is not provably non-negative: it comes from `adj` (model input)')
"""

from __future__ import annotations

import logging
import numbers
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.opsets import (POOL_FUNCTIONS, POOL_MODULES, RESHAPE_FUNCTIONS,
                                  RESHAPE_METHODS, describe_node)
from exfx.analysis.shapes import tensor_meta

logger = logging.getLogger(__name__)

__all__ = ["nonnegativity_reason", "exact_availability"]

#: Ops whose output is non-negative whatever their input.
_NONNEGATIVE_FUNCTIONS = (torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.exp, torch.abs, F.softmax,
                          torch.softmax, F.hardsigmoid)
_NONNEGATIVE_METHODS = ("relu", "sigmoid", "exp", "abs", "softmax")
_NONNEGATIVE_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Sigmoid, torch.nn.Softmax, torch.nn.Hardsigmoid)
#: Ops that keep the sign of their first tensor operand: a non-negative input gives a non-negative output.
_SIGN_KEEPING_FUNCTIONS = POOL_FUNCTIONS + RESHAPE_FUNCTIONS + (
    torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.index_select, F.dropout, F.dropout1d,
    F.dropout2d, torch.clone, operator.getitem, torch.amax, torch.mean, torch.sum)
_SIGN_KEEPING_METHODS = RESHAPE_METHODS + ("transpose", "permute", "squeeze", "unsqueeze", "index_select",
                                           "contiguous", "clone", "detach", "amax", "t", "expand", "expand_as",
                                           "view_as", "reshape_as", "unflatten", "mean", "sum")
_SIGN_KEEPING_MODULES = POOL_MODULES + (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity, torch.nn.Dropout,
                                        torch.nn.Dropout1d, torch.nn.Dropout2d)
#: Ops whose output is non-negative when every tensor operand is and every number operand is >= 0.
_ALL_OPERANDS_FUNCTIONS = (operator.add, torch.add, operator.mul, torch.mul, torch.maximum)
_ALL_OPERANDS_METHODS = ("add", "mul", "maximum")
#: Ops joining a list of tensors (their first argument).
_JOIN_FUNCTIONS = (torch.cat, torch.stack, torch.concat)
_CLAMPS = (torch.clamp, torch.clamp_min, torch.clip)
_CLAMP_METHODS = ("clamp", "clamp_min", "clip")
_ZERO_ONE_CONSTANTS = (torch.zeros, torch.ones, torch.zeros_like, torch.ones_like)
_ZERO_ONE_METHODS = ("new_zeros", "new_ones")


def _module(node: fx.Node) -> torch.nn.Module | None:
    owner = node.graph.owning_module
    if node.op != "call_module" or owner is None:
        return None
    try:
        return owner.get_submodule(str(node.target))
    except AttributeError:
        return None


def _lower_bound_ok(node: fx.Node) -> bool:
    """A clamp whose lower bound is a number >= 0 (``clamp(x, 0.0, t)``, ``clamp_min(x, 0)``)."""
    low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
    return isinstance(low, numbers.Real) and not isinstance(low, bool) and low >= 0


def _hardtanh_ok(node: fx.Node) -> bool:
    low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
    return isinstance(low, numbers.Real) and low >= 0


def _is_nonnegative_op(node: fx.Node) -> bool:
    """Ops whose output is non-negative whatever their input."""
    if node.op == "call_function":
        if node.target in _NONNEGATIVE_FUNCTIONS:
            return True
        if node.target in _CLAMPS:
            return _lower_bound_ok(node)
        if node.target is F.hardtanh:
            return _hardtanh_ok(node)
        if node.target in _ZERO_ONE_CONSTANTS:
            return True
        if node.target in (torch.full, torch.full_like):
            fill = node.kwargs.get("fill_value", node.args[1] if len(node.args) > 1 else None)
            return isinstance(fill, numbers.Real) and fill >= 0
        return False
    if node.op == "call_method":
        target = str(node.target)
        if target in _CLAMP_METHODS:
            return _lower_bound_ok(node)
        return target in _NONNEGATIVE_METHODS or target in _ZERO_ONE_METHODS
    module = _module(node)
    if isinstance(module, torch.nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return module.min_val >= 0
    return isinstance(module, _NONNEGATIVE_MODULES)


def _tensor_nodes(values: Any) -> list[fx.Node] | None:
    """The tensor nodes among ``values``; None if a number among them is negative (``x + (-1)``, ``alpha=-1``)."""
    nodes = []
    for value in values:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value < 0:
            return None
        if isinstance(value, fx.Node) and tensor_meta(value) is not None:
            nodes.append(value)
    return nodes


def _operands(node: fx.Node) -> list[fx.Node] | None:
    """The tensor operands that must be non-negative for ``node``'s output to be, or None if no rule applies."""
    function = node.op == "call_function"
    method = str(node.target) if node.op == "call_method" else ""
    first = node.args[0] if node.args else None
    if (function and node.target in _SIGN_KEEPING_FUNCTIONS) or method in _SIGN_KEEPING_METHODS or (
            isinstance(_module(node), _SIGN_KEEPING_MODULES)):
        if tensor_meta(first) is None:
            return None  # e.g. an element of a tuple (max_pool's indices): not known to be a tensor's slice
        return [first]  # type: ignore[list-item]
    if function and node.target in _JOIN_FUNCTIONS:
        parts = first if isinstance(first, (list, tuple)) else node.kwargs.get("tensors", ())
        nodes = [p for p in parts if isinstance(p, fx.Node)]
        return nodes if len(nodes) == len(parts) else None
    if (function and node.target in _ALL_OPERANDS_FUNCTIONS) or method in _ALL_OPERANDS_METHODS:
        return _tensor_nodes(list(node.args) + list(node.kwargs.values()))
    if (function and node.target is torch.index_add) or method == "index_add":
        # index_add(x, dim, index, source, alpha=1): x and source must be; the index is not a value
        source = node.args[3] if len(node.args) > 3 else node.kwargs.get("source")
        alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
        return _tensor_nodes([first, source, alpha])
    return None


def _short(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"`{node.target}`"
    return f"`{node.target}`" if node.op == "call_method" else f"`{getattr(node.target, '__name__', node.name)}`"


def _unproven(node: fx.Node, memo: dict[fx.Node, tuple[fx.Node, list[str]] | None]) -> tuple[
        fx.Node, list[str]] | None:
    """None if ``node`` is proven non-negative, else the node where the proof stops and the path to it."""
    if node in memo:
        return memo[node]
    memo[node] = (node, [])  # a cycle cannot occur in a graph; this only guards against re-entry
    result: tuple[fx.Node, list[str]] | None
    if _is_nonnegative_op(node):
        result = None
    else:
        operands = _operands(node)
        if operands is None or not operands:
            result = (node, [])
        else:
            result = None
            for operand in operands:
                found = _unproven(operand, memo)
                if found is not None:
                    result = (found[0], [_short(node)] + found[1])
                    break
    memo[node] = result
    return result


def nonnegativity_reason(node: Any, subject: str = "") -> str:
    """``""`` when ``node``'s value is provably ``>= 0`` (see the module docstring), else why not (one line,
    about ``subject``, by default "input `<node>`")."""
    if not isinstance(node, fx.Node):
        return f"{subject or 'the input'} is not a graph value"
    found = _unproven(node, {})
    if found is None:
        return ""
    culprit, path = found
    through = f" through {', '.join(dict.fromkeys(path))}" if path else ""
    return (f"{subject or f'input `{node.name}`'} is not provably non-negative: it comes from "
            f"{describe_node(culprit)}{through}")


def exact_availability(x: Any, left: Any = None) -> tuple[bool, str]:
    """Whether the ``exact`` rule may run at a site whose producer reads ``x`` (``left @ x`` in the GCN form),
    and the reason when not."""
    reason = nonnegativity_reason(x)
    if not reason and left is not None:
        reason = nonnegativity_reason(left, f"the left operand `{getattr(left, 'name', left)}` of the matmul")
    if reason:
        logger.debug("exact rule unavailable: %s", reason)
    return not reason, reason
