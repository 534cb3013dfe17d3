"""Third-party architectures (transformers, PyTorch Geometric), random-initialised, no download.

Skipped when the packages are missing; install them with `pip install ".[thirdparty]"`.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import exfx

from helpers import assert_enp_invariant
from models import ARCHITECTURES, build

#: name -> the module-name fragments ENP sites sit in (every site in one of them), or the reason no ReLU is a site
EXPECTED_SITES: dict[str, tuple[str, ...] | str] = {
    "OPT (transformers)": (".fc1",),
    "BERT, hidden_act=relu (transformers)": (".intermediate.dense",),
    "T5, ReLU feed-forward (transformers)": (".DenseReluDense.wi",),
    "GCN (PyTorch Geometric)": (".lin",),
    "GIN (PyTorch Geometric)": (".nn.lins.",),
    "GraphSAGE (PyTorch Geometric)": (".lin_l",),
    "DenseNet-style (concat blocks)": (".conv1",),
    "MobileNet-V2-style (ReLU6, Hardsigmoid SE)": (".expand.0", "head.0", ".se.1"),
    "nn.TransformerEncoder with an embedding": (".linear1",),
    "nn.TransformerEncoder on raw features": "contraction axis is a model input",
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(ARCHITECTURES[name][0]) is not None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


#: The third-party models are captured by Dynamo (3-6 s each); the local ones stay in the default run.
CASES = [name if package == "torch" else pytest.param(name, marks=pytest.mark.slow)
         for name, (package, _) in ARCHITECTURES.items()]


@pytest.mark.parametrize("name", CASES)
def test_architecture(name):
    if not _available(name):
        pytest.skip(f"{ARCHITECTURES[name][0]} is not installed")
    model, inputs = build(name)
    never = exfx.compile(model, inputs, exfx.Config(threshold=-math.inf, samples=16))
    with torch.no_grad():
        torch.testing.assert_close(_first(never(*inputs)), model(*inputs), rtol=1e-4, atol=1e-5)
    report = never.meta["exfx_report"]
    expected = EXPECTED_SITES[name]
    sites = [s for s in report.sites if s.eligible]
    if isinstance(expected, str):
        assert not sites
        family = [s for s in report.sites if s.relu_family]
        assert family and all(expected in s.reason for s in family), [s.reason for s in family]
        return
    assert sites and all(any(f in s.name for f in expected) for s in sites), [s.name for s in report.sites]
    pruning = exfx.compile(model, inputs, exfx.Config(threshold=0.0, samples=4))
    records = assert_enp_invariant(pruning, *inputs, rtol=1e-4, atol=1e-5)
    assert sum(r.pruned for r in records.values()) > 0
    flops = exfx.count_flops(pruning, *inputs)
    assert flops.executed < flops.dense
