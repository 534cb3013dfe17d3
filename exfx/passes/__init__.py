"""exfx's graph passes, one per file, each a ``torch.fx`` ``PassBase`` returning ``PassResult``.

The order they run in is stated once, in :mod:`exfx.passes.pipeline`.
"""

from exfx.passes.annotate_pass import AnnotatePass
from exfx.passes.canonicalize_pass import CanonicalizePass
from exfx.passes.dominance_pass import DominancePass
from exfx.passes.enp_pass import EnpPass
from exfx.passes.exchangeability_pass import ExchangeabilityPass
from exfx.passes.fold_batchnorm_pass import FoldBatchNormPass
from exfx.passes.lower_pass import LowerPass

__all__ = ["AnnotatePass", "CanonicalizePass", "DominancePass", "EnpPass", "ExchangeabilityPass",
           "FoldBatchNormPass", "LowerPass"]
