"""Pareto curves: a metric against executed FLOPs, for each early-exit rule, and their plot.

:func:`sweep` applies each rule uniformly to every site over a ladder of
parameters and measures each setting with :func:`exfx.tune.evaluation.evaluate`;
:func:`plot` draws the curves with marked points (dense model, calibrated plans,
oracle bound) to a PNG. ``exfx demo`` and ``benchmarks/exprune_pareto.py`` use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from exfx.api import Analysis
from exfx.capture import CaptureOptions
from exfx.tune.evaluation import Evaluation, analysis_of, evaluate
from exfx.config import Config

logger = logging.getLogger(__name__)

__all__ = ["sweep", "plot", "THRESHOLDS", "ALPHAS"]

THRESHOLDS = (-0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01)
ALPHAS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.35, 0.5)

Curve = list[tuple[float, float]]


def sweep(model: torch.nn.Module | Analysis, example_inputs: tuple[Any, ...] | None, data: Iterable[Any],
          metric: Callable[[Any, Any], float], *, thresholds: Sequence[float] = THRESHOLDS,
          alphas: Sequence[float] = ALPHAS, samples: int = 32,
          capture_options: CaptureOptions | Mapping[str, Any] | None = None) -> dict[str, Curve]:
    """``{"threshold": [...], "ztest": [...]}`` of (executed FLOPs per example, score), one point per setting.

    Every setting is compiled from one analysis (``model`` itself, when it is an :class:`exfx.Analysis`);
    ``capture_options`` as for :func:`exfx.calibrate`."""
    data = list(data)
    analysis = analysis_of(model, example_inputs, capture_options)
    examples = sum(len(target) for _, target in data)
    settings = [("threshold", Config(threshold=t, samples=samples)) for t in thresholds]
    settings += [("ztest", Config(rule="ztest", alpha=a, samples=samples)) for a in alphas]
    curves: dict[str, Curve] = {"threshold": [], "ztest": []}
    for rule, config in settings:
        result = evaluate(analysis.compile(config, lowering="reference"), data, metric, progress=False)
        curves[rule].append((result.executed / examples, result.score))
    return curves


def plot(path: str | Path, title: str, curves: Mapping[str, Curve], points: Mapping[str, Evaluation],
         examples: int, metric_label: str) -> None:
    """Write the curves and the marked points (label -> evaluation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"dense": "k^", "oracle bound": "gD"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, marker in (("threshold", "o-"), ("ztest", "s-")):
        ordered = sorted(curves.get(rule, []))
        ax.plot([p[0] / 1e6 for p in ordered], [100 * p[1] for p in ordered], marker, label=f"{rule} (uniform)",
                ms=4)
    highlights = iter(("r*", "m*", "c*", "y*"))
    for label, result in points.items():
        style = styles.get(label) or next(highlights, "r*")
        ax.plot(result.executed / examples / 1e6, 100 * result.score, style, ms=8 if label in styles else 14,
                label=label)
    ax.set_xlabel("executed MFLOPs per example (2 per multiply-add, test overhead included)")
    ax.set_ylabel(f"{metric_label} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
