"""``exfx demo``: calibrate, compile and measure a trained CNN on real Fashion-MNIST images.

Everything it needs ships inside the package: the small CNN of
:class:`exfx.examples.SmallCNN`, trained by ``python -m benchmarks.train_cv --model
small_cnn``, and the first 1,000 Fashion-MNIST test images (MIT licence, see
``exfx/data/FASHION_MNIST_LICENSE``). No network and no Debian package are needed.

Calibration uses images 0-499 and every reported figure uses images 500-999, so
no reported number comes from the data the plan was chosen on. The output folder
also times the dense model against the compiled one (the default, native lowering) at
batch 1 and 100. The output folder
gets ``pareto.png`` (accuracy against executed FLOPs for both rules, the
calibrated plan, the oracle bound and the dense model), ``plan.json``,
``graph_diff.txt`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exfx.ci import graphdiff
from exfx.tune import pareto
from exfx.api import analyse
from exfx.tune.calibration import DEFAULT_SCHEDULES, calibrate
from exfx.tune.evaluation import drop_interval, evaluate, oracle
from exfx.capture import capture
from exfx.examples import SmallCNN
from exfx.cost.model import time_interleaved
from exfx.meta import REPORT_KEY
from exfx.report import lowering_summary

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "load_demo_model", "load_demo_images"]

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics, as in benchmarks/data.py
#: 500 calibration images are few: a plan must fit the budget at this bootstrap confidence, not just on average.
CONFIDENCE = 0.99
#: The held-out drop is reported with its central interval at this confidence.
HELD_OUT_CONFIDENCE = 0.95
#: The oracle stops negative neurons at the smallest checkpoint calibration may use.
ORACLE_SAMPLES = min(schedule[0] for schedule in DEFAULT_SCHEDULES)


def _data_file(name: str) -> Any:
    return resources.files("exfx") / "data" / name


def load_demo_model() -> torch.nn.Module:
    """The bundled trained SmallCNN, in eval mode."""
    with _data_file("small_cnn.pt").open("rb") as handle:
        checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    model = SmallCNN()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()})
    return model.eval()


def load_demo_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled 1,000 test images, normalised, (1000, 1, 28, 28), and their labels."""
    with _data_file("fashion_mnist_test_1000.npz").open("rb") as handle:
        arrays = np.load(handle)
        images, labels = arrays["images"], arrays["labels"]
    x = (torch.from_numpy(images).float().div(255.0).unsqueeze(1) - MEAN) / STD
    return x, torch.from_numpy(labels).long()


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(-1) == targets).float().mean().item()


#: The batch sizes the demo times dense against the compiled model at, and the timed calls per model.
LATENCY_BATCHES = (1, 100)
LATENCY_REPEATS = 30


def _latency(dense: torch.nn.Module, compiled: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Median milliseconds per call of the dense model and the compiled one on ``x``, interleaved."""
    timings = time_interleaved({"dense": lambda: dense(x), "exfx": lambda: compiled(x)}, LATENCY_REPEATS)
    return timings["dense"], timings["exfx"]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 100) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def run_demo(out: str | Path = "exfx-demo", budget: float = 0.01) -> tuple[dict[str, Any], str]:
    """Run the demo and write the output folder; returns the summary and the report text."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_demo_model()
    x, y = load_demo_images()
    example = (x[:8],)
    calibration, held_out = _batches(x[:500], y[:500]), _batches(x[500:], y[500:])
    images = len(y) - 500

    analysis = analyse(model, example)  # once: the report, calibration, the plan, the oracle and the sweep
    lines = [str(analysis.report)]
    plan = calibrate(analysis, example, calibration, _accuracy, budget, confidence=CONFIDENCE, progress=False)
    compiled = analysis.compile(plan, lowering="reference")  # the reference ops: the FLOPs the masks save
    fast = analysis.compile(plan)  # the default lowering: what runs fastest here, for the latency
    dense = evaluate(model, held_out, _accuracy, progress=False)
    calibrated = evaluate(compiled, held_out, _accuracy, progress=False)
    bound = oracle(analysis, example, held_out, _accuracy, samples=ORACLE_SAMPLES, progress=False)
    lines.append(f"\ncalibrated on images 0-499 for at most {100 * budget:g} point(s) of accuracy "
                 f"(at {100 * CONFIDENCE:g}% bootstrap confidence): "
          f"{plan.meta['calibration']['evals']} evaluations, {plan.meta['calibration']['seconds']:.1f} s")
    for site, params in plan.sites.items():
        value = f"T={params.threshold:.4g}" if params.rule == "threshold" else f"alpha={params.alpha:g}"
        samples = ",".join(map(str, params.samples))
        setting = f"{params.rule} {value}, samples {samples}" if params.enabled else "disabled"
        lines.append(f"  {site:<14} {setting}")
    lines.append("\nreported on images 500-999:")
    low, high = drop_interval(_accuracy, dense, calibrated, HELD_OUT_CONFIDENCE)
    lines.append(f"  accuracy  dense {100 * dense.score:.2f}%  ->  exfx {100 * calibrated.score:.2f}%  (drop "
                 f"{100 * (dense.score - calibrated.score):.2f} points; {100 * HELD_OUT_CONFIDENCE:g}% interval "
                 f"{100 * low:.2f} to {100 * high:.2f} by a paired bootstrap of these {images} images)")
    lines.append(f"  the budget bounds the drop on the calibration images 0-499 at {100 * CONFIDENCE:g}% bootstrap "
                 f"confidence; on images it never saw, the drop varies as the interval shows")
    lines.append(f"  FLOPs     dense {dense.executed / images / 1e6:.2f} M per image  ->  exfx "
          f"{calibrated.executed / images / 1e6:.2f} M per image ({100 * calibrated.reduction:.1f}% saved; "
          f"oracle bound {100 * bound.reduction:.1f}%: every non-positive neuron stops after {ORACLE_SAMPLES} units)")
    latency = {rows: _latency(model, fast, x[500:500 + rows]) for rows in LATENCY_BATCHES}
    for rows, (dense_ms, exfx_ms) in latency.items():
        lines.append(f"  latency   dense {dense_ms:.3g} ms  ->  exfx {exfx_ms:.3g} ms per batch of {rows} "
                     f"({dense_ms / exfx_ms:.2f}x; median of {LATENCY_REPEATS}, interleaved, "
                     f"{torch.get_num_threads()} threads)")
    lines.append("  " + lowering_summary(fast.meta[REPORT_KEY]))

    curves = pareto.sweep(analysis, example, held_out, _accuracy)
    pareto.plot(out / "pareto.png", "exfx demo: SmallCNN on Fashion-MNIST", curves,
                {"dense": dense, "calibrated plan": calibrated, "oracle bound": bound}, images,
                "accuracy on images 500-999")
    plan.save(out / "plan.json")
    diff = graphdiff.unified_diff(graphdiff.graph_text(capture(model, example)), graphdiff.graph_text(compiled))
    (out / "graph_diff.txt").write_text("\n".join(graphdiff.site_summary(compiled.meta[REPORT_KEY])) + "\n" + diff)
    summary = {"budget": budget, "dense_accuracy": dense.score, "exfx_accuracy": calibrated.score,
               "dense_flops_per_image": dense.executed / images, "exfx_flops_per_image": calibrated.executed / images,
               "reduction": calibrated.reduction, "oracle_reduction": bound.reduction,
               "held_out_drop_interval": [low, high], "held_out_confidence": HELD_OUT_CONFIDENCE,
               "calibration": plan.meta["calibration"], "seconds": time.perf_counter() - started,
               "latency_ms": {str(rows): {"dense": d, "exfx": e} for rows, (d, e) in latency.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines.append(f"\nwrote {out}/pareto.png, plan.json, graph_diff.txt and summary.json "
          f"({summary['seconds']:.0f} s in all)")
    return summary, "\n".join(lines)
