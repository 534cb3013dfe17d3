"""Inputs nobody planned for, at call time: each gives the original's behaviour or a clear exfx error."""

from __future__ import annotations

import math

import pytest
import torch

import exfx

from helpers import assert_enp_invariant
from models import MLP, ResNetish, VGGish


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    model = VGGish(width=16).eval()
    x = torch.randn(2, 3, 16, 16)
    return model, x, exfx.compile(model, (x,), exfx.Config(samples=16))


def test_inf_input_never_prunes_on_non_finite_statistics(vgg):
    model, x, gm = vgg
    x = x.clone()
    x[1, 0, 3, 3] = math.inf
    with torch.no_grad():
        expected, actual = model(x), gm(x)
    torch.testing.assert_close(torch.isnan(actual), torch.isnan(expected))
    torch.testing.assert_close(actual[0], exfx.compile(model, (x,), exfx.Config(samples=16))(x[:1])[0])


def test_empty_batch(vgg):
    _, x, gm = vgg
    empty = x[:0]
    assert gm(empty).shape == (0, 10)
    flops = exfx.count_flops(gm, empty)
    assert flops.executed == flops.dense == 0


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_other_float_dtypes(dtype, tol):
    torch.manual_seed(0)
    model = ResNetish(width=32).eval().to(dtype)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    never = exfx.compile(model, (x,), exfx.Config(threshold=-math.inf, samples=16))
    with torch.no_grad():
        torch.testing.assert_close(never(x).float(), model(x).float(), rtol=tol, atol=tol)
    pruning = exfx.compile(model, (x,), exfx.Config(rule="ztest", alpha=0.3, samples=16))
    assert pruning(x).dtype == dtype
    assert_enp_invariant(pruning, x, rtol=tol, atol=tol)


def test_non_contiguous_and_channels_last_inputs(vgg):
    _, x, gm = vgg
    reference = gm(x)
    # The same values; oneDNN may pick another conv algorithm for another memory format (a last-bit difference,
    # which a channels-last early-exit decision can then turn into a different mask only at a tie).
    torch.testing.assert_close(gm(x.to(memory_format=torch.channels_last)), reference, rtol=1e-5, atol=1e-6)
    wide = torch.zeros(2, 3, 16, 32)
    wide[..., ::2] = x
    torch.testing.assert_close(gm(wide[..., ::2]), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda x: x.to("meta"), "device meta"),
    (lambda x: x.double(), "dtype torch.float64"),
    (lambda x: x[0], "3 dims"),
    (lambda x: torch.randn(2, 3, 20, 20), "site 'classifier.1'.*expects 1024 features"),
    (lambda x: torch.randn(2, 4, 16, 16), "expected input.*to have 3 channels.*compiled for example inputs"),
])
def test_mismatched_inputs_raise_exfx_errors(vgg, make, message):
    _, x, gm = vgg
    with pytest.raises(exfx.UnsupportedModelError, match=message):
        gm(make(x))


def test_wrong_number_of_inputs(vgg):
    _, x, gm = vgg
    with pytest.raises(exfx.UnsupportedModelError, match="takes 1 positional inputs"):
        gm(x, x)


def test_sizes_the_model_allows_still_work():
    torch.manual_seed(0)
    model = ResNetish(width=32).eval()  # global average pooling: any spatial size
    gm = exfx.compile(model, (torch.randn(2, 3, 16, 16),), exfx.Config(threshold=-math.inf, samples=16))
    x = torch.randn(5, 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_samples_at_least_fan_in_is_not_a_site_and_says_why():
    model = MLP((20, 24, 10)).eval()
    report = exfx.explain(model, (torch.randn(2, 20),), exfx.Config(samples=32))
    assert [s.reason for s in report.sites] == ["contraction axis is a model input (`x`)"]
    deep = MLP((20, 24, 24, 10)).eval()
    report = exfx.explain(deep, (torch.randn(2, 20),), exfx.Config(samples=32))
    assert report.sites[1].reason == "fan-in 24 < samples 32"


class _TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 512)
        self.fc2 = torch.nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("capture", ["fx", "dynamo"])
def test_example_inputs_of_the_wrong_shape_fail_in_one_short_line(capture, capsys):
    with pytest.raises(exfx.UnsupportedModelError) as caught:
        exfx.compile(_TwoLayer().eval(), (torch.randn(8, 8),), capture=capture)
    first = str(caught.value).splitlines()[0]
    assert len(first) < 300, first
    assert "`fc1` (Linear)" in first and "8x8 and 64x512" in first, first
    assert "example_inputs" in first and "ShapeProp" not in str(caught.value)
    if capture == "fx":  # (Dynamo's fake-tensor run logs torch's own traceback before exfx sees the error)
        assert capsys.readouterr().err == ""
