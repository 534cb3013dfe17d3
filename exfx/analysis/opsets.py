"""Op spellings: which torch callables, ``Tensor`` methods and modules the analysis treats as one op family.

One place for every spelling set the analysis and the site matcher share, so a
new spelling is added once. (Canonicalize has its own, narrower sets: it rewrites
only what it can prove identical, e.g. ``x @ W`` with a 2-D parameter, never ``bmm``.)
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "CANONICAL_CONVS", "is_producer", "is_relu",
    "UNARY_FUNCTIONS", "UNARY_METHODS", "UNARY_MODULES", "SOFTMAX_FUNCTIONS", "BINARY_FUNCTIONS", "BINARY_METHODS",
    "ADD_FUNCTIONS", "POOL_FUNCTIONS", "POOL_MODULES", "NORM_MODULES", "REDUCE_FUNCTIONS", "REDUCE_METHODS",
    "RESHAPE_FUNCTIONS", "RESHAPE_METHODS", "MATMUL_FUNCTIONS", "NON_TENSOR_FUNCTIONS", "NON_TENSOR_METHODS",
    "GATHER_METHODS", "SCATTER_FUNCTIONS", "SCATTER_METHODS", "CONSTANT_FUNCTIONS", "CONSTANT_METHODS",
]

UNARY_FUNCTIONS = (
    torch.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.relu6, F.softplus, F.mish, F.hardswish,
    torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square,
    operator.neg, F.sigmoid, F.tanh, torch.clone, F.dropout, torch.erf, torch.log, torch.pow, operator.pow,
)
UNARY_METHODS = ("relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "contiguous", "clone", "pow",
                 "float", "half", "double", "bfloat16", "to", "type_as", "square", "erf", "log", "detach")
UNARY_MODULES = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ELU, torch.nn.LeakyReLU, torch.nn.Sigmoid, torch.nn.Tanh,
                 torch.nn.Hardtanh, torch.nn.ReLU6, torch.nn.Softplus, torch.nn.Mish, torch.nn.Hardswish)
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
    """True for the canonical ReLU form."""
    return node.op == "call_function" and node.target is torch.relu


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
