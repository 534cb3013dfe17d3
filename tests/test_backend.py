"""The torch.compile backend (exfx.backend)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import exfx

from models import MLP, FunctionalMLP, OPTBlockLM, ResNetish, VGGish

TESTS = Path(__file__).parent


class BranchNet(nn.Module):
    """A data-dependent branch between two sites: Dynamo splits it into two graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64),
                                                  nn.Linear(64, 4))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        if h.sum() > 0:
            h = h * 2
        return self.fc4(F.relu(self.fc3(h)))


class BranchFree(BranchNet):
    """BranchNet's function without the Python branch (traceable by torch.fx)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h * torch.where(h.sum() > 0, 2.0, 1.0)
        return self.fc4(F.relu(self.fc3(h)))


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = {
    "mlp": lambda: (MLP().eval(), torch.randn(6, 20)),
    "functional": lambda: (FunctionalMLP().eval(), torch.randn(6, 16)),
    "vgg": lambda: (VGGish(width=16).eval(), torch.randn(3, 3, 16, 16)),
    "resnet": lambda: (ResNetish(width=32).eval(), torch.randn(3, 3, 16, 16)),
    "opt": lambda: (OPTBlockLM().eval(), torch.randint(0, 50, (2, 9))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_matches_exfx_compile(name):
    torch.manual_seed(0)
    model, x = CASES[name]()
    config = exfx.Config(threshold=0.0, samples=16)
    expected = exfx.compile(model, (x,), config, lowering="reference")(x)
    compiled = torch.compile(model, backend="exfx", options={"config": config.to_dict(), "inner": "eager",
                                                             "lowering": "reference"})
    with torch.no_grad():
        actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_backend_site_names_match_and_one_plan_serves_both(tmp_path):
    torch.manual_seed(0)
    model, x = VGGish(width=16).eval(), torch.randn(3, 3, 16, 16)
    report = exfx.explain(model, (x,), exfx.Config(samples=16))
    plan = exfx.Plan.from_report(report, exfx.Config(samples=16)).with_site("classifier.1", enabled=False)
    path = tmp_path / "plan.json"
    plan.save(path)
    expected = exfx.compile(model, (x,), plan=plan)(x)
    graphs = []

    def spy(gm, inputs):
        fn = exfx.backend(plan=str(path), inner="eager")(gm, inputs)
        graphs.append(fn.exfx_graph)
        return fn

    with torch.no_grad():
        actual = torch.compile(model, backend=spy)(x)
    torch.testing.assert_close(actual, expected)
    sites = [s.name for g in graphs for s in g.meta["exfx_report"].sites if s.eligible]
    assert sites == [s.name for s in exfx.compile(model, (x,), plan=plan).meta["exfx_report"].sites if s.eligible]
    assert "features.3" in sites and "classifier.1" not in sites


def test_a_plan_costs_the_backend_no_second_analysis(monkeypatch):
    """The backend used to analyse each graph twice when given a plan: once to cut the plan, once to compile."""
    from exfx.passes.exchangeability_pass import ExchangeabilityPass

    torch.manual_seed(0)
    model, x = VGGish(width=16).eval(), torch.randn(3, 3, 16, 16)
    plan = exfx.Plan.from_report(exfx.explain(model, (x,), exfx.Config(samples=16)), exfx.Config(samples=16))
    calls = []
    original = ExchangeabilityPass.__call__
    monkeypatch.setattr(ExchangeabilityPass, "__call__", lambda self, gm: calls.append(1) or original(self, gm))
    graphs = []

    def spy(gm, inputs):
        fn = exfx.backend(plan=plan, inner="eager")(gm, inputs)
        graphs.append(fn.exfx_graph)
        return fn

    with torch.no_grad():
        torch.compile(model, backend=spy)(x)
    assert len(graphs) == 1 and len(calls) == 1
    assert graphs[0].meta["exfx_report"].eligible


def test_graph_break_and_symbolic_batch_sizes():
    torch.manual_seed(0)
    model = BranchNet().eval()
    reference = BranchFree().eval()
    reference.load_state_dict(model.state_dict())
    config = exfx.Config(threshold=0.0, samples=16)
    compiled = torch.compile(model, backend=exfx.backend(config=config, inner="eager"))
    exfx_ref = exfx.compile(reference, (torch.randn(8, 16),), config)
    with torch.no_grad():
        for batch in (8, 3, 5, 11):
            x = torch.randn(batch, 16) * (1 if batch % 2 else -1)
            torch.testing.assert_close(compiled(x), exfx_ref(x), rtol=1e-5, atol=1e-5)


def test_never_prune_equals_the_original_model():
    torch.manual_seed(0)
    model, x = ResNetish(width=32).eval(), torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend=exfx.backend(config=exfx.Config(threshold=float("-inf")), inner="eager"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # Inductor generates and compiles C++
def test_inductor_is_the_default_inner_backend():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 20)
    expected = exfx.compile(model, (x,))(x)
    with torch.no_grad():
        actual = torch.compile(model, backend="exfx")(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_grad_mode_runs_the_same_forward():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 20)
    expected = exfx.compile(model, (x,))(x)
    actual = torch.compile(model, backend=exfx.backend(inner="eager"))(x)
    torch.testing.assert_close(actual, expected)
    assert not actual.requires_grad  # inference graph: weights are frozen


def test_training_mode_is_refused_clearly():
    model = VGGish(width=16).train()
    with pytest.raises(Exception, match="training mode.*Call model.eval"):
        torch.compile(model, backend=exfx.backend(inner="eager"))(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("dropout, shape", [(nn.Dropout1d, (3, 5, 8)), (nn.Dropout2d, (3, 5, 7, 8)),
                                            (nn.AlphaDropout, (3, 8)), (nn.FeatureAlphaDropout, (3, 5, 8))])
def test_every_dropout_in_training_mode_is_refused(dropout, shape):
    """Only F.dropout and F.batch_norm were checked: a training-mode Dropout1d ran, randomly, in the graph."""
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), dropout(0.5), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2)).train()
    with pytest.raises(Exception, match="training mode.*Call model.eval"):
        torch.compile(model, backend=exfx.backend(inner="eager"))(torch.randn(shape))
    torch._dynamo.reset()
    with torch.no_grad():  # in eval mode it compiles
        assert torch.compile(model.eval(), backend=exfx.backend(inner="eager"))(torch.randn(shape)).shape[-1] == 2


@pytest.mark.parametrize("options, message", [
    ({"bogus": 1}, "unknown option"),
    ({"inner": "tvm"}, "'inner' must be one of"),
    ({"config": {"rule": "nope"}}, "rule must be one of"),
    ({"config": 3}, "'config' must be an exfx.Config"),
    ({"lowering": "fast"}, "option 'lowering': lowering must be one of"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(Exception, match=message):
        torch.compile(MLP().eval(), backend="exfx", options=options)(torch.randn(2, 20))


def test_plan_for_another_model_is_refused():
    plan = exfx.Plan.from_report(exfx.explain(MLP().eval(), (torch.randn(2, 20),)))
    plan.signatures["net.1"] = "linear 64->999"
    with pytest.raises(Exception, match="(?s)mismatched sites.*Make a new plan"):
        torch.compile(MLP().eval(), backend=exfx.backend(plan=plan, inner="eager"))(torch.randn(2, 20))


def test_a_plan_that_names_none_of_the_graphs_sites_is_refused():
    """The backend kept only the plan's sites it found in the graph: a plan for another model shrank to an
    empty one, and every site then ran with the default settings, where exfx.compile raises."""
    x = torch.randn(2, 3, 16, 16)
    plan = exfx.Plan.from_report(exfx.explain(MLP().eval(), (torch.randn(2, 20),)))
    # Dynamo wraps the backend's exception (BackendCompilerFailed); the message is exfx's.
    with pytest.raises(Exception, match="(?s)PlanMismatchError.*features.3: plan has no such site, model has conv2d"):
        torch.compile(VGGish(width=16).eval(), backend=exfx.backend(plan=plan, inner="eager"))(x)
    with pytest.raises(exfx.PlanMismatchError):
        exfx.compile(VGGish(width=16).eval(), (x,), plan=plan)


def test_configured_backend_reads_its_plan_file_once(tmp_path):
    """exfx.backend(plan=path) re-read the file at every graph: a file changed or removed since failed later."""
    torch.manual_seed(0)
    model, x = BranchNet().eval(), torch.randn(4, 16)
    plan = exfx.Plan.from_report(exfx.explain(BranchFree().eval(), (x,), exfx.Config(samples=16)),
                                 exfx.Config(samples=16))
    path = tmp_path / "plan.json"
    plan.save(path)
    configured = exfx.backend(plan=path, inner="eager")
    path.unlink()
    with torch.no_grad():
        compiled = torch.compile(model, backend=configured)(x)  # two graphs: the data-dependent branch breaks
    assert compiled.shape == (4, 4)


def test_mode_is_passed_to_inductor_and_refused_for_eager():
    """torch.compile(mode=...) reaches the backend as a keyword: it raised a TypeError."""
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 20)
    expected = exfx.compile(model, (x,))(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="exfx", mode="reduce-overhead")(x), expected,
                                   rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"mode='max-autotune'.*inner backend is 'eager'"):
        torch.compile(model, backend=exfx.backend(inner="eager"), mode="max-autotune")(x)


def test_backend_registered_by_entry_point_without_importing_exfx():
    code = ("import sys, torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),"
            " torch.nn.ReLU(), torch.nn.Linear(64, 2)).eval()\n"
            "with torch.no_grad():\n"
            "    y = torch.compile(m, backend='exfx', options={'inner': 'eager'})(torch.randn(3, 8))\n"
            "assert y.shape == (3, 2)\n"
            "print('exfx' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(TESTS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"  # loaded through the entry point, not by the caller


# ---------------------------------------------------------------------------
# Dynamo capture (exfx.compile(..., capture="dynamo"), the fallback) and recover_parameters
# ---------------------------------------------------------------------------


class Flattening(nn.Module):
    """Reads the batch size (`x.size(0)`), as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x)).view(x.size(0), -1)
        return self.fc3(F.relu(self.fc2(h)))


class SizeBranch(Flattening):
    """Python control flow on the batch size: a graph traced for one size is wrong for another."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            x = -x
        return super().forward(x)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(features)))


class DictOut(Head):
    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = super().forward(features)
        return {"logits": logits, "features": features, "none": None, "again": logits}


class _Box:
    """An output object torch.utils._pytree cannot look into (as a Hugging Face DynamicCache)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class BoxOut(Head):
    def forward(self, features: torch.Tensor) -> tuple[_Box, torch.Tensor]:
        hidden = F.relu(self.fc2(features))
        return _Box(hidden * 2), self.fc3(hidden)


NEVER = exfx.Config(threshold=float("-inf"), samples=16)


def test_dynamo_capture_names_inputs_after_forward_arguments():
    torch.manual_seed(0)
    model, features = Head().eval(), torch.randn(4, 64)
    gm = exfx.compile(model, (features,), NEVER, capture="dynamo", hidden_inputs=["features"])
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["features"]
    assert gm.meta["exfx_report"].site("fc2").eligible  # hidden_inputs names forward()'s argument
    torch.testing.assert_close(gm(features=features), model(features), rtol=1e-5, atol=1e-5)
    report = exfx.explain(model, (features,), capture="dynamo")
    assert report.site("fc2").reason == "contraction axis is a model input (`features`)"


def test_backend_graph_takes_tensors_and_keeps_the_batch_size_symbolic():
    """With dynamic shapes Dynamo passes the batch size as a SymInt input; the exfx graph reads it from x.
    exfx's shape propagation used to run on Dynamo's fake tensors and specialise it: every size recompiled."""
    torch.manual_seed(0)
    model = Flattening().eval()
    config = exfx.Config(threshold=0.0, samples=16)
    reference = exfx.compile(model, (torch.randn(4, 16),), config)
    graphs = []

    def spy(gm, inputs):
        fn = exfx.backend(config=config, inner="eager")(gm, inputs)
        graphs.append(fn.exfx_graph)
        return fn

    compiled = torch.compile(model, backend=spy, dynamic=True)
    with torch.no_grad():
        for batch in (4, 7, 5):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    assert [[n.target for n in g.graph.nodes if n.op == "placeholder"] for g in graphs] == [["x"]]  # one graph
    assert graphs[0].meta["exfx_report"].site("fc2").eligible


def test_dynamo_capture_leaves_dynamo_caches_alone():
    """Each capture used to add a cache entry to the model class's forward: capture failed after the
    recompile limit (8), and the user's own torch.compile of the class had fewer recompiles left."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            exfx.compile(Flattening().eval(), (x,), capture="dynamo")
    assert not torch._C._dynamo.eval_frame._debug_get_cache_entry_list(Flattening.forward.__code__)


def test_dynamo_capture_runs_at_any_batch_size():
    torch.manual_seed(0)
    model = Flattening().eval()
    gm = exfx.compile(model, (torch.randn(4, 16),), NEVER, capture="dynamo")
    with torch.no_grad():
        for batch in (7, 2, 1):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, example_batch, sizes, captures", [
    (Flattening, 1, (3, 5, 1), 1),  # a batch of 1 is specialised: one capture more, symbolic from then on
    (SizeBranch, 2, (3, 7, 9, 4), 1),  # the code checks x.shape[0] > 4: the graph holds up to 4, again above
])
def test_dynamo_capture_captures_again_where_its_graph_does_not_hold(model_type, example_batch, sizes, captures):
    """Sizes the captured graph holds as constants (or branched on) used to be refused; now the model is
    captured again behind a guard, once per guard region, never per call."""
    torch.manual_seed(0)
    model = model_type().eval()
    x = torch.randn(example_batch, 16)
    gm = exfx.compile(model, (x,), NEVER, capture="dynamo")
    with torch.no_grad():
        for batch in (example_batch, *sizes, *sizes):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(gm.meta["exfx_recapture"].modules) == captures


def test_dynamo_capture_refuses_sizes_its_graph_does_not_hold_without_its_model():
    """A module that cannot capture again (here: its record dropped, as after pickling) still fails clearly."""
    torch.manual_seed(0)
    model = SizeBranch().eval()
    gm = exfx.compile(model, (torch.randn(2, 16),), NEVER, capture="dynamo")
    gm.meta["exfx_recapture"] = None
    with pytest.raises(exfx.UnsupportedModelError, match=r"does not hold at input sizes \[x: \[7, 16\]\]"):
        gm(torch.randn(7, 16))


def test_dynamo_capture_returns_a_tensor_for_a_tensor_and_every_output_tensor_otherwise():
    """Dynamo's graph returns only what it computed, once each: inputs passed through and repeats were lost."""
    torch.manual_seed(0)
    features = torch.randn(4, 64)
    head, with_dict = Head().eval(), DictOut().eval()
    out = exfx.compile(head, (features,), NEVER, capture="dynamo")(features)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, head(features), rtol=1e-5, atol=1e-5)
    out = exfx.compile(with_dict, (features,), NEVER, capture="dynamo")(features)
    expected = with_dict(features)
    assert isinstance(out, tuple) and len(out) == 3
    for actual, wanted in zip(out, (expected["logits"], features, expected["again"])):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    with_box = BoxOut().eval()
    box, logits = with_box(features)
    out = exfx.compile(with_box, (features,), NEVER, capture="dynamo")(features)
    assert len(out) == 2  # the model's own tensors first, then the box's
    torch.testing.assert_close(out[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], box.tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, forms", [({}, {"native", "dense"}), ({"lowering": "native"}, {"native", "dense"}),
                                            ({"lowering": "reference"}, {""})])
def test_lowering_option_and_its_native_default(options, forms, monkeypatch, tmp_path):
    """No option means native lowering, as exfx.compile; each call equals the reference ops or the dense model."""
    monkeypatch.setenv("EXFX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EXFX_LOWERING", raising=False)
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(6, 20)
    config = exfx.Config(threshold=0.0, samples=16)
    graphs = []

    def recording(gm, example_inputs):
        run = exfx.dynamo_backend.exfx_backend(gm, example_inputs, options={"config": config.to_dict(),
                                                                            "inner": "eager", **options})
        graphs.append(run.exfx_graph)
        return run

    compiled = torch.compile(model, backend=recording)
    with torch.no_grad():
        actual = compiled(x)
        reference, dense = exfx.compile(model, (x,), config, lowering="reference")(x), model(x)
    assert {s.lowering for g in graphs for s in g.meta["exfx_report"].eligible} <= forms
    assert torch.allclose(actual, reference, atol=1e-5) or torch.allclose(actual, dense, atol=1e-5)
