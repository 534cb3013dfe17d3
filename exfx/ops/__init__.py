"""The ``exfx::`` custom operators (declared with ``torch.library``).

Importing this package registers them; ``torch.ops.exfx.partial_sum`` and friends
(``exact_exit``, the lossless test, in :mod:`exfx.ops.exact`) are then available,
with reference and fake implementations. Their FLOP formulas
are registered by :mod:`exfx.cost.flops`, from the cost model in :mod:`exfx.cost.model`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

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

#: Names that moved to the cost model: still served here, with a DeprecationWarning naming the new home.
_MOVED = {"MOMENT_FLOPS_PER_TERM": "exfx.cost.model", "THRESHOLD_TEST_FLOPS": "exfx.cost.model",
          "ZTEST_TEST_FLOPS": "exfx.cost.model"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"exfx.ops.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'exfx.ops' has no attribute {name!r}")
