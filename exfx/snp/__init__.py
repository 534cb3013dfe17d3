"""Helpers of static structured pruning (SNP and baselines); the pass is :mod:`exfx.passes.snp_pass`, the entry
point :func:`exfx.prune` (:mod:`exfx.pruning`).

- :mod:`exfx.snp.layers`: which unit axes can be sliced, read from the exchangeable groups;
- :mod:`exfx.snp.stats`: float64 second moments of the units over a data set;
- :mod:`exfx.snp.subspace`: orderings, LDL^T energies, kept counts, the least-squares fold;
- :mod:`exfx.snp.report`: the frozen report records, parameter and FLOP counts;
- :mod:`exfx.snp.errors`: :class:`PruneError` and :class:`PruneWarning`;
- :mod:`exfx.snp.magnitude`: unstructured global magnitude masks (the comparison ExPrune's paper composes with);
- :mod:`exfx.snp.finetune`: a short SGD/Adam fine-tune of a pruned model (masks kept on request; import
  ``finetune`` from the module, which it would otherwise shadow).
"""

from exfx.snp.errors import PruneError, PruneWarning
from exfx.snp.finetune import FinetuneResult, zero_masks
from exfx.snp.layers import ConsumerSlot, PrunableLayer, RefusedLayer, find_prunable_layers
from exfx.snp.magnitude import LayerSparsity, MagnitudeResult, magnitude_prune
from exfx.snp.report import LayerPrune, PruneReport, RefusedAxis, count_forward_flops, count_parameters
from exfx.snp.stats import UnitStatistics, collect_statistics
from exfx.snp.subspace import fold_map, kept_from_energy, kept_from_ratio, ldl_diagonal, pivoted_ldl, zca_order

__all__ = [
    "ConsumerSlot", "FinetuneResult", "LayerPrune", "LayerSparsity", "MagnitudeResult", "PrunableLayer",
    "PruneError", "PruneReport", "PruneWarning", "RefusedAxis",
    "RefusedLayer", "UnitStatistics", "collect_statistics", "count_forward_flops", "count_parameters",
    "find_prunable_layers", "fold_map", "kept_from_energy", "kept_from_ratio", "ldl_diagonal", "pivoted_ldl",
    "magnitude_prune", "zca_order", "zero_masks",
]
