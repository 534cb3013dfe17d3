"""Capture and the user entry points: errors that say what to do, the user's model untouched, odd inputs."""

from __future__ import annotations

import copy
import importlib.util
import logging
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import exfx
from exfx.capture import capture, normalise_inputs
from helpers import assert_enp_invariant, enp_nodes
from models import MLP, ResNetish, VGGish

NEVER = exfx.Config(threshold=float("-inf"), samples=8)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return F.relu(self.fc(x))
        return F.relu(-self.fc(x))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.fc2, self.fc3 = nn.Linear(40, 40), nn.Linear(40, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(self.inner(x))))


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: bool = True) -> torch.Tensor:
        if scale:
            x = x * 2
        if x.mean() > 10:
            x = x - 1
        return self.fc(x)


class WithFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 40), nn.Linear(40, 40)

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if double:
            h = h * 2
        return F.relu(self.fc2(h))


# ---------------------------------------------------------------------------
# Training mode
# ---------------------------------------------------------------------------


def test_training_mode_is_refused() -> None:
    model = MLP()  # nn.Module defaults to training mode
    with pytest.raises(exfx.TrainingModeError, match=r"\.eval\(\)"):
        exfx.compile(model, (torch.randn(2, 20),))
    with pytest.raises(exfx.TrainingModeError, match=r"\.eval\(\)"):
        exfx.explain(model, (torch.randn(2, 20),))


def test_one_submodule_in_training_mode_is_named() -> None:
    model = VGGish().eval()
    model.features[1].train()
    with pytest.raises(exfx.TrainingModeError, match=r"features\.1.*BatchNorm2d") as info:
        exfx.compile(model, (torch.randn(2, 3, 16, 16),))
    assert isinstance(info.value, exfx.ExfxError)


# ---------------------------------------------------------------------------
# Tracing failures
# ---------------------------------------------------------------------------


def test_untraceable_submodule_error_names_module_line_and_fixes() -> None:
    with pytest.raises(exfx.CaptureError) as info:
        exfx.compile(Outer().eval(), (torch.randn(2, 8),))
    message = str(info.value)
    assert "module 'inner'" in message
    assert "if x.sum() > 0:" in message and "line" in message
    assert "leaf_modules=['inner']" in message
    assert "concrete_args" in message


def test_untraceable_forward_error_suggests_concrete_args() -> None:
    model = TopLevelBranch().eval()
    with pytest.raises(exfx.CaptureError) as info:
        exfx.explain(model, (torch.randn(2, 8),))
    message = str(info.value)
    assert "the model's forward" in message and "leaf_modules" not in message
    assert "if scale:" in message  # a Python argument: concrete_args is the fix
    assert "concrete_args" in message
    with pytest.raises(exfx.CaptureError, match=r"if x\.mean\(\) > 10:"):  # the next problem
        exfx.explain(model, (torch.randn(2, 8),), concrete_args={"scale": True})


def test_error_location_found_for_user_code_in_a_directory_named_exfx(tmp_path) -> None:
    """User code is recognised by where torch and exfx are installed, not by a path that contains 'exfx'."""
    package = tmp_path / "exfx" / "work"
    package.mkdir(parents=True)
    source = package / "usermodel.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Branchy(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:  # the line to report
                    return x
                return -x
    """))
    spec = importlib.util.spec_from_file_location("exfx_test_usermodel", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(exfx.CaptureError, match="the line to report"):
        exfx.compile(module.Branchy().eval(), (torch.randn(2, 3),))


def test_leaf_modules_fixes_an_untraceable_submodule() -> None:
    model = Outer().eval()
    x = torch.randn(5, 8)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8), leaf_modules=["inner"])
    assert any(n.op == "call_module" and n.target == "inner" for n in gm.graph.nodes)
    with torch.no_grad():
        for inp in (x, -x.abs()):  # both branches of the opaque module
            torch.testing.assert_close(
                exfx.compile(model, (x,), NEVER, leaf_modules=["inner"])(inp), model(inp), rtol=1e-5, atol=1e-5)
    report = gm.meta["exfx_report"]
    # The opaque module's output axis is not known to be exchangeable: fc2 is not a site.
    assert not report.site("fc2").eligible


def test_capture_options_are_the_separate_keywords_in_one_object() -> None:
    """exfx.analyse/explain/compile take the capture options as keywords or as one exfx.CaptureOptions (or a
    dict of its fields), the bundle the tuners' capture_options= takes; not both at once."""
    model = Outer().eval()
    x = torch.randn(5, 8)
    options = exfx.CaptureOptions(leaf_modules=["inner"])
    assert options.leaf_modules == ("inner",) and options == exfx.CaptureOptions.of({"leaf_modules": ("inner",)})
    keywords = exfx.analyse(model, (x,), leaf_modules=["inner"])
    assert exfx.analyse(model, (x,), capture_options=options).signatures == keywords.signatures
    assert exfx.explain(model, (x,), capture_options={"leaf_modules": ["inner"]}).to_dict() \
        == exfx.explain(model, (x,), leaf_modules=["inner"]).to_dict()
    gm = exfx.compile(model, (x,), NEVER, capture_options=options)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="not both"):
        exfx.compile(model, (x,), capture_options=options, capture="fx")


@pytest.mark.parametrize("fields, error, message", [
    ({"leaf_modules": "inner"}, TypeError, "leaf_modules must be a sequence of names"),
    ({"hidden_inputs": [0]}, TypeError, "hidden_inputs must hold names"),
    ({"concrete_args": ["double"]}, TypeError, "concrete_args must map"),
    ({"capture": "jit"}, ValueError, "capture must be one of"),
])
def test_bad_capture_options_name_the_field(fields: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        exfx.CaptureOptions(**fields)
    with pytest.raises(error, match=message):
        exfx.compile(Outer().eval(), (torch.randn(2, 8),), **fields)
    with pytest.raises(ValueError, match="capture options of exfx.compile"):
        exfx.CaptureOptions.of({"leaf_module": ["inner"]})


def test_unknown_leaf_module_name() -> None:
    with pytest.raises(exfx.CaptureError, match="not submodules"):
        exfx.compile(Outer().eval(), (torch.randn(2, 8),), leaf_modules=["innr"])


def test_concrete_args_fix_a_python_argument() -> None:
    model = WithFlag().eval()
    x = torch.randn(3, 8)
    for double in (False, True):
        gm = exfx.compile(model, (x,), NEVER, concrete_args={"double": double})
        torch.testing.assert_close(gm(x), model(x, double=double), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Inputs and models of every kind
# ---------------------------------------------------------------------------


def test_existing_graph_module_is_accepted_and_not_modified() -> None:
    model = VGGish().eval()
    x = torch.randn(2, 3, 16, 16)
    traced = fx.symbolic_trace(model)
    code, state = traced.code, copy.deepcopy(traced.state_dict())
    gm = exfx.compile(traced, (x,), NEVER)
    assert enp_nodes(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert traced.code == code
    for key, value in state.items():
        assert torch.equal(traced.state_dict()[key], value)
    assert [s.name for s in exfx.explain(traced, (x,)).sites] == [s.name for s in exfx.explain(model, (x,)).sites]


class NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 40), nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_model_without_relu_is_returned_unchanged_with_a_report(caplog) -> None:
    model = NoRelu().eval()
    x = torch.randn(4, 6)
    with caplog.at_level(logging.INFO, logger="exfx"):
        gm = exfx.compile(model, (x,))
    assert not enp_nodes(gm)
    torch.testing.assert_close(gm(x), model(x))
    report = gm.meta["exfx_report"]
    # The tanh is reported, never a site, with the reason; no ReLU-family activation means nothing to rewrite.
    assert [(s.name, s.eligible, s.reason) for s in report.sites] == [
        ("tanh", False, "not a site: activation `tanh` is not zero on a half-line")]
    assert "no ReLU-family activation" in str(report).splitlines()[0]
    assert any("no ENP site" in r.getMessage() for r in caplog.records)


def test_model_with_no_eligible_site_reports_why() -> None:
    model = MLP((20, 16, 10)).eval()
    x = torch.randn(4, 20)
    gm = exfx.compile(model, (x,))
    torch.testing.assert_close(gm(x), model(x))
    report = gm.meta["exfx_report"]
    assert not report.eligible
    assert report.sites[0].reason.startswith("contraction axis is a model input")
    assert "0 of 1 ReLUs are ENP sites" in str(report)


@pytest.mark.parametrize("inputs", [
    (torch.randn(4, 21),),  # wrong feature count
    (torch.randn(4, 20), torch.randn(4, 20)),  # too many inputs
    (),  # too few
    (torch.randint(0, 3, (4, 20)),),  # wrong dtype
])
def test_wrong_example_inputs(inputs) -> None:
    with pytest.raises(exfx.UnsupportedModelError, match="example_inputs"):
        exfx.compile(MLP().eval(), inputs)


def test_example_inputs_forms() -> None:
    x = torch.randn(2, 3)
    assert normalise_inputs(x) == (x,)
    assert normalise_inputs([x, x]) == (x, x)
    with pytest.raises(exfx.UnsupportedModelError, match="tuple of positional inputs"):
        exfx.compile(MLP().eval(), {"x": torch.randn(2, 20)})
    with pytest.raises(exfx.UnsupportedModelError, match="nn.Module"):
        capture(lambda t: t)  # type: ignore[arg-type]


def _module_state(model: nn.Module) -> list:
    return [(name, type(m).__name__, m.training, dict(vars(m).get("_parameters", {})).keys(),
             sorted(vars(m)), getattr(m, "inplace", None)) for name, m in model.named_modules()]


@pytest.mark.parametrize("model_fn,shape", [(ResNetish, (2, 3, 8, 8)), (VGGish, (2, 3, 16, 16)), (MLP, (4, 20))])
def test_compile_does_not_mutate_the_users_model(model_fn, shape) -> None:
    model = model_fn().eval()
    x = torch.randn(*shape)
    state = copy.deepcopy(model.state_dict())
    structure = _module_state(model)
    params = {name: p for name, p in model.named_parameters()}
    want = model(x)
    exfx.compile(model, (x,), exfx.Config(samples=8))
    exfx.explain(model, (x,))
    assert _module_state(model) == structure
    assert {name: p for name, p in model.named_parameters()} == params  # same objects
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.testing.assert_close(model(x), want)


def test_float64_model() -> None:
    model = VGGish().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    never = exfx.compile(model, (x,), NEVER)
    assert never(x).dtype == torch.float64
    torch.testing.assert_close(never(x), model(x), rtol=1e-10, atol=1e-10)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8))
    records = assert_enp_invariant(gm, x, rtol=1e-10, atol=1e-10)
    assert any(r.pruned for r in records.values())


def test_non_contiguous_and_channels_last_inputs() -> None:
    model = ResNetish().eval()
    x = torch.randn(3, 3, 12, 12)
    gm = exfx.compile(model, (x,), exfx.Config(samples=8))
    never = exfx.compile(model, (x,), NEVER)
    with torch.no_grad():
        reference = gm(x)
        for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                        torch.randn(3, 3, 24, 24)[:, :, ::2, ::2]):
            assert not variant.is_contiguous() or variant is x
            expected = gm(variant.contiguous())
            torch.testing.assert_close(gm(variant), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(never(variant), model(variant), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(x.to(memory_format=torch.channels_last)), reference, rtol=1e-5, atol=1e-5)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl = exfx.compile(cl_model, (x.to(memory_format=torch.channels_last),), NEVER)
    torch.testing.assert_close(cl(x), model(x), rtol=1e-5, atol=1e-5)
    mlp = MLP().eval()
    t = torch.randn(20, 6).t()  # (6, 20), non-contiguous
    torch.testing.assert_close(exfx.compile(mlp, (t,), NEVER)(t), mlp(t), rtol=1e-5, atol=1e-5)
    assert_enp_invariant(exfx.compile(mlp, (t,), exfx.Config(samples=8)), t)


@pytest.mark.parametrize("config", [exfx.Config(samples=8), exfx.Config(rule="ztest", alpha=0.2, samples=(4, 8))],
                         ids=["threshold", "ztest"])
def test_torch_export_of_a_compiled_module(config: exfx.Config) -> None:
    model = VGGish().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = exfx.compile(model, (x,), config)
    exported = torch.export.export(gm, (x,))
    targets = {getattr(n.target, "name", lambda: "")() for n in exported.graph.nodes if n.op == "call_function"}
    assert {"exfx::partial_sum", "exfx::early_exit", "exfx::complete"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), gm(x), rtol=0, atol=0)
        other = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(exported.module()(other), gm(other), rtol=0, atol=0)
