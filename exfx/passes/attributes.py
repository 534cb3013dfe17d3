"""Reading and placing the tensors a rewriting pass gives a GraphModule (folded weights, new biases).

Not a pass: the helpers :mod:`.fold_batchnorm_pass`, :mod:`.snp_pass` and :mod:`.enp_pass` share, so
they name new parameters and buffers the same deterministic way.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["owner_of", "free_bias_target", "register_constant"]


def owner_of(gm: torch.nn.Module, target: str) -> tuple[Any, str]:
    """The submodule that holds the dotted attribute ``target``, and the attribute's own name."""
    *path, leaf = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def free_bias_target(gm: torch.nn.Module, weight_target: str, suffix: str) -> str:
    """``conv.weight`` -> ``conv.bias`` when that slot is empty, else the first free ``<weight><suffix>[N]``."""
    if weight_target.endswith(".weight"):
        candidate = weight_target[: -len(".weight")] + ".bias"
        owner, leaf = owner_of(gm, candidate)
        if getattr(owner, leaf, None) is None:
            return candidate
    candidate, index = f"{weight_target}{suffix}", 0
    while hasattr(*owner_of(gm, candidate)):
        index += 1
        candidate = f"{weight_target}{suffix}{index}"
    return candidate


def register_constant(gm: torch.nn.Module, name: str, value: torch.Tensor) -> str:
    """Register ``value`` on ``gm`` as a buffer called ``name`` (``name_2``, ``name_3``... if taken); its final name.

    A buffer, not a plain attribute, so ``gm.to(device)`` and ``copy.deepcopy(gm)`` carry it.
    """
    final, index = name, 1
    while hasattr(gm, final):
        index += 1
        final = f"{name}_{index}"
    gm.register_buffer(final, value)
    return final
