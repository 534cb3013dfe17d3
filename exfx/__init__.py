"""exfx: a torch.fx compiler for dynamic pruning of ReLU networks: ExPrune's early negative prediction.

Analyse a model once, then compile it with as many plans as you like::

    >>> import exfx, torch
    >>> analysis = exfx.analyse(model.eval(), (torch.randn(8, 784),))
    >>> print(analysis.report)                                    # every ReLU: site or not, and why
    >>> gm = analysis.compile(exfx.Config(rule="threshold", threshold=0.0))
    >>> exfx.count_flops(gm, torch.randn(8, 784)).reduction

``exfx.compile(model, inputs, config)`` and ``exfx.explain(model, inputs)`` do both
steps in one call. Static (SNP) pruning is not implemented yet.

The stages, one folder each: ``capture/`` -> ``passes/`` (canonicalize, fold
BatchNorm, exchangeability analysis, ENP rewrite) over ``analysis/`` (axis graph,
sites) -> ``ops/`` (the ``exfx::`` operators) priced by ``cost/``; ``tune/``
calibrates plans and ``ci/`` checks graphs.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from exfx import ops  # noqa: F401  (registers the exfx:: operators)
from exfx.api import Analysis, analyse, compile, explain
from exfx.config import Config, Plan, SiteParams
from exfx.cost.flops import FlopReport, SiteFlops, count_flops
from exfx.dynamo_backend import backend
from exfx.errors import (
    CaptureError,
    ExfxError,
    PlanError,
    PlanMismatchError,
    TrainingModeError,
    UnsupportedModelError,
)
from exfx.meta import SiteMatch
from exfx.report import Report, SiteInfo
from exfx.tune.calibration import calibrate, calibrate_budgets
from exfx.tune.evaluation import Evaluation, evaluate, oracle
from exfx.tune.search import random_search

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CaptureError",
    "Config",
    "Evaluation",
    "ExfxError",
    "FlopReport",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "Report",
    "SiteFlops",
    "SiteInfo",
    "SiteMatch",
    "SiteParams",
    "TrainingModeError",
    "UnsupportedModelError",
    "analyse",
    "backend",
    "calibrate",
    "calibrate_budgets",
    "compile",
    "count_flops",
    "evaluate",
    "explain",
    "oracle",
    "random_search",
]

#: Modules of exfx 0.1 that moved when the stages got their own folders: ``exfx.<old>`` still resolves to the
#: new module, with a DeprecationWarning naming it. (``exfx.calibrate`` and ``exfx.backend`` were always
#: the functions, which shadowed their modules; those modules are now exfx.tune.calibration and
#: exfx.dynamo_backend.)
_MOVED_MODULES = {
    "flops": "exfx.cost.flops",
    "graphdiff": "exfx.ci.graphdiff",
    "spec": "exfx.ci.spec",
    "pareto": "exfx.tune.pareto",
    "dynamo_capture": "exfx.capture.dynamo",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED_MODULES:
        warnings.warn(f"exfx.{name} moved to {_MOVED_MODULES[name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED_MODULES[name])
    raise AttributeError(f"module 'exfx' has no attribute {name!r}")
