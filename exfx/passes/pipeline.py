"""The order the passes run in, stated once.

Analysis (:func:`exfx.analyse`, once per model)::

    capture -> shape propagation -> CanonicalizePass -> FoldBatchNormPass -> shape propagation
            -> ExchangeabilityPass (one SiteMatch per ReLU)

Compile (:meth:`exfx.Analysis.compile`, once per plan), :func:`compile_passes`::

    AnnotatePass (one SiteDecision per site; a HeadDecision for dominance) -> DominancePass
            -> EnpPass (sites decided "reference") -> LowerPass (lowering="native": sites decided "native")

Why this order: every rewrite reads the decisions, so the annotate step comes first; the dominance rewrite
replaces the head before the lowering looks for ``relu -> F.linear`` consumers, so the head is never taken for
one; the ENP rewrite runs before the lowering, which lowers the consumers of the sites it kept on the reference
ops too. Each pass checks what it needs in ``requires`` and lints the graph in ``ensures``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.fx.passes.infra.pass_base import PassBase

from exfx.meta import HeadDecision, SiteDecision
from exfx.passes.annotate_pass import AnnotatePass
from exfx.passes.dominance_pass import DominancePass
from exfx.passes.enp_pass import EnpPass
from exfx.passes.lower_pass import LowerPass

__all__ = ["compile_passes"]


def compile_passes(decisions: Mapping[str, SiteDecision], head: HeadDecision | None, lowering: str,
                   example_inputs: Sequence[Any]) -> list[PassBase]:
    """The passes that compile an analysed graph for one set of decisions, in the order they run."""
    passes: list[PassBase] = [AnnotatePass(decisions, head), DominancePass(), EnpPass()]
    if lowering == "native":
        passes.append(LowerPass(example_inputs))
    return passes
