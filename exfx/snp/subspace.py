"""The subspace algebra of SNP: unit orderings, the LDL^T energies, kept counts and the least-squares fold.

All of it works on one layer's covariance ``S`` (``n x n``, float64) of its
post-ReLU units (SNP, arXiv 2405.17506, section 2 of PAPERS.md):

- :func:`pivoted_ldl` orders units greedily, always taking next the unit with
  the largest variance left unexplained by the units already taken (pivoted
  Cholesky), and returns the LDL^T diagonal in that order;
- :func:`zca_order` orders them by an "unnormalised ZCA" importance (see its
  docstring for what was reconstructed);
- :func:`ldl_diagonal` factorises ``S`` in a given order: ``D[i]`` is the energy
  of the part of unit ``order[i]`` that the earlier units cannot explain, the
  unnormalised Gram-Schmidt of the units (the rows of ``Y = L^{-1} X`` are
  orthogonal with energies ``D``). Because ``L`` is triangular, dropping the last
  units drops only their own rows of ``Y``;
- :func:`fold_map` solves ``a_P ~ A a_K + c`` in least squares from the same
  statistics, for the consumer fold ``W_K <- W_K + W_P A``, ``b <- b + W_P c``.

The covariance (centred Gram) is used rather than ``E[a a^T]``: the fold has a
constant term ``c`` that goes into the consumer bias, which is the paper's
"append a constant-1 row" option, so a unit that is constant (a dead ReLU) is
perfectly redundant and must have zero energy.

Why it is safe: each function is exact linear algebra on a symmetric positive
semi-definite matrix; pivots below ``tol * max(diag)`` are treated as zero
(never divided by), and the fold's normal equations carry a relative ridge so a
rank-deficient layer still gives a finite, minimum-norm-like solution.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = ["pivoted_ldl", "ldl_diagonal", "zca_order", "kept_from_ratio", "kept_from_energy", "fold_map",
           "PIVOT_TOLERANCE"]

#: Pivots below this fraction of the largest variance count as zero (the unit is fully explained).
PIVOT_TOLERANCE = 1e-12


def _factorise(cov: torch.Tensor, order: list[int] | None) -> tuple[list[int], torch.Tensor]:
    """Symmetric elimination of ``cov``; greedy pivots when ``order`` is None, else in ``order``."""
    n = cov.shape[0]
    schur = cov.to(torch.float64).clone()
    floor = PIVOT_TOLERANCE * max(float(torch.diagonal(schur).max()), 0.0) if n else 0.0
    remaining = torch.ones(n, dtype=torch.bool)
    taken: list[int] = []
    energies = torch.zeros(n, dtype=torch.float64)
    for step in range(n):
        if order is None:
            diag = torch.where(remaining, torch.diagonal(schur), torch.tensor(-math.inf, dtype=torch.float64))
            pivot = int(torch.argmax(diag))  # the first index of the largest: deterministic ties
        else:
            pivot = order[step]
        d = float(schur[pivot, pivot])
        energies[step] = max(d, 0.0)
        taken.append(pivot)
        remaining[pivot] = False
        if d > floor:
            column = schur[:, pivot].clone()
            schur -= torch.outer(column, column) / d
        schur[pivot, :] = 0.0
        schur[:, pivot] = 0.0
    return taken, energies


def pivoted_ldl(cov: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Greedy pivoted LDL^T: ``(order, D)``, most informative unit first, most redundant last.

    ``D[i]`` is the conditional variance of unit ``order[i]`` given ``order[:i]``
    (and the constant), non-increasing up to rounding.
    """
    return _factorise(cov, None)


def ldl_diagonal(cov: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The LDL^T diagonal of ``cov`` with its units taken in ``order``."""
    if sorted(order) != list(range(cov.shape[0])):
        raise ValueError(f"order must be a permutation of range({cov.shape[0]})")
    return _factorise(cov, list(order))[1]


def zca_order(cov: torch.Tensor) -> list[int]:
    """Units by decreasing "unnormalised ZCA" importance ``(S^{1/2})_{ii}^2`` (ties: lower index first).

    Reconstructed from the paper's description (its code is not public): ZCA
    whitening ``z = S^{-1/2} x`` is the symmetric decorrelation that keeps each
    whitened component aligned with its own unit. Undoing it, ``x = S^{1/2} z``,
    unit ``i`` is ``sum_j (S^{1/2})_{ij} z_j``; the energy it carries along its own
    whitened direction, ``(S^{1/2})_{ii}^2``, is its unnormalised ZCA importance.
    A unit that duplicates another shares its direction and gets half the
    energy of an independent unit of the same variance, so it sorts later. The
    order is computed once (not re-ranked after each removal); the LDL^T in that
    order then gives the energies.
    """
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    importance = torch.diagonal(root) ** 2
    return sorted(range(cov.shape[0]), key=lambda i: (-float(importance[i]), i))


def _round_up(count: int, multiple: int, n: int) -> int:
    return min(n, max(multiple, math.ceil(count / multiple) * multiple))


def kept_from_ratio(n: int, ratio: float, round_to: int = 1) -> int:
    """Units kept when removing the fraction ``ratio`` of ``n``, rounded to a multiple of ``round_to`` (>= 1)."""
    kept = n * (1.0 - ratio)
    rounded = round(kept / round_to) * round_to
    return max(1, min(n, max(rounded, min(round_to, n))))


def kept_from_energy(energies: torch.Tensor, keep_variance: float, round_to: int = 1) -> int:
    """The fewest leading units whose share of the layer's total LDL energy reaches ``keep_variance``.

    Energies are normalised by their sum (the trace of ``D``), so one threshold
    compares layers of any scale. A layer with no energy at all keeps one unit
    (or ``round_to``).
    """
    n = energies.shape[0]
    total = float(energies.sum())
    if total <= 0.0:
        return max(1, min(round_to, n))
    share = torch.cumsum(energies, 0) / total
    reached = torch.nonzero(share >= keep_variance - 1e-12)
    count = int(reached[0]) + 1 if len(reached) else n
    return max(1, _round_up(count, round_to, n))


def fold_map(cov: torch.Tensor, mean: torch.Tensor, kept: list[int], removed: list[int],
             ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, c)`` minimising ``E||a_P - A a_K - c||^2``: ``A = S_PK (S_KK + lambda I)^{-1}``, ``c = mu_P - A mu_K``.

    ``lambda = ridge * trace(S_KK) / |K|`` (relative, so the ridge means the same
    at every scale; ``ridge`` itself when the kept units have no variance).
    """
    s_kk = cov[kept][:, kept]
    s_pk = cov[removed][:, kept]
    scale = float(torch.diagonal(s_kk).mean()) if kept else 0.0
    lam = ridge * scale if scale > 0 else ridge
    system = s_kk + lam * torch.eye(len(kept), dtype=torch.float64)
    a_matrix = torch.linalg.solve(system, s_pk.T).T  # S_KK symmetric: A^T = S_KK^-1 S_KP
    offset = mean[removed] - a_matrix @ mean[kept]
    return a_matrix, offset
