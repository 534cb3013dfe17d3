"""A short supervised fine-tune of a pruned model (structured or masked), to recover what one-shot pruning lost.

:func:`finetune` runs plain SGD (momentum, optionally Nesterov) or Adam with a
cosine-decayed learning rate for a fixed number of steps over ``(inputs,
targets)`` batches, then returns the module in eval mode. With
``keep_zeros=True`` every weight that is exactly zero at the start is held at
zero after each step, so an unstructured (magnitude) pruning mask survives the
fine-tune.

Why it is safe: it changes parameter *values* only, never the graph or a
shape, so a pruned ``GraphModule`` can be fine-tuned and then analysed and
compiled like any model. Parameters whose ``requires_grad`` is False (the
analysis stores folded BatchNorm weights that way) are switched on for the
fine-tune only, and restored afterwards. Buffers are never trained.

Example::

    >>> pruned, report = exfx.prune(model, (x,), val_batches, ratio=0.5)
    >>> result = finetune(pruned, train_batches, steps=200, lr=0.01)
    >>> result.steps, result.final_loss
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from exfx.snp.errors import PruneError

logger = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "finetune", "zero_masks", "OPTIMISERS"]

#: Optimisers :func:`finetune` knows.
OPTIMISERS = ("sgd", "adam")

#: ``loss(outputs, targets) -> scalar tensor``.
Loss = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did: steps run, examples seen, the mean loss of the first and last 10% of steps."""

    steps: int
    examples: int
    first_loss: float
    final_loss: float
    seconds: float


def zero_masks(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``name -> (parameter != 0)`` for every floating parameter of ``module`` that holds at least one zero."""
    masks: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if param.is_floating_point() and bool((param == 0).any()):
            masks[name] = param.detach() != 0
    return masks


def _check(steps: int, lr: float, optimiser: str) -> None:
    if not (isinstance(steps, int) and steps >= 1):
        raise PruneError(f"finetune: steps={steps!r} must be an integer >= 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PruneError(f"finetune: lr={lr!r} must be a finite number > 0")
    if optimiser not in OPTIMISERS:
        raise PruneError(f"finetune: optimiser={optimiser!r} is not one of {OPTIMISERS}")


def _make_optimiser(params: list[torch.nn.Parameter], optimiser: str, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if optimiser == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _batches(data: Iterable[Any], steps: int) -> Iterable[Any]:
    """``steps`` batches of ``data``, cycling over it when it is re-iterable and shorter than ``steps``."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise PruneError("finetune: data is empty; give (inputs, targets) batches")
        return itertools.islice(itertools.cycle(data), steps)
    return itertools.islice(data, steps)


def finetune(module: torch.nn.Module, data: Iterable[Any], *, steps: int, lr: float = 0.01,
             optimiser: str = "sgd", weight_decay: float = 5e-4, loss: Loss = F.cross_entropy,
             keep_zeros: bool = False, transform: Callable[[Any], Any] | None = None) -> FinetuneResult:
    """Fine-tune ``module`` in place for ``steps`` batches of ``data``; leave it in eval mode.

    Args:
        module: the (pruned) model; its parameters are updated in place.
        data: ``(inputs, targets)`` batches (the *training* split): a list is cycled over; an
            iterator must yield at least ``steps`` batches (fewer ends the fine-tune early).
        steps: optimiser steps.
        lr: peak learning rate (cosine-decayed to 0 over ``steps``).
        optimiser: ``sgd`` (momentum 0.9, Nesterov) or ``adam``.
        weight_decay: L2 weight decay.
        loss: ``loss(outputs, targets)``; cross-entropy by default.
        keep_zeros: hold every weight that is zero at the start at zero (a magnitude-pruning mask).
        transform: applied to each batch's inputs before the forward pass (e.g. augmentation).

    Raises:
        exfx.snp.PruneError: a bad argument (named), empty data, or a non-finite loss (the step is named).
    """
    _check(steps, lr, optimiser)
    started = time.perf_counter()
    params = [p for p in module.parameters() if p.is_floating_point()]
    was_frozen = [not p.requires_grad for p in params]
    masks = {id(p): p.detach() != 0 for p in params if keep_zeros and bool((p == 0).any())}
    for p in params:
        p.requires_grad_(True)
    opt = _make_optimiser(params, optimiser, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    losses: list[float] = []
    examples = 0
    module.train()
    try:
        for step, (inputs, targets) in enumerate(_batches(data, steps)):
            x = transform(inputs) if transform is not None else inputs
            value = loss(module(x), targets)
            if not torch.isfinite(value):
                raise PruneError(f"finetune: the loss is {value.item()} at step {step}; lower lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            schedule.step()
            _apply_masks(params, masks)
            losses.append(float(value.detach()))
            examples += len(targets)
    finally:
        module.eval()
        for p, frozen in zip(params, was_frozen):
            p.requires_grad_(not frozen)
            p.grad = None
    if not losses:
        raise PruneError("finetune: data yielded no batch")
    tenth = max(1, len(losses) // 10)
    result = FinetuneResult(steps=len(losses), examples=examples, first_loss=sum(losses[:tenth]) / tenth,
                            final_loss=sum(losses[-tenth:]) / tenth, seconds=time.perf_counter() - started)
    logger.info("finetune: %d steps, %d examples, loss %.4f -> %.4f, %.1f s", result.steps, result.examples,
                result.first_loss, result.final_loss, result.seconds)
    return result


def _apply_masks(params: list[torch.nn.Parameter], masks: dict[int, torch.Tensor]) -> None:
    if not masks:
        return
    with torch.no_grad():
        for p in params:
            mask = masks.get(id(p))
            if mask is not None:
                p.mul_(mask)
