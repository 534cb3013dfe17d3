"""Coverage of real architectures: what exfx finds in each, random-initialised from small configs, no download.

Run:  python -m benchmarks.third_party        (needs `pip install ".[thirdparty]"`)

Prints a Markdown table and writes it to ``benchmarks/results/coverage.md`` (and the
rows to ``coverage.json``): for each architecture, how it was captured, its
ReLU-family activations (ReLU, ReLU6, clamp at 0), the ENP sites among them (eligible
for some schedule; a site whose fan-in is below the default 32 samples is left dense by
the default config), the never-prune equivalence error, and the FLOPs saved under the
default config (threshold 0 at 32 samples; random weights, so the figure shows the
mechanism works end to end, not what a trained model saves). The architectures are
the third-party ``transformers`` and PyTorch Geometric models, and the DenseNet-,
MobileNet-V2- and ``nn.TransformerEncoder``-style models: ``ARCHITECTURES`` in
``tests/models.py``, which tests/test_third_party.py checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import exfx
from exfx.meta import INPUT_SIZES_KEY
from tests.models import ARCHITECTURES, build

__all__ = ["CoverageRow", "coverage", "main"]

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class CoverageRow:
    """What exfx finds in one architecture (``status`` holds the error or skip reason, if any)."""

    name: str
    captured_by: str = "-"
    activations: int = 0
    sites: int = 0
    never_prune_error: float = math.nan
    flops_saved: float = math.nan
    status: str = ""

    def markdown(self) -> str:
        if self.captured_by == "-":
            return f"| {self.name} | - | - | - | - | - | {self.status} |"
        return (f"| {self.name} | {self.captured_by} | {self.activations} | {self.sites} | "
                f"{self.never_prune_error:.1e} | {self.flops_saved:.1%} | {self.status} |")


HEADER = ("| architecture | captured by | ReLU-family activations | ENP sites | "
          "never-prune max error | FLOPs saved (default config) | notes |\n|---|---|---|---|---|---|---|")


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def coverage(name: str) -> CoverageRow:
    """Capture, analyse, compile (never-prune and default config) and count one architecture."""
    try:
        model, inputs = build(name)
    except ImportError as err:
        return CoverageRow(name, status=f"skipped: {err.name} not installed")
    analysis = exfx.analyse(model, inputs)
    captured = "Dynamo (fallback)" if INPUT_SIZES_KEY in analysis.graph_module.meta else "torch.fx"
    try:
        never = analysis.compile(exfx.Config(threshold=-math.inf))
        default = analysis.compile(exfx.Config())
    except exfx.ExfxError as err:
        return CoverageRow(name, captured, status=f"failed: {type(err).__name__}: {err}")
    with torch.no_grad():
        error = (_first(never(*inputs)) - model(*inputs)).abs().max().item()
    flops = exfx.count_flops(default, *inputs)
    dense = exfx.count_flops(model, *inputs).dense
    family = [s for s in analysis.sites if s.relu_family]
    eligible = [s for s in family if s.eligible]
    if eligible:
        kinds = sorted({".".join(s.name.split(".")[-2:]) for s in eligible})
        status = f"sites in {', '.join(kinds)}"
    else:
        status = f"no site: {family[0].reason}" if family else "no ReLU-family activation"
    saved = 1 - flops.executed / dense if dense else math.nan
    return CoverageRow(name, captured, len(family), len(eligible), error, saved, status)


def main() -> None:
    rows = [coverage(name) for name in ARCHITECTURES]
    table = "\n".join([HEADER, *(row.markdown() for row in rows)])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coverage.md").write_text(table + "\n")
    (RESULTS / "coverage.json").write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
