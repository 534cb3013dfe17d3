"""``exfx::exact_exit``: the lossless early-exit test (``rule="exact"``, or ``exact=True`` beside a statistical rule).

At checkpoint ``k`` of a site ``relu(sum_u w_u . x_u + shift)`` whose input ``x`` is
provably non-negative (:mod:`exfx.analysis.sign`), the unsampled units ``[k, n)``
are split into a few blocks (:func:`exact_blocks`) and bounded from above::

    sum_{u >= k} w_u . x_u  <=  sum_b P[j, b] * N_b(x),    P[j, b] = || max(w_j, 0) over block b ||_2

because ``x >= 0`` makes every term at most its positive-weight part, and
Cauchy-Schwarz bounds each block's positive part by the product of norms.
``N_b(x)`` is the L2 norm of ``x`` over block ``b``'s features (linear), or over
block ``b``'s channels *within each output's receptive field* (conv: the channel
block's sum of squares, summed over the kernel window with the conv's stride,
padding and dilation, then a square root: a per-position bound whose input-side
work is shared by every output channel). ``P`` is computed once at compile time
(:func:`positive_block_norms`) and stored on the compiled module as a buffer. The
bound then costs one multiply-add per block and tested neuron.

Why norms, not block maxima (``P = sum of the positive weights``, ``N_b = max x``):
both are valid; on the trained VGG-11 benchmark, at 15/16 of the fan-in, the
norm bound over one block proves 10-23% of the neurons of the four deepest conv
sites negative, where maxima over single channels (16 blocks there) prove 5-18%,
and the minimum of the two bounds proves no more than the norms alone.

A neuron is pruned when ``partial + shift + bound < -margin``: a proof that its
pre-activation is negative, so its ReLU outputs 0 and pruning it changes nothing.
The margin, :data:`EXACT_MARGIN_ULPS` units of the model dtype's rounding
(``eps``) times ``|partial| + |shift| + bound``, absorbs the rounding of the
partial sum, the shift and the bound (float32: about 1.2e-4 relative), so the
pruned neurons are those the dense model would also have zeroed, up to float
reassociation. A neuron whose figures are not finite (NaN or Inf inputs) is never
pruned.

Exactness therefore does not depend on the data: kept neurons are completed as by
every rule (:func:`exfx.ops.enp.complete`), pruned ones are provably negative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from exfx.ops.enp import bias_and_residual

__all__ = ["exact_exit", "exact_blocks", "positive_block_norms", "exact_bound", "remaining_blocks", "block_count",
           "EXACT_MARGIN_ULPS", "DEFAULT_EXACT_BLOCKS"]

#: Safety margin of the test, in units of the model dtype's ``eps``, relative to ``|partial| + |shift| + bound``
#: (float32: about 1.2e-4 relative).
EXACT_MARGIN_ULPS = 1024
#: Blocks the unsampled span of a site is split into, at least one per checkpoint (the bound costs one
#: multiply-add per remaining block and tested neuron). Finer blocks give a slightly tighter bound, but on the
#: trained VGG-11 one block per checkpoint saved the most FLOPs (0.93% against 0.78% with 4 blocks).
DEFAULT_EXACT_BLOCKS = 1


def exact_blocks(fan_in: int, samples: Sequence[int], blocks: int | None = None) -> tuple[int, ...]:
    """The first unit of each bound block: every checkpoint below ``fan_in`` starts one, and the span from the
    first checkpoint to ``fan_in`` is cut into about ``blocks`` (default :data:`DEFAULT_EXACT_BLOCKS`)
    near-equal blocks.

    >>> exact_blocks(64, (16, 32), blocks=4)
    (16, 32, 42, 53)
    """
    blocks = DEFAULT_EXACT_BLOCKS if blocks is None else blocks
    cuts = [k for k in samples if k < fan_in]
    if not cuts:
        return ()
    span = fan_in - cuts[0]
    starts: list[int] = []
    for a, b in zip(cuts, cuts[1:] + [fan_in]):
        parts = max(1, min(b - a, round(blocks * (b - a) / span)))
        starts += [a + (i * (b - a)) // parts for i in range(parts)]
    return tuple(starts)


def remaining_blocks(block_starts: Sequence[int], count: int) -> int:
    """Index of the first block at or after unit ``count`` (``len(block_starts)`` when none remains)."""
    return next((i for i, start in enumerate(block_starts) if start >= count), len(block_starts))


def block_count(block_starts: Sequence[int], count: int) -> int:
    """How many blocks the bound at checkpoint ``count`` sums over."""
    return len(block_starts) - remaining_blocks(block_starts, count)


def _block_bounds(block_starts: Sequence[int], fan_in: int) -> list[tuple[int, int]]:
    return list(zip(block_starts, list(block_starts[1:]) + [fan_in]))


def _fan_in(weight: Tensor, n_units: int) -> int:
    return n_units if weight.dim() == 2 else weight.shape[1]


def positive_block_norms(weight: Tensor, n_units: int, block_starts: Sequence[int]) -> Tensor:
    """``P[j, b]``: the L2 norm of the positive weights of output ``j`` over the units of block ``b`` (and, for a
    conv, over the kernel), at least float32. Computed once, at compile time, in float64."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    squares = weight.detach().to(torch.float64).clamp_min(0.0).square()
    if weight.dim() == 2:
        per_unit = squares.reshape(weight.shape[0], n_units, -1).sum(-1)
    else:
        per_unit = squares.flatten(2).sum(-1)
    bounds = _block_bounds(block_starts, _fan_in(weight, n_units))
    if not bounds:
        return per_unit.new_zeros((weight.shape[0], 0)).to(dtype)
    return torch.stack([per_unit[:, a:b].sum(-1) for a, b in bounds], -1).sqrt().to(dtype)


def _linear_norms(x: Tensor, n_units: int, bounds: list[tuple[int, int]]) -> Tensor:
    unit = x.shape[-1] // n_units
    return torch.stack([x[..., a * unit:b * unit].square().sum(-1) for a, b in bounds], -1).sqrt()


def _conv_norms(x: Tensor, weight: Tensor, bounds: list[tuple[int, int]], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """Per block and group, the L2 norm of ``x`` over the block's channels and each output's receptive field."""
    spatial = x.shape[2:]
    grouped = x.reshape(x.shape[0], groups, x.shape[1] // groups, *spatial)
    squares = torch.stack([grouped[:, :, a:b].square().sum(2) for a, b in bounds], 2)
    channels = groups * len(bounds)
    squares = squares.reshape(x.shape[0], channels, *spatial)
    # Sum over each receptive field: a depthwise conv with a kernel of ones (the conv's zero padding adds 0).
    ones = squares.new_ones((channels, 1, *weight.shape[2:]))
    conv = F.conv1d if weight.dim() == 3 else F.conv2d
    return conv(squares, ones, None, list(stride), list(padding), list(dilation), channels).clamp_min(0.0).sqrt()


def exact_bound(x: Tensor, weight: Tensor, positive_norms: Tensor, count: int, n_units: int,
                block_starts: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int) -> Tensor | None:
    """An upper bound on the terms of units ``[count, n)`` of every neuron, for ``x >= 0`` (None when no unit
    remains)."""
    first = remaining_blocks(block_starts, count)
    bounds = _block_bounds(block_starts, _fan_in(weight, n_units))[first:]
    if not bounds:
        return None
    norms = positive_norms[:, first:]
    xs = x.to(norms.dtype)
    if weight.dim() == 2:
        return F.linear(_linear_norms(xs, n_units, bounds), norms)
    windows = _conv_norms(xs, weight, bounds, stride, padding, dilation, groups)
    conv = F.conv1d if weight.dim() == 3 else F.conv2d
    return conv(windows, norms.reshape(*norms.shape, *([1] * (weight.dim() - 2))), None, 1, 0, 1, groups)


@torch.library.custom_op("exfx::exact_exit", mutates_args=())
def exact_exit(
    state: Tensor,
    x: Tensor,
    weight: Tensor,
    positive_norms: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    active: Tensor | None,
    count: int,
    n_units: int,
    block_starts: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    site: str,
) -> Tensor:
    """Keep every still-active neuron unless ``partial + shift + bound < -margin`` proves it negative.

    ``state[0]`` is the partial sum over units ``[0, count)`` (see :func:`exfx.ops.enp.partial_sum`);
    ``positive_norms`` is :func:`positive_block_norms` of ``weight`` over ``block_starts``, and ``count`` is a
    block start or the fan-in. ``x`` must be non-negative (the analysis proves it before the rewrite asks for
    this op). Returns the boolean mask of neurons kept.
    """
    torch._check(count >= _fan_in(weight, n_units) or count in list(block_starts),
                 lambda: f"exfx::exact_exit: checkpoint {count} is not a block start {list(block_starts)}")
    dtype = torch.promote_types(state.dtype, torch.float32)
    partial = state[0].to(dtype)
    total = partial
    scale = partial.abs()
    shift = bias_and_residual(state, weight, bias, residual)
    if shift is not None:
        total = total + shift.to(dtype)
        scale = scale + shift.to(dtype).abs()
    bound = exact_bound(x, weight, positive_norms, count, n_units, block_starts, stride, padding, dilation, groups)
    if bound is not None:
        total = total + bound.to(dtype)
        scale = scale + bound.to(dtype)
    margin = EXACT_MARGIN_ULPS * torch.finfo(x.dtype).eps * scale
    proven = (total < -margin) & torch.isfinite(total) & torch.isfinite(scale)
    keep = ~proven
    return keep if active is None else keep & active


@exact_exit.register_fake
def _exact_exit_fake(state, x, weight, positive_norms, bias, residual, active, count, n_units, block_starts, stride,
                     padding, dilation, groups, site):
    return torch.empty(state.shape[1:], dtype=torch.bool, device=state.device)
