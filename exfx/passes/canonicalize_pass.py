"""Canonicalize: one spelling per op, so later passes match one pattern.

What it rewrites:

- **ReLU.** ``nn.ReLU`` (in place or not), ``F.relu`` (``inplace=True`` too),
  ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_``
  all become ``torch.relu(x)``, and so does a clamp at 0 with no upper bound
  (``torch.clamp(x, min=0)``, ``x.clamp_min(0)``, ``torch.clamp_min_(x, 0)``, ...).
- **ReLU6 and its kin.** ``nn.ReLU6``, ``F.relu6``, ``nn.Hardtanh(0, t)``,
  ``F.hardtanh(x, 0, t)``, ``F.hardtanh_`` and ``torch.clamp``/``torch.clip``/``Tensor.clamp``
  (and their in-place forms) with a lower bound of exactly 0 and a number ``t > 0``
  above all become ``torch.clamp(x, 0.0, t)`` (positional floats): like ReLU, they
  output 0 exactly where the input is <= 0, so they are sites too
  (:func:`exfx.analysis.opsets.is_site_activation`). A clamp with a tensor bound or
  another lower bound is left as it is (an element-wise op).
- **Linear and conv.** ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` modules and
  the ``F.linear``/``F.conv1d``/``F.conv2d`` functions become
  ``F.linear(x, weight, bias)`` or ``F.convNd(x, weight, bias, stride=[..],
  padding=[..], dilation=[..], groups=g)`` with ``weight``/``bias`` as graph
  inputs (``get_attr`` nodes). ``x @ W``, ``torch.matmul(x, W)`` and
  ``torch.mm(x, W)`` with a 2-D parameter ``W`` become ``F.linear(x, W.t())``.
- **Eval-mode identities.** ``nn.Dropout``/``F.dropout(training=False)`` and
  ``nn.Identity`` are removed.

- **Other in-place ops.** ``h.add_(b)``, ``h += b``, ``torch.sigmoid_(h)``,
  ``F.elu_(h)``, ``F.leaky_relu(h, inplace=True)``, ``nn.LeakyReLU(inplace=True)``
  and the like become their out-of-place twins (``h.add(b)``, ``h + b``, ...; a
  module with ``inplace=True`` is swapped for an out-of-place copy registered on
  the GraphModule, so the user's module is untouched). Without this, a mutation
  whose result is not used would be dropped as dead code.

Every canonical producer gets a name (:func:`exfx.meta.producer_name`): the dotted name of the
module or parameter it came from (``layer1.0.conv1``, ``w1``). Site names come
from there, so they are stable whatever later passes do to the weights.

Why it is safe: every rewrite replaces a call by the identical computation. An
in-place op becomes out-of-place; users of its input that come later in graph
order are redirected to its result, which is what they saw under in-place
semantics. That reasoning fails when the mutated tensor shares memory with
another tensor that is read later (``h[:, :3].mul_(0)`` then ``h``); such a
graph is refused with :class:`~exfx.errors.UnsupportedModelError`, as is an
in-place op with no out-of-place twin (``h.zero_()``). Convs with a non-zero
padding mode or asymmetric ``"same"`` padding are left as they are (they are
not canonical producers, so later passes treat them as opaque).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.opsets import CANONICAL_CONVS, describe_node, is_capped_relu, is_producer, is_relu
from exfx.errors import UnsupportedModelError
from exfx.meta import set_producer_name, set_relu_source
from exfx.passes.attributes import fresh_attribute, slug

logger = logging.getLogger(__name__)

__all__ = ["CanonicalizePass", "CANONICAL_CONVS", "is_producer", "is_relu"]

_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2}
_CONV_MODULES = {torch.nn.Conv1d: 1, torch.nn.Conv2d: 2}
_CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, torch.nn.functional.relu}
_INPLACE_RELU_FUNCTIONS = {torch.relu_, F.relu_}
# The ReLU family spelled as a clamp: target -> (names of its (lower, upper) bound arguments, in place).
# Positions follow the input: ``torch.clamp(input, min, max)``, ``F.hardtanh(input, min_val, max_val, inplace)``.
_CLAMP_SPELLINGS: dict[Any, tuple[tuple[str, str | None], bool]] = {
    torch.clamp: (("min", "max"), False), torch.clip: (("min", "max"), False),
    torch.clamp_: (("min", "max"), True), torch.clip_: (("min", "max"), True),
    torch.clamp_min: (("min", None), False), torch.clamp_min_: (("min", None), True),
    F.hardtanh: (("min_val", "max_val"), False), F.hardtanh_: (("min_val", "max_val"), True),
    "clamp": (("min", "max"), False), "clip": (("min", "max"), False),
    "clamp_": (("min", "max"), True), "clip_": (("min", "max"), True),
    "clamp_min": (("min", None), False), "clamp_min_": (("min", None), True),
}
_HARDTANH_DEFAULTS = {"min_val": -1.0, "max_val": 1.0}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.mm}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, torch.dropout}
_IDENTITY_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Identity)

# In-place ops and their out-of-place twins.
_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
}
_NO_TWIN_METHODS = {"bernoulli_", "resize_"}  # an out-of-place method exists but means something else
_VALUE_PRESERVING_METHODS = {"requires_grad_", "share_memory_"}
# Ops whose result may share memory with their first argument.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "t", "permute",
                 "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "chunk", "split", "unbind",
                 "detach", "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold",
                 "contiguous", "to", "type_as", "float", "double", "half", "bfloat16", "__getitem__", "real",
                 "imag", "view_as_real", "tensor_split", "split_with_sizes", "hsplit", "vsplit"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.t,
                   torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split,
                   torch.unbind, torch.detach, torch.movedim, torch.moveaxis, torch.swapaxes, torch.diagonal,
                   torch.as_strided, torch.tensor_split, torch.unflatten}
_VIEW_MODULES = (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity)


def _as_list(value: Any, dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


def _same_padding(weight_shape: torch.Size, dilation: list[int]) -> list[int] | None:
    """Explicit symmetric padding equal to ``padding="same"`` at stride 1, if one exists."""
    pads = []
    for size, dil in zip(weight_shape[2:], dilation):
        total = dil * (size - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return pads


class CanonicalizePass(PassBase):
    """Rewrite every ReLU, linear and conv spelling into one canonical form (see module docstring)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        self._inplace_modules: dict[str, str] = {}
        for node in list(graph_module.graph.nodes):
            modified |= self._rewrite(graph_module, node)
        if modified:
            graph_module.graph.eliminate_dead_code()
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, torch.nn.ReLU):
                return self._relu(gm, node, node.args[0], module.inplace, str(node.target))
            family = _capped_relu_call(gm, node)
            if family is not None:
                source, ceiling, inplace = family
                return self._relu(gm, node, source, inplace, str(node.target), ceiling)
            if isinstance(module, _IDENTITY_MODULES):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                return True
            if type(module) is torch.nn.Linear:
                return self._linear_module(gm, node)
            if type(module) in _CONV_MODULES:
                return self._conv_module(gm, node, module)
            if getattr(module, "inplace", False) is True:
                # Call an out-of-place copy, registered on the GraphModule itself: the module object may be
                # shared with the user's model, which must not change.
                target = self._inplace_modules.get(str(node.target))
                if target is None:
                    target = fresh_attribute(gm, slug(str(node.target), empty="module") + "_out_of_place")
                    twin = copy.copy(module)
                    twin.inplace = False
                    gm.add_submodule(target, twin)
                    self._inplace_modules[str(node.target)] = target
                node.target = target
                self._functionalised(gm, node, node.args[0])
                return True
            return False
        if node.op == "call_function":
            if (node.target is torch.relu and len(node.args) == 1 and not node.kwargs) or is_capped_relu(node):
                set_relu_source(node, node.name, overwrite=False)
                return False
            if node.target in _RELU_FUNCTIONS:
                inplace = node.target in _INPLACE_RELU_FUNCTIONS or bool(
                    node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))
                return self._relu(gm, node, node.args[0] if node.args else node.kwargs["input"], inplace)
            family = _capped_relu_call(gm, node)
            if family is not None:
                return self._relu(gm, node, family[0], family[2], ceiling=family[1])
            if self._inplace_function(gm, node):
                return True
            if node.target in _DROPOUT_FUNCTIONS:
                return self._dropout(gm, node)
            if node.target is F.linear:
                return self._linear_function(node)
            if node.target in _CONV_FUNCTIONS:
                return self._conv_function(gm, node)
            if node.target in _MATMUL_FUNCTIONS:
                return self._matmul(gm, node)
            return False
        if node.op == "call_method":
            if node.target in ("relu", "relu_"):
                return self._relu(gm, node, node.args[0], node.target == "relu_")
            family = _capped_relu_call(gm, node)
            if family is not None:
                return self._relu(gm, node, family[0], family[2], ceiling=family[1])
            if self._inplace_method(gm, node):
                return True
            if node.target == "matmul":
                return self._matmul(gm, node)
        return False

    # -- Other in-place ops ---------------------------------------------------

    def _inplace_method(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        name = str(node.target)
        if not (name.endswith("_") and not name.startswith("_") and node.args):
            return False
        if name in _VALUE_PRESERVING_METHODS:
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)
            return True
        twin = getattr(torch.Tensor, name[:-1], None)
        if name in _NO_TWIN_METHODS or not callable(twin):
            raise UnsupportedModelError(
                f"in-place {describe_node(node)} has no out-of-place form exfx knows; "
                f"write it out of place in the model's forward")
        node.target = name[:-1]
        self._functionalised(gm, node, node.args[0])
        return True

    def _inplace_function(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        target = node.target
        if not node.args:
            return False
        if target in _INPLACE_OPERATORS:
            # Also for Python numbers: the GraphModule's code is `n += 1`, which rebinds `n` for later users.
            node.target = _INPLACE_OPERATORS[target]  # type: ignore[index]
        elif node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        else:
            name = getattr(target, "__name__", "")
            if not (name.endswith("_") and not name.startswith("_")):
                return False
            module = torch if getattr(torch, name, None) is target else F if getattr(F, name, None) is target else None
            twin = getattr(module, name[:-1], None) if module is not None else None
            if twin is None:
                return False
            node.target = twin
        self._functionalised(gm, node, node.args[0])
        return True

    @staticmethod
    def _functionalised(gm: fx.GraphModule, node: fx.Node, source: Any) -> None:
        """``node`` now computes out of place what used to be written into ``source``."""
        if isinstance(source, fx.Node):
            _check_no_live_alias(node, source)
            CanonicalizePass._redirect_later_users(source, node)
        logger.debug("made %s out of place", node.name)

    # -- ReLU ---------------------------------------------------------------

    def _relu(self, gm: fx.GraphModule, node: fx.Node, source: Any, inplace: bool, source_name: str = "",
              ceiling: float | None = None) -> bool:
        """``node`` -> ``torch.relu(source)``, or ``torch.clamp(source, 0.0, ceiling)`` for a capped ReLU."""
        with gm.graph.inserting_before(node):
            relu = gm.graph.call_function(torch.relu, (source,)) if ceiling is None else gm.graph.call_function(
                torch.clamp, (source, 0.0, ceiling))
        relu.meta.update(node.meta)
        set_relu_source(relu, source_name or node.name)
        if inplace and isinstance(source, fx.Node):
            _check_no_live_alias(node, source)
        node.replace_all_uses_with(relu)
        gm.graph.erase_node(node)
        if inplace and isinstance(source, fx.Node):
            # In place, the input itself held the ReLU's result for everything after it.
            self._redirect_later_users(source, relu)
        return True

    @staticmethod
    def _redirect_later_users(source: fx.Node, replacement: fx.Node) -> None:
        order = {n: i for i, n in enumerate(source.graph.nodes)}
        for user in list(source.users):
            if user is not replacement and order[user] > order[replacement]:
                user.replace_input_with(source, replacement)

    @staticmethod
    def _dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if training is not False:
            return False
        node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
        gm.graph.erase_node(node)
        return True

    # -- Linear -------------------------------------------------------------

    @staticmethod
    def _param_node(gm: fx.GraphModule, node: fx.Node, target: str) -> fx.Node:
        with gm.graph.inserting_before(node):
            return gm.graph.get_attr(target)

    def _linear_module(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        module = gm.get_submodule(str(node.target))
        weight = self._param_node(gm, node, f"{node.target}.weight")
        bias = self._param_node(gm, node, f"{node.target}.bias") if module.bias is not None else None
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(F.linear, (node.args[0], weight, bias))
        self._finish(node, linear, str(node.target))
        return True

    def _linear_function(self, node: fx.Node) -> bool:
        names = ("input", "weight", "bias")
        values = [node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in enumerate(names)]
        canonical = node.kwargs == {} and len(node.args) == 3
        if not canonical:
            node.args, node.kwargs = tuple(values), {}
        set_producer_name(node, _param_name(values[1]) or node.name, overwrite=False)
        return not canonical

    def _matmul(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if len(node.args) != 2:
            return False
        lhs, rhs = node.args
        if not (isinstance(rhs, fx.Node) and rhs.op == "get_attr"):
            return False
        value = operator.attrgetter(str(rhs.target))(gm)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            return False
        with gm.graph.inserting_before(node):
            weight = gm.graph.call_method("t", (rhs,))
            linear = gm.graph.call_function(F.linear, (lhs, weight, None))
        self._finish(node, linear, _param_name(rhs) or node.name)
        return True

    # -- Conv ---------------------------------------------------------------

    def _conv_module(self, gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module) -> bool:
        dims = _CONV_MODULES[type(module)]
        if module.padding_mode != "zeros":
            logger.info("leaving %s as is: padding_mode=%r", node.target, module.padding_mode)
            return False
        padding = self._explicit_padding(module.padding, module.weight.shape, _as_list(module.dilation, dims),
                                         _as_list(module.stride, dims), dims)
        if padding is None:
            return False
        weight = self._param_node(gm, node, f"{node.target}.weight")
        bias = self._param_node(gm, node, f"{node.target}.bias") if module.bias is not None else None
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_function(
                CANONICAL_CONVS[dims], (node.args[0], weight, bias),
                {"stride": _as_list(module.stride, dims), "padding": padding,
                 "dilation": _as_list(module.dilation, dims), "groups": int(module.groups)})
        self._finish(node, conv, str(node.target))
        return True

    def _conv_function(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        dims = _CONV_FUNCTIONS[node.target]  # type: ignore[index]
        defaults: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        values = {name: (node.args[i] if len(node.args) > i else node.kwargs.get(name, defaults.get(name)))
                  for i, name in enumerate(_CONV_ARG_NAMES)}
        if any(isinstance(values[k], fx.Node) for k in ("stride", "padding", "dilation", "groups")):
            return False
        weight = values["weight"]
        has_meta = isinstance(weight, fx.Node) and "tensor_meta" in weight.meta
        shape = weight.meta["tensor_meta"].shape if has_meta else None
        dilation, stride = _as_list(values["dilation"], dims), _as_list(values["stride"], dims)
        padding = self._explicit_padding(values["padding"], shape, dilation, stride, dims)
        if padding is None:
            return False
        node.args = (values["input"], weight, values["bias"])
        node.kwargs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": int(values["groups"])}
        set_producer_name(node, _param_name(weight) or node.name, overwrite=False)
        return True

    @staticmethod
    def _explicit_padding(padding: Any, weight_shape: torch.Size | None, dilation: list[int], stride: list[int],
                          dims: int) -> list[int] | None:
        if padding == "valid":
            return [0] * dims
        if padding == "same":
            if weight_shape is None or any(s != 1 for s in stride):
                return None
            return _same_padding(weight_shape, dilation)
        return _as_list(padding, dims)

    @staticmethod
    def _finish(old: fx.Node, new: fx.Node, name: str) -> None:
        new.meta.update(old.meta)
        set_producer_name(new, name)
        old.replace_all_uses_with(new)
        old.graph.erase_node(old)


def _argument(node: fx.Node, position: int, name: str | None, default: Any = None) -> Any:
    if position < len(node.args):
        return node.args[position]
    return node.kwargs.get(name, default) if name is not None else default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _capped_relu_call(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, float | None, bool] | None:
    """``(input, ceiling, in place)`` when ``node`` is a ReLU-family clamp: lower bound exactly 0, upper bound a
    number > 0 (``ceiling``) or none (``ceiling`` None: a plain ReLU); None for anything else.

    ``nn.ReLU6``/``nn.Hardtanh`` modules (not subclasses that change ``forward``), ``F.relu6``,
    ``F.hardtanh[_]`` and the clamp spellings of :data:`_CLAMP_SPELLINGS`.
    """
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not (isinstance(module, torch.nn.Hardtanh) and type(module).forward is torch.nn.Hardtanh.forward):
            return None
        source, low, high, inplace = node.args[0] if node.args else None, module.min_val, module.max_val, \
            module.inplace
    elif node.op == "call_function" and node.target is F.relu6:
        source, low, high = _argument(node, 0, "input"), 0.0, 6.0
        inplace = _argument(node, 1, "inplace", False)
    else:
        key = node.target if node.op == "call_function" else str(node.target) if node.op == "call_method" else None
        try:
            spelling = _CLAMP_SPELLINGS.get(key)
        except TypeError:  # an unhashable callable
            return None
        if spelling is None:
            return None
        (low_name, high_name), inplace = spelling
        source = _argument(node, 0, "input")
        low = _argument(node, 1, low_name, _HARDTANH_DEFAULTS.get(low_name))
        high = _argument(node, 2, high_name, _HARDTANH_DEFAULTS.get(high_name or ""))
        if node.target is F.hardtanh:
            inplace = _argument(node, 3, "inplace", False)
    if not isinstance(source, fx.Node) or not isinstance(inplace, bool) or not _is_number(low) or low != 0:
        return None
    if high is not None and not (_is_number(high) and high > 0):
        return None
    return source, (None if high is None or math.isinf(high) else float(high)), inplace


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module" and node.graph.owning_module is not None:
        return isinstance(node.graph.owning_module.get_submodule(str(node.target)), _VIEW_MODULES)
    return False


def _check_no_live_alias(inplace: fx.Node, mutated: fx.Node) -> None:
    """Refuse to make ``inplace`` out of place when memory it writes is read later through another tensor.

    The aliases are the views, created before ``inplace``, of the base tensor ``mutated`` is a view of.
    """
    order = {n: i for i, n in enumerate(inplace.graph.nodes)}
    here = order[inplace]
    base = mutated
    while _is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    aliases, frontier = {base}, [base]
    while frontier:
        for user in frontier.pop().users:
            if user not in aliases and order[user] < here and _is_view(user) and user.args[0] in aliases:
                aliases.add(user)
                frontier.append(user)
    for alias in sorted(aliases, key=order.__getitem__):
        if alias is mutated:
            continue
        later = [u for u in alias.users if order[u] > here]
        if later:
            raise UnsupportedModelError(
                f"in-place {describe_node(inplace)} writes into `{mutated.name}`, which shares "
                f"memory with `{alias.name}`, read later by `{later[0].name}`; exfx cannot make that mutation "
                f"out of place. Write it out of place in the model's forward.")


def _param_name(node: Any) -> str | None:
    """``conv1.weight`` -> ``conv1``; ``w1`` -> ``w1``; None for a non-parameter."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "t":
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    target = str(node.target)
    return target[: -len(".weight")] if target.endswith(".weight") else target
