"""Reading and placing the tensors a rewriting pass gives a GraphModule (folded weights, new biases).

Not a pass: the helpers the rewriting passes (and :mod:`exfx.snp`) share, so they name new attributes the same
deterministic way (:func:`slug`, :func:`fresh_attribute`) and replace a tensor in place the same way
(:func:`replace_tensor`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["owner_of", "free_bias_target", "register_constant", "replace_tensor", "slug", "fresh_attribute"]


def slug(name: str, empty: str = "site") -> str:
    """``layer1.0.conv1`` -> ``layer1_0_conv1``: a dotted name as a node or attribute name (``empty`` if none)."""
    return re.sub(r"\W+", "_", name).strip("_") or empty


def fresh_attribute(owner: torch.nn.Module, name: str, separator: str = "_") -> str:
    """``name``, or the first of ``name<separator>2``, ``name<separator>3``, ... that ``owner`` does not have."""
    final, index = name, 1
    while hasattr(owner, final):
        index += 1
        final = f"{name}{separator}{index}"
    return final


def owner_of(gm: torch.nn.Module, target: str) -> tuple[Any, str]:
    """The submodule that holds the dotted attribute ``target``, and the attribute's own name."""
    *path, leaf = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def free_bias_target(gm: torch.nn.Module, weight_target: str, suffix: str) -> str:
    """``conv.weight`` -> ``conv.bias`` when that slot is empty, else ``<weight><suffix>`` made free by
    :func:`fresh_attribute` (``conv.weight_folded_bias``, ``conv.weight_folded_bias_2``, ...)."""
    if weight_target.endswith(".weight"):
        candidate = weight_target[: -len(".weight")] + ".bias"
        owner, leaf = owner_of(gm, candidate)
        if getattr(owner, leaf, None) is None:
            return candidate
    owner, leaf = owner_of(gm, weight_target)
    return weight_target[: -len(leaf)] + fresh_attribute(owner, f"{leaf}{suffix}")


def register_constant(gm: torch.nn.Module, name: str, value: torch.Tensor) -> str:
    """Register ``value`` on ``gm`` as a buffer called ``name`` (``name_2``, ``name_3``... if taken); its final name.

    A buffer, not a plain attribute, so ``gm.to(device)`` and ``copy.deepcopy(gm)`` carry it.
    """
    final = fresh_attribute(gm, name)
    gm.register_buffer(final, value)
    return final


def replace_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor, *, requires_grad: bool = False) -> None:
    """Put ``value`` at the dotted ``target`` of ``gm`` in place of the tensor there, keeping its kind.

    A buffer stays a buffer (persistent or not) and a plain tensor attribute a plain attribute; a parameter, an
    empty parameter slot (``bias=None``) or a name not yet taken becomes a parameter with ``requires_grad``.
    """
    owner, leaf = owner_of(gm, target)
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    elif leaf in owner._parameters or not hasattr(owner, leaf):
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=requires_grad))
    else:
        setattr(owner, leaf, value)
