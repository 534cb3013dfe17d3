"""The ``exfx::dominance_linear`` operator: the top-1 of a linear head without most of its logits.

A head ``logits = x @ W.T + b`` (``n`` input units, ``V`` classes) is rewritten into::

    logits, tested = exfx.dominance_linear(x, head, squares, rest, b, samples, f, alpha, site)

``x`` is in *sample order*: the ``f`` always-sampled units first (summed exactly, outside the sample), then the
``N = n - f`` sampled units in the order they are sampled. The weight is stored split at compile time:

- ``head`` ``(f + k1, V)``: the transposed columns of the exact units and of the first checkpoint's ``k1``
  units, contiguous, so the first test reads ``f + k1`` weight rows for every class in one pass;
- ``squares``: ``(k1, V)``, the squares of the sampled part of ``head`` (sample variance: each term's second
  moment is one more multiply-add); or ``(V,)``, each class's mean squared weight over the ``N`` sampled units
  (pooled variance: a term's second moment is estimated as that times the row's mean squared input);
- ``rest`` ``(V, N - k1)``: the remaining columns, row-major, so later checkpoints and the completion gather
  the rows of the classes still kept.

The test, per row and still-kept class ``j``, after ``k`` of the ``N`` sampled units: the logit's estimate is
``e_j = exact_j + b_j + N * mean``, its standard error ``N * s / sqrt(k) * sqrt((N - k) / (N - 1))`` (``s`` the
standard deviation of the ``k`` sampled terms ``t_i = W[j, i] x_i``; the last factor is the finite-population
correction, since the sample is drawn without replacement: it is 0, and the bounds exact, when ``k = N``). With
``z = Phi^-1(1 - alpha)`` the bounds are ``e_j -+ z * se_j``; class ``j`` stays while its upper bound is not
below the row's best lower bound. A schedule ``(k1, k2, ...)`` tests again after each checkpoint, on the classes
still kept.

Why the output is safe: every kept class gets the exact sum of all ``n`` terms plus the bias (the dense head's
terms, reassociated), every dropped one ``-inf``. So the argmax is the dense argmax whenever the true argmax is
kept, which fails for a row only when the true winner's upper bound falls below another class's lower bound:
with probability about ``alpha`` per close competitor when the first units are a fair sample (exchangeable
units; see :mod:`exfx.analysis.heads`). A NaN bound never drops a class (a NaN best lower bound keeps its whole
row), so NaN inputs propagate as in the dense head. ``alpha = 0`` keeps every class.

``tested`` (int64, ``len(samples) + 1``) counts the (row, class) pairs tested at each checkpoint and, last, the
pairs kept: the FLOP formula (:mod:`exfx.cost.flops`) prices the op from it.

One op, in plain torch, is also the fast form at batch 1: after the first test everything works on the classes
some row still keeps (gathered rows of ``rest``), and one dispatch replaces the five a split into partial sums,
tests and completion would cost (each ``torch.library`` call costs tens of microseconds, as much as the
element-wise work of a test over 8k classes). For a batch the union of the rows' kept classes is computed and
each row's own mask applied: exact, while the FLOPs count per-row kept classes, the convention of the ENP ops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from exfx.ops.enp import z_critical

logger = logging.getLogger(__name__)

__all__ = ["dominance_linear", "dominance_z", "dominance_keep"]


def dominance_z(alpha: float) -> float:
    """The number of standard errors each bound lies from the estimate: ``Phi^-1(1 - alpha)``; ``inf`` for 0."""
    return -z_critical(alpha)


def _union(keep: Tensor) -> Tensor:
    """Indices of the classes (last axis) that at least one row of the 2-D mask keeps."""
    return (keep[0] if keep.shape[0] == 1 else keep.any(0)).nonzero().squeeze(1)


def dominance_keep(total: Tensor, moment: Tensor, shift: Tensor | None, active: Tensor | None, count: int,
                   population: int, alpha: float) -> Tensor:
    """Which classes stay after ``count`` of ``population`` sampled units (the test of the module docstring).

    ``total`` and ``moment`` are ``(rows, classes)``: the sum of the sampled terms and of their squares (or its
    pooled estimate); ``shift`` the exact part plus bias, broadcastable to them; ``active`` the classes still in
    play. Few element-wise passes: at batch 1 the test costs about its number of passes, not its FLOPs.
    """
    if alpha <= 0.0 or count < 2:  # no test, or no variance to test with
        return torch.ones_like(total, dtype=torch.bool) if active is None else active
    correction = (population - count) / (population - 1) if population > 1 and count < population else 0.0
    z = dominance_z(alpha)
    # z * se = sqrt((moment - total^2 / k) * z^2 N^2 correction / (k (k - 1))): one sqrt of one product
    scale = z * z * population * population * correction / (count * (count - 1))
    spread = torch.addcmul(moment, total, total, value=-1.0 / count).clamp_min_(0.0).mul_(scale).sqrt_()
    estimate = total * (population / count)
    if shift is not None:
        estimate = estimate.add_(shift)
    lower = estimate - spread
    if active is not None:
        lower = lower.masked_fill_(~active, -math.inf)
    best = lower.amax(-1, keepdim=True)  # NaN if a lower bound is NaN: then nothing in the row is dropped
    keep = torch.lt(estimate.add_(spread), best).logical_not_()
    return keep if active is None else keep.logical_and_(active)


def _take(values: Tensor | None, index: Tensor) -> Tensor | None:
    """The given classes (last axis) of a per-class tensor, or None."""
    return None if values is None else values.index_select(-1, index)


@torch.library.custom_op("exfx::dominance_linear", mutates_args=())
def dominance_linear(
    x: Tensor,
    head: Tensor,
    squares: Tensor,
    rest: Tensor,
    bias: Tensor | None,
    samples: Sequence[int],
    exact_units: int,
    alpha: float,
    site: str,
) -> tuple[Tensor, Tensor]:
    """The head's logits for the classes that may be the top-1, ``-inf`` for the others; and the tested counts.

    See the module docstring for the layout of ``head``, ``squares`` and ``rest``.
    """
    units = x.shape[-1]
    rows = x.reshape(-1, units)
    f, first = exact_units, samples[0]
    population = units - f
    sampled = rows[:, f:]
    pooled = squares.dim() == 1
    power = sampled.pow(2).mean(-1, keepdim=True) if pooled else None  # the rows' mean squared input
    segment = sampled[:, :first]
    total = segment @ head[f:f + first]
    moment = (power * first) * squares if power is not None else segment.pow(2) @ squares
    shift = rows[:, :f] @ head[:f] if f else None
    if bias is not None:
        shift = bias if shift is None else shift + bias
    keep = dominance_keep(total, moment, shift, None, first, population, alpha)
    tested = [total.numel()]
    classes: Tensor | None = None  # after the first test: the global ids of the classes still computed
    done = first
    for count in samples[1:]:
        union = _union(keep)
        classes = union if classes is None else classes.index_select(0, union)
        active = keep.index_select(1, union)
        tested.append(int(active.sum()))
        block = rest[:, done - first:count - first].index_select(0, classes)  # (kept, count - done) rows
        segment = sampled[:, done:count]
        total = total.index_select(1, union).addmm_(segment, block.t())
        if power is not None:
            moment = moment.index_select(1, union).add_((power * (count - done)) * squares.index_select(0, classes))
        else:
            moment = moment.index_select(1, union).addmm_(segment.pow(2), block.pow(2).t())
        shift = _take(shift, union)
        keep = dominance_keep(total, moment, shift, active, count, population, alpha)
        done = count
    union = _union(keep)
    final = union if classes is None else classes.index_select(0, union)
    mask = keep.index_select(1, union)
    tested.append(int(mask.sum()))
    values = total.index_select(1, union)
    if shift is not None:
        values = values + _take(shift, union)
    if done < population:
        values = values.addmm_(sampled[:, done:], rest[:, done - first:].index_select(0, final).t())
    if rows.shape[0] > 1:  # the union of the rows' kept classes was computed: each row keeps its own
        values = values.masked_fill_(~mask, -math.inf)
    out = torch.full((rows.shape[0], head.shape[1]), -math.inf, dtype=values.dtype, device=values.device)
    out = out.index_copy_(1, final, values)
    return out.reshape(*x.shape[:-1], head.shape[1]), torch.tensor(tested, dtype=torch.long)


@dominance_linear.register_fake
def _dominance_linear_fake(x, head, squares, rest, bias, samples, exact_units, alpha, site):
    return (x.new_empty((*x.shape[:-1], head.shape[1])),
            torch.empty(len(samples) + 1, dtype=torch.long, device=torch.device("cpu")))
