"""Op spellings: which torch callables, ``Tensor`` methods and modules the analysis treats as one op family.

One place for every spelling set the analysis and the site matcher share, so a
new spelling is added once. (Canonicalize has its own, narrower sets: it rewrites
only what it can prove identical, e.g. ``x @ W`` with a 2-D parameter, never ``bmm``.)
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.shapes import rank_of
from exfx.meta import producer_name

__all__ = [
    "CANONICAL_CONVS", "is_producer", "producer_kind", "is_relu", "is_capped_relu", "is_site_activation",
    "activation_ceiling", "is_add", "is_left_matmul", "describe_node",
    "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS", "ACTIVATION_MODULES", "activation_name",
    "UNARY_FUNCTIONS", "UNARY_METHODS", "UNARY_MODULES", "SOFTMAX_FUNCTIONS", "BINARY_FUNCTIONS", "BINARY_METHODS",
    "ADD_FUNCTIONS", "POOL_FUNCTIONS", "POOL_MODULES", "NORM_MODULES", "REDUCE_FUNCTIONS", "REDUCE_METHODS",
    "RESHAPE_FUNCTIONS", "RESHAPE_METHODS", "MATMUL_FUNCTIONS", "NON_TENSOR_FUNCTIONS", "NON_TENSOR_METHODS",
    "GATHER_METHODS", "SCATTER_FUNCTIONS", "SCATTER_METHODS", "CONSTANT_FUNCTIONS", "CONSTANT_METHODS",
]

#: Element-wise activations that are not ReLU-family sites, by the name the report gives them (the ReLU family,
#: ``torch.relu`` and ``torch.clamp(x, 0.0, t)``, is what canonicalize leaves of ReLU, ReLU6, hardtanh(0, t) and
#: clamp(min=0); a hardtanh with another lower bound stays a hardtanh).
ACTIVATION_FUNCTIONS: dict[Any, str] = {
    F.gelu: "gelu", F.silu: "silu", F.elu: "elu", F.selu: "selu", torch.selu: "selu", F.celu: "celu",
    torch.celu: "celu", F.leaky_relu: "leaky_relu", F.rrelu: "rrelu", F.prelu: "prelu", F.hardtanh: "hardtanh",
    F.softplus: "softplus", F.mish: "mish", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.logsigmoid: "logsigmoid",
    F.softsign: "softsign", F.tanhshrink: "tanhshrink",
}
ACTIVATION_METHODS: dict[str, str] = {"sigmoid": "sigmoid", "tanh": "tanh"}
ACTIVATION_MODULES: dict[type, str] = {
    torch.nn.GELU: "gelu", torch.nn.SiLU: "silu", torch.nn.ELU: "elu", torch.nn.SELU: "selu", torch.nn.CELU: "celu",
    torch.nn.LeakyReLU: "leaky_relu", torch.nn.RReLU: "rrelu", torch.nn.PReLU: "prelu", torch.nn.Hardtanh: "hardtanh",
    torch.nn.ReLU6: "relu6", torch.nn.Softplus: "softplus", torch.nn.Mish: "mish", torch.nn.Hardswish: "hardswish",
    torch.nn.Hardsigmoid: "hardsigmoid", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh",
    torch.nn.LogSigmoid: "logsigmoid", torch.nn.Softsign: "softsign", torch.nn.Tanhshrink: "tanhshrink",
}
#: Clamps, when they are not the canonical ReLU6 form (a tensor bound, a negative lower bound): element-wise.
CLAMP_FUNCTIONS = (torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max)
CLAMP_METHODS = ("clamp", "clip", "clamp_min", "clamp_max")

UNARY_FUNCTIONS = (
    torch.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.relu6, F.softplus, F.mish, F.hardswish,
    torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square,
    operator.neg, F.sigmoid, F.tanh, torch.clone, F.dropout, torch.erf, torch.log, torch.pow, operator.pow,
    F.hardsigmoid, F.selu, torch.selu, F.celu, torch.celu, F.rrelu, F.logsigmoid, F.softsign, F.tanhshrink,
    *CLAMP_FUNCTIONS,
)
UNARY_METHODS = ("relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "contiguous", "clone", "pow",
                 "float", "half", "double", "bfloat16", "to", "type_as", "square", "erf", "log", "detach",
                 *CLAMP_METHODS)
UNARY_MODULES = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ELU, torch.nn.LeakyReLU, torch.nn.Sigmoid, torch.nn.Tanh,
                 torch.nn.Hardtanh, torch.nn.ReLU6, torch.nn.Softplus, torch.nn.Mish, torch.nn.Hardswish,
                 torch.nn.Hardsigmoid, torch.nn.SELU, torch.nn.CELU, torch.nn.RReLU, torch.nn.LogSigmoid,
                 torch.nn.Softsign, torch.nn.Tanhshrink)
SOFTMAX_FUNCTIONS = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
BINARY_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div, torch.maximum, torch.minimum, torch.where, torch.masked_fill, operator.iadd,
                    operator.imul)
BINARY_METHODS = ("add", "sub", "mul", "div", "masked_fill", "add_", "mul_", "maximum", "minimum", "where")
ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                  F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool1d,
                  torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d)
POOL_MODULES = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.AvgPool1d, torch.nn.AvgPool2d,
                torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool1d,
                torch.nn.AdaptiveMaxPool2d)
NORM_MODULES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
REDUCE_FUNCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin)
REDUCE_METHODS = ("mean", "sum", "amax", "amin")
RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten)
RESHAPE_METHODS = ("view", "reshape", "flatten")
#: Every matmul spelling, batched ones included (the analysis joins the contracted axes of any of them).
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm, torch.mm)
NON_TENSOR_FUNCTIONS = (getattr,)
NON_TENSOR_METHODS = ("size", "dim")
GATHER_METHODS = ("index_select",)
SCATTER_FUNCTIONS = (torch.scatter_add, torch.scatter_reduce, torch.index_add)
SCATTER_METHODS = ("scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add", "index_add_")
#: Constant-valued tensors: every permutation leaves them unchanged, so they constrain nothing.
CONSTANT_FUNCTIONS = (torch.zeros, torch.ones, torch.full, torch.empty, torch.zeros_like, torch.ones_like,
                      torch.full_like, torch.empty_like)
CONSTANT_METHODS = ("new_zeros", "new_ones", "new_full", "new_empty")


# ---------------------------------------------------------------------------
# The canonical form (written by exfx.passes.canonicalize_pass, read by the analysis and later passes)
# ---------------------------------------------------------------------------

#: The conv function canonicalize writes for each spatial rank.
CANONICAL_CONVS = {1: F.conv1d, 2: F.conv2d}
_CONV_KWARGS = {"stride", "padding", "dilation", "groups"}


def is_relu(node: fx.Node) -> bool:
    """True for the canonical ReLU form ``torch.relu(x)`` (ReLU6 and its kin are :func:`is_capped_relu`)."""
    return node.op == "call_function" and node.target is torch.relu


def is_capped_relu(node: fx.Node) -> bool:
    """True for the canonical upper-bounded ReLU ``torch.clamp(x, 0.0, t)``: two positional floats, ``t > 0``.

    Canonicalize writes ReLU6, ``hardtanh(x, 0, t)`` and ``clamp(x, 0, t)`` in this form.
    """
    if not (node.op == "call_function" and node.target is torch.clamp and len(node.args) == 3 and not node.kwargs):
        return False
    low, high = node.args[1], node.args[2]
    return type(low) is float and low == 0.0 and type(high) is float and 0.0 < high < math.inf


def is_site_activation(node: fx.Node) -> bool:
    """True for a canonical ReLU-family activation: one that outputs 0 exactly where its input is <= 0.

    Plain ReLU and the capped form ``torch.clamp(x, 0.0, t)``. Each gets a site verdict; early negative
    prediction is exact for both (a pruned neuron is 0 after either, a kept one goes through it unchanged).
    """
    return is_relu(node) or is_capped_relu(node)


def activation_ceiling(node: fx.Node) -> float | None:
    """The upper bound ``t`` of a canonical capped ReLU ``torch.clamp(x, 0.0, t)``; None for any other node."""
    return float(node.args[2]) if is_capped_relu(node) else None  # type: ignore[arg-type]


def activation_name(node: fx.Node) -> str | None:
    """The name of the element-wise activation ``node`` applies when it is not a ReLU-family site, else None.

    ``gelu``, ``sigmoid``, ``hardtanh``, ... (see :data:`ACTIVATION_FUNCTIONS`). A module is looked up by
    its class and its base classes, so a subclass of ``nn.GELU`` is a ``gelu``.
    """
    if node.op == "call_function":
        try:
            return ACTIVATION_FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable callable
            return None
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(str(node.target))
    owner = node.graph.owning_module
    if node.op != "call_module" or owner is None:
        return None
    module = owner.get_submodule(str(node.target))
    return next((ACTIVATION_MODULES[cls] for cls in type(module).__mro__ if cls in ACTIVATION_MODULES), None)


def is_producer(node: fx.Node) -> bool:
    """True for a canonical linear or conv node.

    A conv is canonical only in the form this pass writes: three positional
    arguments and explicit ``stride``/``padding``/``dilation``/``groups``; a conv
    it could not rewrite (asymmetric ``"same"`` padding, dynamic arguments) is not
    a producer.
    """
    if node.op != "call_function":
        return False
    if node.target is F.linear:
        return True
    return (node.target in CANONICAL_CONVS.values() and len(node.args) == 3 and set(node.kwargs) == _CONV_KWARGS
            and isinstance(node.kwargs["padding"], (list, tuple)))


def producer_kind(node: fx.Node) -> str:
    """``"linear"`` or the conv function's name (``"conv2d"``) of a canonical producer (:func:`is_producer`)."""
    return "linear" if node.target is F.linear else getattr(node.target, "__name__", str(node.target))


def is_add(node: fx.Node) -> bool:
    """A plain two-operand add, ``a + b`` in any spelling (``operator.add``, ``torch.add``, ``.add``), no kwargs."""
    plain = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add")
    return plain and len(node.args) == 2 and not node.kwargs


def is_left_matmul(node: fx.Node) -> bool:
    """``A @ v`` with a left operand of rank 2 or more (a GCN's ``adj @ (x W)``)."""
    return (node.op == "call_function" and node.target in MATMUL_FUNCTIONS and len(node.args) == 2
            and isinstance(node.args[0], fx.Node) and (rank_of(node.args[0]) or 0) >= 2)


#: What :func:`describe_node` calls a node of these ops, whatever its target.
_OP_KINDS = {"placeholder": "model input", "get_attr": "stored tensor", "output": "model output"}


def describe_node(node: fx.Node) -> str:
    """How every reason names a node: its name in backquotes, then what it is in parentheses ("`fc1` (linear)").

    The name is the user's where there is one: a model input's, a stored tensor's or a module's dotted name, a
    linear or conv's module or parameter name (:func:`exfx.meta.producer_name`); else the node's. What it is:
    ``model input``, ``stored tensor``, ``ReLU module``, ``linear``, ``conv2d``, ``.view()``, ``add``,
    ``model output``, or ``an item of <the node indexed>`` for ``operator.getitem`` (an output of an opaque call).
    """
    return f"`{_node_name(node)}` ({_node_kind(node)})"


def _node_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr", "call_module"):
        return str(node.target)
    return producer_name(node) if is_producer(node) else node.name


def _node_kind(node: fx.Node) -> str:
    if node.op in _OP_KINDS:
        return _OP_KINDS[node.op]
    if node.op == "call_module":
        return _module_kind(node)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.target is operator.getitem and node.args and isinstance(node.args[0], fx.Node):
        return f"an item of {describe_node(node.args[0])}"
    return getattr(node.target, "__name__", str(node.target))


def _module_kind(node: fx.Node) -> str:
    """``ReLU module``: the class of the module a ``call_module`` node calls (``module`` when its graph has none)."""
    owner = node.graph.owning_module
    try:
        module = owner.get_submodule(str(node.target)) if owner is not None else None
    except AttributeError:
        module = None
    return f"{type(module).__name__} module" if module is not None else "module"
