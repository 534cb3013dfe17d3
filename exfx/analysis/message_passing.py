"""Message passing between a linear producer and its ReLU: matching a chain that commutes with the linear.

Between a linear producer and the pre-activation there may be *message passing*
(PyG's ``GCNConv``: gather the source rows, scale each by its edge weight,
scatter-add into the targets): steps that move, scale or sum whole rows
(``index_select`` / ``v[index]`` on a row axis, a multiply or divide by one number
per row, ``scatter_add`` / ``index_add`` / ``scatter_reduce("sum")`` into zeros, a
left matmul, a sum of two such values), never mixing or reshaping the feature
columns. Together they are one row operator ``P``, so ``P (x W) = (P x) W``: the
site record lists the chain (``SiteMatch.propagation``) and the rewrite replays it
on ``x``. Every value computed from the producer must stay inside that chain.

Why this is safe: :func:`match_propagation` accepts a chain only when every node
computed from the linear is one of those row steps, checked one by one
(:func:`_step_problem`), and no value computed from it is used outside the chain;
anything else is refused with a reason, and the ReLU is then not a site. The
replay needs the nodes whose explicit sizes end with the feature count
(``Propagation.resized``), and the exact rule needs every row scale to be
non-negative (:func:`propagation_sign`). :mod:`exfx.analysis.sites` matches the
rest of the site around the chain.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.opsets import (GATHER_METHODS, SCATTER_FUNCTIONS, SCATTER_METHODS, describe_node, is_add,
                                  is_left_matmul, is_producer)
from exfx.analysis.shapes import rank_of, shape_of, tensor_meta
from exfx.analysis.sign import nonnegativity_reason

logger = logging.getLogger(__name__)

__all__ = ["Propagation", "feature_sources", "propagated_producer", "match_propagation", "propagation_sign"]


_MUL_FUNCTIONS = (operator.mul, torch.mul)
_DIV_FUNCTIONS = (operator.truediv, torch.div)
_SUB_FUNCTIONS = (operator.sub, torch.sub)
_EXPAND_METHODS = ("expand", "expand_as", "broadcast_to")
_IDENTITY_METHODS = ("contiguous", "clone")
_ZERO_FUNCTIONS = (torch.zeros, torch.zeros_like)
#: The most nodes a message-passing chain may have (bounds the searches).
_PROPAGATION_LIMIT = 48


@dataclass
class Propagation:
    """A feature-linear chain from a linear's output to the pre-activation, and what its replay must change.

    ``nodes``: the chain in graph order, the pre-activation side last: every node computed from the producer on
    the way to the pre-activation, plus the zero targets and broadcast indices of its scatters (which must be
    rebuilt with the new column count). ``resized``: the nodes whose size arguments end with the feature count.
    ``scales``: the operands that scale rows (edge weights, the left matrix), for the sign analysis.
    """

    nodes: list[fx.Node]
    resized: list[fx.Node]
    scales: list[Any]


@dataclass(frozen=True)
class _Scatter:
    """The operands of ``scatter_add`` / ``index_add`` / ``scatter_reduce`` (functional or method form)."""

    kind: str
    target: Any
    dim: Any
    index: Any
    src: Any
    reduce: Any


def _is_call(node: fx.Node, functions: tuple[Any, ...] = (), methods: tuple[str, ...] = ()) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods)


def _scatter_parts(node: fx.Node) -> _Scatter | None:
    """The operands of an out-of-place scatter along ``dim`` (in-place forms are not matched), or None."""
    if not _is_call(node, SCATTER_FUNCTIONS, SCATTER_METHODS):
        return None
    kind = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if kind.endswith("_"):
        return None
    values = dict(zip(("target", "dim", "index", "src", "reduce"), node.args))
    for key, value in node.kwargs.items():
        values["src" if key == "source" else "target" if key == "input" else key] = value
    if not {"target", "dim", "index", "src"} <= set(values):
        return None
    return _Scatter(kind, values["target"], values["dim"], values["index"], values["src"], values.get("reduce"))


def _is_zeros(node: Any) -> bool:
    return isinstance(node, fx.Node) and _is_call(node, _ZERO_FUNCTIONS, ("new_zeros",))


def _is_row_getitem(node: fx.Node) -> bool:
    """``v[index]`` with one index tensor: picks rows (the first axis)."""
    return (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2
            and isinstance(node.args[1], fx.Node) and tensor_meta(node.args[1]) is not None)


def feature_sources(node: fx.Node) -> list[Any]:
    """The operands that may carry the feature columns of a feature-linear op (to walk back); [] for other ops."""
    if (_is_call(node, (torch.index_select, torch.clone), GATHER_METHODS + _IDENTITY_METHODS + _EXPAND_METHODS)
            or _is_call(node, _DIV_FUNCTIONS, ("div",)) or _is_row_getitem(node)):
        return [node.args[0]]
    if is_add(node) or _is_call(node, _MUL_FUNCTIONS + _SUB_FUNCTIONS, ("mul", "sub")):
        return list(node.args[:2])
    if is_left_matmul(node):
        return [node.args[1]]
    scatter = _scatter_parts(node)
    return [scatter.src] if scatter is not None else []


def propagated_producer(node: Any) -> fx.Node | None:
    """The producer ``node`` is computed from through feature-linear ops (walking back), or None."""
    frontier, seen = [node], set()
    while frontier and len(seen) < _PROPAGATION_LIMIT:
        current = frontier.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if is_producer(current):
            return current
        frontier.extend(reversed(feature_sources(current)))
    return None


def _computed_from(producer: fx.Node, top: fx.Node) -> tuple[set[fx.Node], str]:
    """Every node computed from ``producer`` up to ``top``, or a reason if one is used outside that chain."""
    position = {n: i for i, n in enumerate(top.graph.nodes)}
    chain, frontier = {producer}, [producer]
    while frontier:
        node = frontier.pop()
        if node is top:
            continue
        if not node.users:
            return set(), f"`{node.name}` is computed from it and never used"
        for user in node.users:
            if position[user] > position[top]:
                return set(), f"`{node.name}` is also used by `{user.name}`, outside the pre-activation"
            if user not in chain:
                chain.add(user)
                frontier.append(user)
        if len(chain) > _PROPAGATION_LIMIT:
            return set(), f"it has more than {_PROPAGATION_LIMIT} ops"
    return chain, ""


def _is_row_scale(scale: Any, value: Any, node: fx.Node) -> bool:
    """``scale`` multiplies whole rows of ``value``: a number, or a tensor with one column that does not
    broadcast ``value`` to a bigger shape."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return True
    if not (isinstance(scale, fx.Node) and tensor_meta(scale) is not None and tensor_meta(value) is not None):
        return False
    columns = shape_of(scale)
    return (not columns or columns[-1] == 1) and shape_of(node) == shape_of(value)


def _step_problem(node: fx.Node, chain: set[fx.Node], found: Propagation) -> str:
    """Why ``node`` (computed from the producer) is not a feature-linear step, or "" (recording what its replay
    needs in ``found``)."""
    def inside(value: Any) -> bool:
        return isinstance(value, fx.Node) and value in chain

    what = describe_node(node)
    if tensor_meta(node) is None:  # a shape read (v.size(0), v.shape): its copy reads the replayed shape
        return "" if _is_shape_read(node, chain) else f"{what} has no known shape"
    shape = shape_of(node)
    rank = len(shape)
    if _is_zeros(node):  # new_zeros(v, size) / zeros_like(v) reads v's shape and dtype only
        if any(getattr(_scatter_parts(u), "target", None) is not node for u in node.users):
            return f"{what} is used other than as the zero target of a scatter"
        return ""
    if _is_call(node, (), _EXPAND_METHODS) and not inside(node.args[0]):  # a scatter index broadcast over features
        source = node.args[0]
        if not isinstance(source, fx.Node) or tensor_meta(source) is None or shape_of(source)[-1:] != (1,):
            return f"{what} broadcasts a tensor along the feature axis that is not one column"
        if any(getattr(_scatter_parts(u), "index", None) is not node for u in node.users):
            return f"{what} is used other than as the index of a scatter"
        return _resize(node, found)
    if _is_call(node, (torch.index_select,), GATHER_METHODS):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        index = node.kwargs.get("index", node.args[2] if len(node.args) > 2 else None)
        if inside(index) or not inside(node.args[0]):
            return f"{what} selects with an index computed from the producer"
        if not isinstance(dim, int) or dim % rank == rank - 1:
            return f"{what} selects along the feature axis"
        return ""
    if _is_row_getitem(node) or _is_call(node, (torch.clone,), _IDENTITY_METHODS):
        others = node.all_input_nodes[1:] if _is_row_getitem(node) else []
        index = tensor_meta(others[0]) if others else None
        indexed = 0 if index is None else len(index.shape) if index.dtype == torch.bool else 1  # a mask: its rank
        if indexed and indexed >= (rank_of(node.args[0]) or 0):
            return f"{what} indexes the feature axis"
        return "" if inside(node.args[0]) and not any(map(inside, others)) else \
            f"{what} indexes with a value computed from the producer"
    if _is_call(node, _MUL_FUNCTIONS + _DIV_FUNCTIONS, ("mul", "div")):
        if node.kwargs or len(node.args) != 2:
            return f"{what} has arguments exfx does not read"
        value, scale = node.args if inside(node.args[0]) else node.args[::-1]
        if inside(scale):
            return f"{what} multiplies two values computed from the producer"
        if scale is node.args[0] and _is_call(node, _DIV_FUNCTIONS, ("div",)):
            return f"{what} divides by a value computed from the producer"
        if not _is_row_scale(scale, value, node):
            return f"{what} scales by `{scale}`, which is not one number per row (it would mix or reshape features)"
        found.scales.append(scale)
        return ""
    if is_add(node) or _is_call(node, _SUB_FUNCTIONS, ("sub",)):
        operands = node.args[:2]
        if node.kwargs or len(node.args) != 2 or not all(map(inside, operands)):
            return f"{what} adds a value not computed from the producer inside message passing"
        if any(tensor_meta(a) is None or shape_of(a) != shape for a in operands):
            return f"{what} broadcasts one of its operands"
        return ""
    if _is_call(node, (), _EXPAND_METHODS):
        if tensor_meta(node.args[0]) is None or shape_of(node.args[0])[-1] != shape[-1]:
            return f"{what} broadcasts the feature axis"
        return _resize(node, found)
    if is_left_matmul(node):
        if inside(node.args[0]) or not inside(node.args[1]) or (rank_of(node.args[1]) or 0) < 2:
            return f"{what} is not a matrix (not computed from the producer) times the producer's rows"
        found.scales.append(node.args[0])
        return ""
    scatter = _scatter_parts(node)
    if scatter is None:
        return f"{what} is not an op exfx carries partial sums through"
    return _scatter_problem(node, scatter, inside, found)


def _scatter_problem(node: fx.Node, scatter: _Scatter, inside: Any, found: Propagation) -> str:
    """Why a scatter is not a feature-linear sum into zeros, or "" (recording its rebuilt zeros and index)."""
    what = describe_node(node)
    rank = len(shape_of(node))
    if scatter.reduce not in (None, "sum"):
        return f"{what} reduces with {scatter.reduce!r}; only a sum is linear"
    if not inside(scatter.src) or not isinstance(scatter.dim, int) or scatter.dim % rank == rank - 1:
        return f"{what} does not scatter the producer's values along a row axis"
    target, index = scatter.target, scatter.index
    if not _is_zeros(target) or tensor_meta(target) is None or shape_of(target) != shape_of(node):
        return f"{what} scatters into `{target}`, not into a tensor of zeros of its own shape"
    if target.target is torch.zeros_like and not inside(target.args[0]):
        return f"{what} scatters into zeros shaped like `{target.args[0]}`, not like the producer's values"
    problem = _resize(target, found)
    if problem:
        return problem
    if not inside(target):
        found.nodes.append(target)
    if scatter.kind == "index_add":  # one position per row of the source: the same for every column
        return f"{what} takes its index from the producer" if inside(index) else ""
    if inside(index):  # a one-column index broadcast over the features (checked as a step of its own)
        return ""
    # Else it must be ``expand(column, sizes)`` of a one-column index, rebuilt with the new feature count.
    if not (isinstance(index, fx.Node) and _is_call(index, (), ("expand", "broadcast_to"))
            and isinstance(index.args[0], fx.Node) and tensor_meta(index.args[0]) is not None
            and shape_of(index.args[0])[-1:] == (1,)):
        return f"{what} has an index that is not one column broadcast over the features"
    found.nodes.append(index)
    return _resize(index, found)


def _is_shape_read(node: fx.Node, chain: set[fx.Node]) -> bool:
    """``v.size(...)``, ``v.dim()``, ``v.shape`` or an entry of one, of a value in the chain."""
    source = node.args[0] if node.args else None
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(source, fx.Node) and source in chain and tensor_meta(source) is None
    return _is_call(node, (getattr,), ("size", "dim")) and (
        node.op == "call_method" or node.args[1:2] == ("shape",))


def _resize(node: fx.Node, found: Propagation) -> str:
    """Record that ``node``'s replay must end its explicit size with the new column count (zeros, new_zeros,
    expand, broadcast_to: the size's last entry is the feature axis); "" or why it cannot."""
    if node.target in ("expand_as", torch.zeros_like):
        return ""  # the copy takes its shape from a replayed value
    if len(node.args) < (2 if node.op == "call_method" else 1):
        return f"{describe_node(node)} takes its size by keyword; exfx cannot resize it"
    found.resized.append(node)
    return ""


def match_propagation(top: fx.Node) -> tuple[fx.Node | None, Propagation | None, str]:
    """``relu(propagate(linear(x)) + shifts...)``: ``top`` computed from one linear by feature-linear ops.

    Feature-linear: each op moves, scales or sums whole rows (gather, row scaling, scatter-sum into zeros, a left
    matmul) and never mixes or reshapes the feature columns, so ``propagate(x W) == propagate(x) W``.

    Returns ``(linear, chain, "")`` when it matches, else ``(None, None, why)``: ``why`` is empty when ``top`` is
    not computed from any producer.
    """
    producer = propagated_producer(top)
    if producer is None:
        return None, None, ""
    label = describe_node(producer)
    if producer.target is not F.linear:
        return None, None, (f"{label} is followed by message passing; exfx carries partial sums "
                            f"through message passing only after a linear")
    chain, problem = _computed_from(producer, top)
    position = {n: i for i, n in enumerate(top.graph.nodes)}
    found = Propagation([], [], [])
    for node in sorted(chain - {producer}, key=position.__getitem__):
        problem = problem or _step_problem(node, chain, found)
        found.nodes.append(node)
    if problem:
        return None, None, f"message passing after {label}: {problem}"
    found.nodes = sorted(dict.fromkeys(found.nodes), key=position.__getitem__)
    found.resized = list(dict.fromkeys(found.resized))
    return producer, found, ""


def propagation_sign(found: Propagation) -> tuple[bool, str]:
    """Whether message passing keeps a non-negative input non-negative: every row scale is provably >= 0."""
    for scale in found.scales:
        reason = ("" if scale >= 0 else f"it scales rows by {scale}") if isinstance(scale, (int, float)) \
            else nonnegativity_reason(scale)
        if reason:
            return False, f"the message passing after the linear: {reason}"
    return True, ""
