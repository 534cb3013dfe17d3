"""Third-party architectures (transformers, PyTorch Geometric), random-initialised, no download.

Skipped when the packages are missing; install them with `pip install ".[thirdparty]"`.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import exfx
from benchmarks.third_party import ARCHITECTURES, build

from helpers import assert_enp_invariant

#: name -> the module-name fragment every ENP site must sit in (None: no site expected, with the reason)
EXPECTED_SITES = {
    "OPT (transformers)": ".fc1",
    "BERT, hidden_act=relu (transformers)": ".intermediate.dense",
    "T5, ReLU feed-forward (transformers)": ".DenseReluDense.wi",
    "GCN (PyTorch Geometric)": None,
    "GIN (PyTorch Geometric)": ".nn.lins.",
    "GraphSAGE (PyTorch Geometric)": ".lin_l",
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(ARCHITECTURES[name][0]) is not None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture(name):
    if not _available(name):
        pytest.skip(f"{ARCHITECTURES[name][0]} is not installed")
    model, inputs = build(name)
    never = exfx.compile(model, inputs, exfx.Config(threshold=-math.inf, samples=16))
    with torch.no_grad():
        torch.testing.assert_close(_first(never(*inputs)), model(*inputs), rtol=1e-4, atol=1e-5)
    report = never.meta["exfx_report"]
    fragment = EXPECTED_SITES[name]
    sites = [s for s in report.sites if s.eligible]
    if fragment is None:
        assert not sites
        assert all("exfx does not carry partial sums through" in s.reason for s in report.sites)
        return
    assert sites and all(fragment in s.name for s in sites), [s.name for s in report.sites]
    pruning = exfx.compile(model, inputs, exfx.Config(threshold=0.0, samples=16))
    records = assert_enp_invariant(pruning, *inputs, rtol=1e-4, atol=1e-5)
    assert sum(r.pruned for r in records.values()) > 0
    flops = exfx.count_flops(pruning, *inputs)
    assert flops.executed < flops.dense
