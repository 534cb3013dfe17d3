"""exfx: a torch.fx compiler for dynamic pruning of ReLU networks: ExPrune's early negative prediction.

Example::

    >>> import exfx, torch
    >>> gm = exfx.compile(model.eval(), (torch.randn(8, 784),), exfx.Config(rule="threshold", threshold=0.0))
    >>> print(exfx.explain(model, (torch.randn(8, 784),)))
    >>> exfx.count_flops(gm, torch.randn(8, 784)).reduction
"""

from exfx import ops  # noqa: F401  (registers the exfx:: operators)
from exfx.api import compile, explain
from exfx.backend import backend  # the function; the module stays importable as exfx.backend
from exfx.calibrate import calibrate, calibrate_budgets, random_search
from exfx.config import Config, Plan, SiteParams
from exfx.errors import (
    CaptureError,
    ExfxError,
    PlanError,
    PlanMismatchError,
    TrainingModeError,
    UnsupportedModelError,
)
from exfx.flops import FlopReport, SiteFlops, count_flops
from exfx.report import Report, SiteInfo

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "Config",
    "ExfxError",
    "FlopReport",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "Report",
    "SiteFlops",
    "SiteInfo",
    "SiteParams",
    "backend",
    "calibrate",
    "calibrate_budgets",
    "random_search",
    "TrainingModeError",
    "UnsupportedModelError",
    "compile",
    "count_flops",
    "explain",
]
