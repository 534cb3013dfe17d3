"""exfx: a torch.fx compiler for dynamic pruning of ReLU networks: ExPrune's early negative prediction.

Analyse a model once, then compile it with as many plans as you like::

    >>> import exfx, torch
    >>> analysis = exfx.analyse(model.eval(), (torch.randn(8, 784),))
    >>> print(analysis.report)                                    # every ReLU: site or not, and why
    >>> gm = analysis.compile(exfx.Config(rule="threshold", threshold=0.0))
    >>> exfx.count_flops(gm, torch.randn(8, 784)).reduction

``exfx.compile(model, inputs, config)`` and ``exfx.explain(model, inputs)`` do both
steps in one call. ``exfx.prune(model, inputs, data, ratio=0.5)`` removes redundant
hidden units for good (SNP) and returns a smaller GraphModule and a PruneReport.

The stages, one folder each: ``capture/`` -> ``passes/`` (canonicalize, fold
BatchNorm, exchangeability analysis, ENP rewrite) over ``analysis/`` (axis graph,
sites) -> ``ops/`` (the ``exfx::`` operators) priced by ``cost/``; ``tune/``
calibrates plans and ``ci/`` checks graphs.
"""

from __future__ import annotations

from exfx import ops  # noqa: F401  (registers the exfx:: operators)
from exfx.api import Analysis, analyse, compile, explain
from exfx.capture import CaptureOptions
from exfx.config import Config, DominanceParams, Plan, SiteParams
from exfx.cost.flops import FlopReport, SiteFlops, count_flops
from exfx.dynamo_backend import backend
from exfx.errors import (
    CaptureError,
    DistributedError,
    ExfxError,
    ExfxWarning,
    PlanError,
    PlanMismatchError,
    TrainingModeError,
    UnsupportedModelError,
)
from exfx.meta import SiteMatch
from exfx.pruning import prune
from exfx.report import Report, SiteInfo
from exfx.snp import PruneError, PruneReport, PruneWarning
from exfx.snp.finetune import finetune
from exfx.snp.magnitude import magnitude_prune
from exfx.tune.calibration import calibrate, calibrate_budgets
from exfx.tune.distributed import shard_batches
from exfx.tune.options import CalibrationOptions
from exfx.tune.evaluation import Evaluation, evaluate, oracle
from exfx.tune.search import random_search

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CalibrationOptions",
    "CaptureError",
    "CaptureOptions",
    "Config",
    "DistributedError",
    "DominanceParams",
    "Evaluation",
    "ExfxError",
    "ExfxWarning",
    "FlopReport",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "PruneError",
    "PruneReport",
    "PruneWarning",
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
    "finetune",
    "magnitude_prune",
    "oracle",
    "prune",
    "random_search",
    "shard_batches",
]
