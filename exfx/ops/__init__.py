"""The ``exfx::`` custom operators (declared with ``torch.library``).

Importing this package registers them; ``torch.ops.exfx.partial_sum`` and friends
(``exact_exit``, the lossless test, in :mod:`exfx.ops.exact`) are then available,
with reference and fake implementations. Their FLOP formulas
are registered by :mod:`exfx.cost.flops`, from the cost model in :mod:`exfx.cost.model`.
"""

from __future__ import annotations

from exfx.ops.enp import (
    RULES,
    complete,
    cutoff,
    early_exit,
    exit_statistic,
    fan_in_of,
    partial_sum,
    terms_per_unit,
    z_critical,
)
from exfx.ops.exact import exact_exit
from exfx.ops.dominance import dominance_linear

__all__ = ["RULES", "complete", "cutoff", "dominance_linear", "early_exit", "exact_exit", "exit_statistic",
           "fan_in_of", "partial_sum", "terms_per_unit", "z_critical"]
