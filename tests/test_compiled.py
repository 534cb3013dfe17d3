"""The module exfx.compile returns (exfx.compiled.CompiledModule): input checks however it is called."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import exfx

from models import MLP

NEVER = exfx.Config(threshold=-math.inf, samples=16)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x) + shift))))


class VarArgs(TwoInputs):
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs[0], inputs[1])


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, shift = torch.randn(3, 16), torch.randn(64)
    return model, x, shift, exfx.compile(model, (x, shift), NEVER)


def test_keyword_inputs_run_like_positional_ones(compiled):
    model, x, shift, gm = compiled
    with torch.no_grad():
        expected = model(x, shift)
    torch.testing.assert_close(gm(x=x, shift=shift), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm(x, shift=shift), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda gm, x, s: gm(x=x.double(), shift=s), r"input 'x' has dtype torch.float64"),
    (lambda gm, x, s: gm(x, shift=s[None, None]), r"input 'shift' has 3 dims \(compiled for 1\)"),
    (lambda gm, x, s: gm(x=x, bias=s), r"cannot take these inputs.*'bias'.*takes x, shift"),
    (lambda gm, x, s: gm(x), r"cannot take these inputs.*missing.*'shift'"),
    (lambda gm, x, s: gm(x.numpy(), s), r"input 'x' is a ndarray, not a tensor"),
    (lambda gm, x, s: gm(x, s, s), r"takes 2 positional inputs \(x, shift\), got 3"),
])
def test_bad_calls_raise_exfx_errors_that_name_the_input(compiled, call, message):
    _, x, shift, gm = compiled
    with pytest.raises(exfx.UnsupportedModelError, match=message):
        call(gm, x, shift)


def test_a_failure_inside_names_the_keyword_inputs_given(compiled):
    _, x, shift, gm = compiled
    with pytest.raises(exfx.UnsupportedModelError, match=r"failed on inputs \[x: float32\[3, 16\] on cpu; "
                                                         r"shift: float32\[65\] on cpu\]"):
        gm(x=x, shift=torch.randn(65))


def test_variadic_forward_takes_every_example_input():
    torch.manual_seed(0)
    model = VarArgs().eval()
    x, shift = torch.randn(3, 16), torch.randn(64)
    gm = exfx.compile(model, (x, shift), NEVER)
    assert [s.name for s in gm.exfx_inputs] == ["inputs[0]", "inputs[1]"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, shift), model(x, shift), rtol=1e-5, atol=1e-5)
    with pytest.raises(exfx.UnsupportedModelError, match=r"input 'inputs\[1\]' has dtype torch.float64"):
        gm(x, shift.double())


def test_a_deep_copy_keeps_the_checks(compiled):
    _, x, shift, gm = compiled
    twin = copy.deepcopy(gm)
    torch.testing.assert_close(twin(x, shift), gm(x, shift))
    assert twin.exfx_inputs == gm.exfx_inputs
    with pytest.raises(exfx.UnsupportedModelError, match="dtype torch.float64"):
        twin(x.double(), shift)


INFERENCE_ONLY = "exfx compiled modules are for inference.*train the original model"


@pytest.mark.parametrize("lowering", ["reference", "native"])
def test_backward_through_a_compiled_module_says_it_is_inference_only(lowering):
    torch.manual_seed(0)
    model = TwoInputs().eval()  # weights require grad, as by default
    x, shift = torch.randn(3, 16), torch.randn(64)
    gm = exfx.compile(model, (x, shift), exfx.Config(samples=16), lowering=lowering)
    out = gm(x, shift)
    assert out.requires_grad  # as the original's would
    with pytest.raises(exfx.ExfxError, match=INFERENCE_ONLY + ".*torch.no_grad"):
        out.sum().backward()
    assert all(p.grad is None for p in gm.parameters())
    with pytest.raises(exfx.ExfxError, match=INFERENCE_ONLY):  # an output modified in place, as before
        gm(x, shift).mul_(2).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(gm(x, shift), out.detach())


def test_backward_through_a_reference_op_names_its_site():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 20)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8), lowering="reference")
    assert any("exfx.complete" in str(n.target) for n in gm.graph.nodes)
    with pytest.raises(exfx.ExfxError, match=r"for inference: backward through site 'net\.3' \(exfx::complete\) "
                                             r"is not supported.*train the original model"):
        gm.forward(x).sum().backward()  # the graph itself, without the module's call
