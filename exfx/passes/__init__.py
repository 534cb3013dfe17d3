"""exfx's graph passes, one per file, each a ``torch.fx`` ``PassBase`` returning ``PassResult``.

Order: :class:`CanonicalizePass` -> :class:`FoldBatchNormPass` ->
:class:`ExchangeabilityPass` (analysis) -> :class:`EnpPass` (rewrite) -> :class:`LowerPass`
(opt-in: native kernels or dense, whichever measures faster). :class:`DominancePass` (opt-in,
``Analysis.compile(..., dominance=...)``) rewrites the prediction head before :class:`EnpPass`.
"""

from exfx.passes.canonicalize_pass import CanonicalizePass
from exfx.passes.dominance_pass import DominancePass
from exfx.passes.enp_pass import EnpPass
from exfx.passes.exchangeability_pass import ExchangeabilityPass
from exfx.passes.fold_batchnorm_pass import FoldBatchNormPass
from exfx.passes.lower_pass import LowerPass

__all__ = ["CanonicalizePass", "DominancePass", "EnpPass", "ExchangeabilityPass", "FoldBatchNormPass", "LowerPass"]
