"""The entry point of static structured pruning, :func:`exfx.prune`: SNP (Subspace Node Pruning, arXiv
2405.17506) and its baselines.

It sits beside :mod:`exfx.api` (whose :func:`~exfx.api.analyse` it calls): it chooses what to remove and
hands the edits to :class:`exfx.passes.snp_pass.SnpPass`, which only applies them. The module is named
``pruning`` so that it does not hide the function ``exfx.prune``.

:func:`prune` removes hidden units physically and returns a smaller GraphModule:

1. ``exfx.analyse`` the model once; :func:`exfx.snp.layers.find_prunable_layers`
   reads the exchangeable groups and keeps the unit axes whose every coupled
   axis (producer rows and bias, channel-wise ops, consumer columns or
   channel blocks) it knows how to slice. Residual streams, concats, model
   inputs and outputs are refused, with the reason in the report.
2. Statistics (:mod:`exfx.snp.stats`): the float64 covariance and mean of the
   units as each consumer sees them, over ``data`` (conv positions are samples).
3. Order (:mod:`exfx.snp.subspace`): pivoted Cholesky or the ZCA importance
   puts the most redundant units last; the LDL^T diagonal in that order is the
   energy each unit adds to the retained subspace.
4. Count: one global ``ratio`` of units removed per layer, or one global
   ``keep_variance`` threshold on each layer's normalised cumulative energy.
5. Fold and remove (:class:`~exfx.passes.snp_pass.SnpPass`): the removed units ``P`` are replaced in
   every consumer by their least-squares reconstruction from the kept ones,
   ``a_P ~ A a_K + c``: ``W_K <- W_K + W_P A`` at every kernel tap or flatten
   position, ``b <- b + W_P c``; then producer rows, biases and consumer columns
   are sliced out.

Baselines use the same physical removal: ``l1`` (largest producer-row L1 norms
kept, no fold), ``random`` (seeded) and ``bias_fold`` (lowest-L1 units removed,
their mean folded into the consumer bias). ``magnitude`` is the unstructured
comparison: global smallest-|w| masks over every linear/conv weight, nothing
removed (:mod:`exfx.snp.magnitude`).

Why it is safe: the rewrite (:mod:`exfx.passes.snp_pass`) changes only ``get_attr``
tensors, along exactly the axes of one exchangeable group, and its fold is exact
whenever the removed units are affine in the kept ones on the data (otherwise the
least-squares best). The result is a fresh GraphModule, linted and with its shapes
re-propagated on the example inputs; at ratio 0 nothing changes. Statistics are
collected once, on the unpruned model (one-shot pruning).

Example::

    >>> pruned, report = prune(model.eval(), (x,), loader, ratio=0.5)
    >>> print(report)
    >>> pruned(x).shape == model(x).shape
    True
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from exfx.cost.flops import leading_size
from exfx.analysis.axes import AxisGroups
from exfx.api import analyse
from exfx.capture import normalise_inputs
from exfx.meta import GROUPS_KEY, SITE_KEY
from exfx.passes.attributes import owner_of
from exfx.passes.snp_pass import ConsumerFold, LayerEdit, SnpPass
from exfx.report import reason_lines
from exfx.snp.errors import PruneError, PruneWarning
from exfx.snp.layers import PrunableLayer, find_prunable_layers
from exfx.snp.magnitude import magnitude_prune
from exfx.snp.report import LayerPrune, PruneReport, RefusedAxis, count_forward_flops, count_parameters
from exfx.snp.stats import UnitStatistics, collect_statistics
from exfx.snp.subspace import fold_map, kept_from_energy, kept_from_ratio, ldl_diagonal, pivoted_ldl, zca_order

logger = logging.getLogger(__name__)

__all__ = ["prune", "prune_analysed", "AnalysedModel", "METHODS", "ORDERS", "MIN_RIDGE_FEW_SAMPLES"]

#: Unit selection methods (``magnitude``: unstructured global masks, see :mod:`exfx.snp.magnitude`).
METHODS = ("snp", "l1", "random", "bias_fold", "magnitude")
#: Orderings for SNP (and for the counts of every method under ``keep_variance``).
ORDERS = ("pivoted_cholesky", "zca")
#: The relative ridge used at least when a layer saw fewer samples than it has units.
MIN_RIDGE_FEW_SAMPLES = 1e-3


class AnalysedModel(Protocol):
    """What :func:`prune_analysed` reads of an :class:`exfx.Analysis`."""

    graph_module: fx.GraphModule
    groups: AxisGroups
    model_name: str


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def _check_arguments(method: str, ratio: float | None, keep_variance: float | None, order: str, ridge: float,
                     round_to: int) -> None:
    if method not in METHODS:
        raise PruneError(f"method={method!r} is not one of {METHODS}")
    if order not in ORDERS:
        raise PruneError(f"order={order!r} is not one of {ORDERS}")
    if (ratio is None) == (keep_variance is None):
        raise PruneError("give exactly one of ratio= (fraction of units removed per layer) or keep_variance= "
                         f"(share of each layer's subspace energy kept); got ratio={ratio}, "
                         f"keep_variance={keep_variance}")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise PruneError(f"ratio={ratio} is outside [0, 1): it is the fraction of each layer's units removed")
    if keep_variance is not None and not (isinstance(keep_variance, (int, float)) and 0.0 < keep_variance <= 1.0):
        raise PruneError(f"keep_variance={keep_variance} is outside (0, 1]: it is the share of each layer's "
                         f"energy kept")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0.0):
        raise PruneError(f"ridge={ridge} must be a finite number >= 0")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise PruneError(f"round_to={round_to} must be an integer >= 1")
    if method == "magnitude" and ratio is None:
        raise PruneError("method='magnitude' takes ratio= (the global fraction of linear/conv weights set to "
                         "zero), not keep_variance=")


def _layer_statistics(layers: Sequence[PrunableLayer], stats: dict[str, UnitStatistics],
                      ridge: float) -> dict[str, float]:
    """Check every layer's statistics; the ridge each layer's fold uses (raised where samples < units)."""
    ridges: dict[str, float] = {}
    for layer in layers:
        ridges[layer.name] = ridge
        for slot in layer.consumers:
            s = stats[slot.stats_node]
            if not s.is_finite():
                raise PruneError(f"layer `{layer.name}`: the statistics of `{slot.stats_node}` (read by "
                                 f"`{slot.name}`) contain NaN or inf; the model produced non-finite activations "
                                 f"on data. Check the inputs and the model's weights.")
            if s.count < layer.n_units:
                ridges[layer.name] = max(ridge, MIN_RIDGE_FEW_SAMPLES)
                warnings.warn(PruneWarning(
                    f"layer `{layer.name}`: {s.count} statistics samples at `{slot.stats_node}` for "
                    f"{layer.n_units} units; its Gram matrix is singular, so a ridge of "
                    f"{ridges[layer.name]:g} is added. Give more data."), stacklevel=3)
    return ridges


def _l1_order(gm: fx.GraphModule, layer: PrunableLayer) -> list[int]:
    """Units by decreasing L1 norm of their producer row (ties: lower index first)."""
    owner, leaf = owner_of(gm, layer.weight)
    weight = getattr(owner, leaf).detach().double()
    norms = weight.reshape(weight.shape[0], -1).abs().sum(1)
    return sorted(range(layer.n_units), key=lambda i: (-float(norms[i]), i))


def _subspace_order(cov: torch.Tensor, order: str) -> tuple[list[int], torch.Tensor]:
    if order == "pivoted_cholesky":
        return pivoted_ldl(cov)
    ranked = zca_order(cov)
    return ranked, ldl_diagonal(cov, ranked)


def _energy_share(cov: torch.Tensor, kept: Sequence[int]) -> float:
    """Share of the LDL^T energy carried by ``kept`` when they are factorised first (greedy order within ``kept``,
    as SNP's own pivots are, so the shares of every method compare)."""
    keep = set(kept)
    rest = [i for i in range(cov.shape[0]) if i not in keep]
    index = torch.tensor(list(kept), dtype=torch.long)
    within, _ = pivoted_ldl(cov[index][:, index])
    energies = ldl_diagonal(cov, [kept[i] for i in within] + rest)
    total = float(energies.sum())
    return float(energies[: len(kept)].sum()) / total if total > 0 else 1.0


@dataclass(frozen=True)
class _Choice:
    kept: tuple[int, ...]
    energy_kept: float | None


def _choose(gm: fx.GraphModule, layer: PrunableLayer, cov: torch.Tensor | None, *, method: str, order: str,
            ratio: float | None, keep_variance: float | None, round_to: int, generator: torch.Generator) -> _Choice:
    subspace: tuple[list[int], torch.Tensor] | None = None
    if cov is not None and (method == "snp" or keep_variance is not None):
        subspace = _subspace_order(cov, order)
    if ratio is not None:
        count = kept_from_ratio(layer.n_units, ratio, round_to)
    else:
        assert subspace is not None and keep_variance is not None
        count = kept_from_energy(subspace[1], keep_variance, round_to)
    if method == "snp":
        assert subspace is not None
        ranked = subspace[0]
    elif method == "random":
        ranked = [int(i) for i in torch.randperm(layer.n_units, generator=generator)]
    else:
        ranked = _l1_order(gm, layer)
    kept = tuple(sorted(ranked[:count]))
    if cov is None:
        return _Choice(kept, None)
    if method == "snp" and subspace is not None:
        total = float(subspace[1].sum())
        return _Choice(kept, float(subspace[1][:count].sum()) / total if total > 0 else 1.0)
    return _Choice(kept, _energy_share(cov, kept))


def _folds(layer: PrunableLayer, kept: tuple[int, ...], method: str, stats: dict[str, UnitStatistics] | None,
           ridge: float) -> tuple[ConsumerFold, ...]:
    if method in ("l1", "random") or len(kept) == layer.n_units or stats is None:
        return tuple(ConsumerFold(slot) for slot in layer.consumers)
    keep = set(kept)
    removed = [i for i in range(layer.n_units) if i not in keep]
    folds = []
    for slot in layer.consumers:
        s = stats[slot.stats_node]
        if method == "bias_fold":
            folds.append(ConsumerFold(slot, offset=s.mean[removed]))
        else:
            a_matrix, offset = fold_map(s.covariance, s.mean, list(kept), removed, ridge)
            folds.append(ConsumerFold(slot, a_matrix=a_matrix, offset=offset))
    return tuple(folds)


def _rebuilt(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """A fresh GraphModule holding only what the graph reads, with stale analysis meta dropped, shapes re-propagated."""
    graph = copy.deepcopy(gm.graph)
    result = fx.GraphModule(gm, graph, type(gm).__name__)
    for node in result.graph.nodes:
        node.meta.pop(SITE_KEY, None)  # the units changed: the analysis verdicts no longer hold
        node.meta.pop(GROUPS_KEY, None)
    result.graph.lint()
    with torch.no_grad():
        ShapeProp(result).propagate(*inputs)
    return result


def _magnitude(analysis: AnalysedModel, inputs: tuple[Any, ...], sparsity: float, order: str,
               start: float) -> tuple[fx.GraphModule, PruneReport]:
    """``method="magnitude"``: masks only (:func:`exfx.snp.magnitude.magnitude_prune`); no layer is shrunk."""
    gm = analysis.graph_module
    pruned, result = magnitude_prune(analysis, inputs, sparsity=sparsity)
    flops = count_forward_flops(gm, inputs)
    report = PruneReport(method="magnitude", order=order, ratio=sparsity, keep_variance=None, layers=(), refused=(),
                         params_before=count_parameters(gm), params_after=count_parameters(pruned),
                         flops_before=flops, flops_after=flops, seconds=time.perf_counter() - start,
                         examples=leading_size(tuple(inputs)),
                         sparsity=result.sparsity)
    logger.info("snp: %s", report)
    return pruned, report


def prune(model: torch.nn.Module | AnalysedModel, example_inputs: Any, data: Iterable[Any] | None, *,
          method: str = "snp", ratio: float | None = None, keep_variance: float | None = None,
          order: str = "pivoted_cholesky", ridge: float = 1e-6, round_to: int = 1,
          seed: int = 0) -> tuple[fx.GraphModule, PruneReport]:
    """Remove hidden units of ``model`` for good; return the smaller GraphModule and a :class:`PruneReport`.

    Args:
        model: an eval-mode module (never modified), or an :class:`exfx.Analysis` of it to reuse
            (analysing once and pruning at several ratios).
        example_inputs: a tensor or tuple of positional inputs (shapes, FLOP counts, checks).
        data: an iterable of ``(inputs, targets)`` batches for the statistics. Needed by ``snp`` and
            ``bias_fold`` and by any method with ``keep_variance``; may be None for ``l1``/``random``
            with ``ratio``. A re-iterable (a list, a DataLoader) is read once.
        method: ``snp`` (subspace order + least-squares fold), ``l1``, ``random`` or ``bias_fold``; or
            ``magnitude``: unstructured global magnitude masks (nothing removed; ``report.sparsity``).
        ratio: fraction of each prunable layer's units removed, in ``[0, 1)``; for ``magnitude``, the
            global fraction of linear/conv weights zeroed.
        keep_variance: instead of ``ratio``: one global threshold in ``(0, 1]`` on each layer's cumulative
            LDL^T energy (normalised by the layer's total); every method then uses these per-layer counts.
        order: ``pivoted_cholesky`` (greedy) or ``zca`` (see :func:`exfx.snp.subspace.zca_order`).
        ridge: relative ridge of the fold's normal equations (raised to
            :data:`MIN_RIDGE_FEW_SAMPLES` with a :class:`PruneWarning` where a layer has fewer samples
            than units).
        round_to: kept counts are rounded to a multiple of this (capped at the layer's size).
        seed: seed of ``method="random"``.

    Raises:
        exfx.snp.PruneError: a bad argument (named), no data where data is needed, or NaN/inf statistics
            (the layer is named). A model with no prunable layer is not an error: it is returned
            unchanged, with a :class:`PruneWarning` (and the report) saying why for every ReLU.
    """
    start = time.perf_counter()
    _check_arguments(method, ratio, keep_variance, order, ridge, round_to)
    analysis = model if hasattr(model, "graph_module") and hasattr(model, "groups") \
        else analyse(model, example_inputs)  # type: ignore[arg-type]
    return prune_analysed(analysis, example_inputs, data, method=method, ratio=ratio,  # type: ignore[arg-type]
                          keep_variance=keep_variance, order=order, ridge=ridge, round_to=round_to, seed=seed,
                          start=start)


def prune_analysed(analysis: AnalysedModel, example_inputs: Any, data: Iterable[Any] | None, *,
                   method: str = "snp", ratio: float | None = None, keep_variance: float | None = None,
                   order: str = "pivoted_cholesky", ridge: float = 1e-6, round_to: int = 1, seed: int = 0,
                   start: float | None = None) -> tuple[fx.GraphModule, PruneReport]:
    """:func:`prune` of an already analysed model (``analysis.graph_module`` is never modified).

    ``start`` is the ``time.perf_counter()`` the reported wall time counts from (default: now).
    """
    start = time.perf_counter() if start is None else start
    _check_arguments(method, ratio, keep_variance, order, ridge, round_to)
    inputs = normalise_inputs(example_inputs)
    gm = analysis.graph_module
    if method == "magnitude":
        return _magnitude(analysis, inputs, float(ratio), order, start)  # type: ignore[arg-type]
    layers, refused = find_prunable_layers(gm, analysis.groups)
    stats: dict[str, UnitStatistics] | None = None
    ridges = {layer.name: ridge for layer in layers}
    if layers and (method in ("snp", "bias_fold") or keep_variance is not None):
        if data is None:
            raise PruneError(f"method={method!r}"
                             f"{' with keep_variance' if keep_variance is not None else ''} needs data: "
                             f"an iterable of (inputs, targets) batches")
        watch = {slot.stats_node: slot.stats_axis for layer in layers for slot in layer.consumers}
        stats = collect_statistics(gm, watch, data)
        ridges = _layer_statistics(layers, stats, ridge)
    generator = torch.Generator().manual_seed(seed)
    edits: list[LayerEdit] = []
    records: list[LayerPrune] = []
    for layer in layers:
        primary = stats[layer.consumers[0].stats_node] if stats is not None else None
        cov = primary.covariance if primary is not None else None
        choice = _choose(gm, layer, cov, method=method, order=order, ratio=ratio, keep_variance=keep_variance,
                         round_to=round_to, generator=generator)
        edits.append(LayerEdit(layer, choice.kept, _folds(layer, choice.kept, method, stats, ridges[layer.name])))
        records.append(LayerPrune(name=layer.name, units_before=layer.n_units, units_after=len(choice.kept),
                                  method=method, kept=choice.kept,
                                  consumers=tuple(slot.name for slot in layer.consumers),
                                  samples=primary.count if primary is not None else 0,
                                  energy_kept=choice.energy_kept))
    work = copy.deepcopy(gm)
    SnpPass(edits)(work)
    pruned = _rebuilt(work, inputs)
    report = PruneReport(
        method=method, order=order, ratio=ratio, keep_variance=keep_variance, layers=tuple(records),
        refused=tuple(RefusedAxis(r.name, r.relu, r.reason) for r in refused),
        params_before=count_parameters(gm), params_after=count_parameters(pruned),
        flops_before=count_forward_flops(gm, inputs), flops_after=count_forward_flops(pruned, inputs),
        examples=leading_size(tuple(inputs)),
        seconds=time.perf_counter() - start)
    if not layers:
        logger.info("snp: no prunable layer in %s; returning it unchanged\n%s", analysis.model_name, report)
        warnings.warn(PruneWarning(_nothing_to_prune(analysis.model_name, report.refused)), stacklevel=3)
    else:
        logger.info("snp: %s", report)
    return pruned, report


def _nothing_to_prune(model_name: str, refused: Sequence[RefusedAxis]) -> str:
    """Why :func:`prune` returns the model unchanged: each ReLU's reason, or that there is none."""
    if not refused:
        return f"exfx.prune: {model_name} has no ReLU whose units could be pruned; it is returned unchanged"
    return (f"exfx.prune: no layer of {model_name} can be pruned, so it is returned unchanged; why, per ReLU:\n"
            f"{reason_lines((r.name, r.reason) for r in refused)}")
