"""count_flops: executed versus dense FLOPs, per-site figures that follow the masks, thread isolation."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

import exfx
from exfx.cost.flops import FLOP_CONVENTION
from exfx.cost.model import MOMENT_FLOPS_PER_TERM, THRESHOLD_TEST_FLOPS, ZTEST_TEST_FLOPS
from models import GCN, MLP, OPTBlockLM, ResNetish, VGGish

OPS = torch.ops.exfx


def _gcn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    adj = (torch.rand(12, 12) < 0.3).float() + torch.eye(12)
    return torch.randn(12, 8), adj / adj.sum(1, keepdim=True)


MODELS = {
    "MLP": (MLP, lambda: (torch.randn(16, 20),)),
    "VGGish": (VGGish, lambda: (torch.randn(2, 3, 16, 16),)),
    "ResNetish": (ResNetish, lambda: (torch.randn(2, 3, 8, 8),)),
    "GCN": (GCN, _gcn_inputs),
    "OPTBlockLM": (OPTBlockLM, lambda: (torch.randint(0, 50, (2, 7)),)),
}


class MaskRecorder(fx.Interpreter):
    """Records, per site, the geometry of every exfx op and the masks going into it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.steps: dict[str, list[tuple]] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "exfx":
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.steps.setdefault(args[-1], []).append((n.target, args, result))
        return result


def expected_site_flops(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict[str, tuple[int, int, int, int]]:
    """(executed, dense, neurons, pruned) per site, counted by hand from the recorded masks."""
    recorder = MaskRecorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    out: dict[str, tuple[int, int, int, int]] = {}
    for site, steps in recorder.steps.items():
        executed = 0
        complete_args = next(args for target, args, _ in steps if target is OPS.complete.default)
        x, weight = complete_args[0], complete_args[1]
        fan_in = weight.shape[1] if weight.dim() > 2 else complete_args[7]
        per_unit = 2 * (weight.shape[1] // fan_in if weight.dim() == 2 else weight[0, 0].numel())
        for target, args, result in steps:
            if target is OPS.partial_sum.default:
                active, start, stop, moments = args[3], args[4], args[5], args[11]
                neurons = result[0].numel() if active is None else int(active.sum())
                executed += per_unit * (stop - start) * neurons
                executed += MOMENT_FLOPS_PER_TERM * (stop - start) * neurons if moments else 0
            elif target is OPS.early_exit.default:
                active, rule = args[4], args[7]
                tested = args[0][0].numel() if active is None else int(active.sum())
                executed += (ZTEST_TEST_FLOPS if rule == "ztest" else THRESHOLD_TEST_FLOPS) * tested
            else:
                active, start = args[5], args[6]
                neurons, kept = result.numel(), int(active.sum())
                executed += per_unit * (fan_in - start) * kept
                out[site] = (executed, per_unit * fan_in * neurons, neurons, neurons - kept)
    return out


def overhead_bound(report: exfx.FlopReport, gm: fx.GraphModule) -> int:
    """The stated price of the tests when nothing is pruned: per neuron and checkpoint, plus moments."""
    total = 0
    for site in gm.meta["exfx_report"].eligible:
        neurons = report.sites[site.name].neurons
        per_test = ZTEST_TEST_FLOPS if site.params.rule == "ztest" else THRESHOLD_TEST_FLOPS
        total += per_test * neurons * len(site.samples)
        if site.params.rule == "ztest":
            total += MOMENT_FLOPS_PER_TERM * site.samples[-1] * neurons
    return total


def test_plain_model_executed_equals_dense() -> None:
    model = MLP().eval()
    x = torch.randn(16, 20)
    report = exfx.count_flops(model, x)
    sizes = (20, 64, 64, 48, 40, 10)
    assert report.dense == report.executed == sum(2 * 16 * a * b for a, b in zip(sizes, sizes[1:]))
    assert report.sites == {} and report.reduction == 0.0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_never_prune_costs_exactly_the_test_overhead(name: str) -> None:
    make, inputs = MODELS[name]
    model = make().eval()
    x = inputs()
    plain = exfx.count_flops(model, *x)
    for config in (exfx.Config(threshold=float("-inf"), samples=8),
                   exfx.Config(rule="ztest", alpha=0.0, samples=(4, 8))):
        gm = exfx.compile(model, x, config)
        report = exfx.count_flops(gm, *x)
        assert report.dense == plain.dense  # the dense figure is the original model's
        assert report.executed - report.dense == overhead_bound(report, gm)
        assert all(s.pruned == 0 for s in report.sites.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_threshold_zero_executes_less_than_dense(name: str) -> None:
    make, inputs = MODELS[name]
    model = make().eval()
    x = inputs()
    gm = exfx.compile(model, x, exfx.Config(threshold=0.0, samples=8))
    report = exfx.count_flops(gm, *x)
    assert report.dense == exfx.count_flops(model, *x).dense
    assert report.executed < report.dense
    assert 0.0 < report.reduction < 1.0
    assert report.executed <= report.dense + overhead_bound(report, gm)
    eligible = [s.name for s in gm.meta["exfx_report"].eligible]
    assert list(report.sites) == eligible
    assert any(s.pruned > 0 for s in report.sites.values())
    for site in report.sites.values():
        assert site.neurons > 0 and site.dense > 0 and 0.0 <= site.pruned_fraction <= 1.0


@pytest.mark.parametrize("config", [exfx.Config(threshold=0.0, samples=8),
                                    exfx.Config(threshold=-0.05, samples=(4, 8, 16)),
                                    exfx.Config(rule="ztest", alpha=0.3, samples=(4, 16))],
                         ids=["threshold", "schedule", "ztest"])
@pytest.mark.parametrize("name", ["MLP", "VGGish", "GCN"])
def test_per_site_figures_follow_the_masks(name: str, config: exfx.Config) -> None:
    make, inputs = MODELS[name]
    model = make().eval()
    x = inputs()
    gm = exfx.compile(model, x, config)
    report = exfx.count_flops(gm, *x)
    expected = expected_site_flops(gm, *x)
    assert set(report.sites) == set(expected) and expected
    for name_, (executed, dense, neurons, pruned) in expected.items():
        site = report.sites[name_]
        assert (site.executed, site.dense, site.neurons, site.pruned) == (executed, dense, neurons, pruned)
    assert report.dense - report.executed == sum(s.dense - s.executed for s in report.sites.values())


def test_flop_counter_mode_sees_the_same_total() -> None:
    model = VGGish().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gm(x)
    assert counter.get_total_flops() == exfx.count_flops(gm, x).executed


def test_convention_and_report_format() -> None:
    model = MLP().eval()
    x = torch.randn(8, 20)
    report = exfx.count_flops(exfx.compile(model, (x,), exfx.Config(samples=8)), x)
    assert report.convention == FLOP_CONVENTION
    assert "2 FLOPs per multiply-add" in report.convention
    data = report.to_dict()
    assert data["dense"] == report.dense and data["executed"] == report.executed
    assert data["reduction"] == pytest.approx(1 - report.executed / report.dense)
    assert set(data["sites"]) == {"net.1", "net.2", "net.3"}
    text = str(report)
    assert "2 FLOPs per multiply-add" in text and "net.2" in text


def test_counting_in_threads_is_isolated() -> None:
    """Eight threads count different models at once; each gets exactly its single-threaded figures."""
    model = MLP().eval()
    jobs = []
    for i in range(8):
        x = torch.randn(4 + 3 * i, 20)
        gm = exfx.compile(model, (x,), exfx.Config(threshold=-0.1 * (i % 3), samples=8 + 4 * (i % 4)))
        jobs.append((gm, x))
    expected = [exfx.count_flops(gm, x).to_dict() for gm, x in jobs]
    barrier = threading.Barrier(len(jobs))

    def count(job: int) -> list[dict]:
        gm, x = jobs[job]
        barrier.wait()
        return [exfx.count_flops(gm, x).to_dict() for _ in range(5)]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(count, range(len(jobs))))
    for job, runs in enumerate(results):
        for run in runs:
            assert run == expected[job]
    assert len({e["executed"] for e in expected}) == len(expected)  # the jobs really differ
