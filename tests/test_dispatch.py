"""Per-call dispatch of the native forms: each lowered site runs native up to its measured crossover (in rows)
and dense past it, exactly, and a dense call is counted as dense."""

from __future__ import annotations

import re
from dataclasses import replace
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import exfx
from exfx.cost.model import FORCE_LOWERING_ENV, Choice, LatencyModel
from exfx.meta import lowering
from exfx.ops import native
from exfx.passes.annotate_pass import LOWERING_ENV
from exfx.passes.pipeline import compile_passes

OPS = torch.ops.exfx
CALL_BATCHES = (1, 2, 7, 64, 256)


class FFN(nn.Module):
    """Two ReLU FFN blocks: sites with a plain and a sparse-input consumer."""

    def __init__(self, d: int = 48, hidden: int = 192) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(d, hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, d), nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


class Crossover(LatencyModel):
    """A timing model whose native forms win up to ``rows`` rows and lose above: no test depends on timings."""

    def __init__(self, rows: int) -> None:
        super().__init__(cache=False)
        self.rows = rows
        self.force = None

    def choose(self, key: str, candidates: Mapping[str, Callable[[], object]], baseline: str = "dense") -> Choice:
        rows = int(re.search(r"rows=(\d+)", key).group(1))
        other = next(form for form in candidates if form != baseline)
        return Choice(other if rows <= self.rows else baseline, ((other, 1.0), (baseline, 2.0)))

    def time(self, candidates: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        return {form: 1.0 for form in candidates}  # the whole model: a tie, which keeps the lowering


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(FORCE_LOWERING_ENV, raising=False)
    monkeypatch.delenv(LOWERING_ENV, raising=False)  # the default lowering, as users get it


def _setup() -> tuple[nn.Module, exfx.Analysis, exfx.Config]:
    torch.manual_seed(0)
    model = FFN().eval()
    return model, exfx.analyse(model, (torch.randn(4, 48),)), exfx.Config(samples=16, threshold=0.0)


def _lowered(analysis: exfx.Analysis, config: exfx.Config, example: torch.Tensor, rows: int) -> fx.GraphModule:
    """The native compile, with the timing model replaced by :class:`Crossover`."""
    gm = fx.GraphModule(analysis.graph_module, analysis.graph_module.graph.__deepcopy__({}))
    for graph_pass in compile_passes(analysis.decide(None, config, "native"), None, "native", (example,)):
        if type(graph_pass).__name__ == "LowerPass":
            graph_pass.latency = Crossover(rows)
        graph_pass(gm)
    return gm


@pytest.mark.parametrize("compiled_at", [1, 64])
def test_dispatch_equals_the_reference_up_to_the_crossover_and_dense_past_it(built: bool, compiled_at: int) -> None:
    model, analysis, config = _setup()
    gm = _lowered(analysis, config, torch.randn(compiled_at, 48), rows=8)
    ops = [n for n in gm.graph.nodes if n.target is OPS.enp_linear.default]
    assert ops and all(op.args[-1] == 8 for op in ops)
    assert all(lowering(op).max_rows == 8 for op in ops)
    reference = analysis.compile(config, lowering="reference")
    for batch in CALL_BATCHES:
        x = torch.randn(batch, 48)
        with torch.no_grad():
            expected = reference(x) if batch <= 8 else model(x)
            torch.testing.assert_close(gm(x), expected, rtol=1e-4, atol=1e-5)


def test_a_dense_call_is_counted_as_dense(built: bool) -> None:
    _, analysis, config = _setup()
    gm = _lowered(analysis, config, torch.randn(4, 48), rows=8)
    small, large = exfx.count_flops(gm, torch.randn(8, 48)), exfx.count_flops(gm, torch.randn(9, 48))
    assert small.executed < small.dense and any(site.pruned for site in small.sites.values())
    assert all(site.pruned == 0 and site.executed == site.dense for site in large.sites.values())
    assert large.consumers and all(c.executed == c.dense for c in large.consumers.values())


def test_a_site_that_never_wins_is_dense_with_its_reason(built: bool) -> None:
    _, analysis, config = _setup()
    gm = _lowered(analysis, config, torch.randn(4, 48), rows=0)
    assert not any(n.target is OPS.enp_linear.default for n in gm.graph.nodes)
    records = [lowering(n) for n in gm.graph.nodes if lowering(n) is not None]
    assert records and all(r.form == "dense" and r.reason.startswith("native measured slower") for r in records)


@pytest.mark.parametrize("compiled_at", [1, 64])
def test_default_compile_equals_the_reference_where_native_and_dense_elsewhere(built: bool, compiled_at: int) -> None:
    """The default (native) lowering with real timings: whatever it picked, each call prunes exactly the sites
    that run native at that many rows, and computes the others densely."""
    model, analysis, config = _setup()
    compiled = exfx.compile(model, (torch.randn(compiled_at, 48),), config)
    assert all(s.lowering in ("native", "dense") for s in compiled.meta["exfx_report"].eligible)
    records = {r.site: r for n in compiled.graph.nodes if (r := lowering(n)) is not None and not r.input_site}
    for batch in CALL_BATCHES:
        native_here = {name for name, r in records.items()
                       if r.form == "native" and (r.max_rows < 0 or batch <= r.max_rows)}
        plan = exfx.Plan.from_report(analysis.explain(config, lowering="reference"), config)
        plan = exfx.Plan(sites={name: p if name in native_here else replace(p, enabled=False)
                                for name, p in plan.sites.items()}, signatures=plan.signatures)
        expected = analysis.compile(plan, lowering="reference")
        x = torch.randn(batch, 48)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), expected(x), rtol=1e-4, atol=1e-5)


def test_fallback_kernels_dispatch_the_same_way() -> None:
    """The pure-torch kernels (no compiler) follow max_rows too."""
    torch.manual_seed(0)
    x, w, b = torch.randn(9, 32), torch.randn(24, 32), torch.randn(24)
    relaid = native.relayout(w, 8)
    out, keep = native._enp_linear_torch(x, relaid.head, relaid.tail, b, None, 8, 32, "threshold", 0.0, True, w, 8)
    torch.testing.assert_close(out, torch.relu(x @ w.T + b))
    assert bool(keep.all())
    out, _ = native._enp_linear_torch(x[:8], relaid.head, relaid.tail, b, None, 8, 32, "threshold", 0.0, True, w, 8)
    expected, _ = native.enp_linear_reference(x[:8], relaid, b, rule="threshold", param=0.0, relu=True)
    torch.testing.assert_close(out, expected)
    w_t = native.transpose_for_sparse_input(w)
    torch.testing.assert_close(native._sparse_input_linear_torch(torch.relu(x), w_t, b, 4),
                               torch.relu(x) @ w.T + b, rtol=1e-5, atol=1e-5)


def test_the_default_lowering_is_native_and_the_environment_may_change_it(built: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, analysis, config = _setup()
    x = torch.randn(4, 48)
    forms = {s.lowering for s in analysis.compile(config).meta["exfx_report"].eligible}
    assert forms and forms <= {"native", "dense"}
    assert {s.lowering for s in analysis.explain(config).eligible} == {"native"}
    monkeypatch.setenv(LOWERING_ENV, "reference")
    assert all(s.lowering == "" for s in analysis.compile(config).meta["exfx_report"].eligible)
    monkeypatch.setenv(LOWERING_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$EXFX_LOWERING must be one of"):
        exfx.compile(model, (x,), config)
