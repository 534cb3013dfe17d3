"""A compiled module runs on whatever inputs its original accepts: batch sizes, sequence lengths, graph sizes,
image sizes. Dynamo captures every dimension symbolically where the model's code allows; where it does not,
the compiled module captures the model again at the new sizes (once per guard region, never per call).
Plans key sites by name and signatures hold weight-derived sizes only, so a plan made at one shape applies
at another. What the original model rejects, the compiled module rejects clearly.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import exfx

from helpers import assert_enp_invariant
from models import TransformerEncoderClassifier, _GraphClassifier, _Logits

NEVER = exfx.Config(threshold=-math.inf, samples=16)
PRUNE = exfx.Config(threshold=0.0, samples=16)
SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
geometric = pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is None, reason="needs torch_geometric")


def _ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _enp_holds(compiled, *inputs) -> None:
    """The ENP invariant on the graph a call with ``inputs`` runs. At one token the analysis finds no eligible
    site (it is conservative where an axis has size 1), so that graph runs dense; it must still be exact."""
    module = compiled.module_for(*inputs)
    if not module.meta["exfx_report"].eligible:
        assert inputs[0].dim() == 2 and inputs[0].shape[1] == 1, "no eligible site at these sizes"
        return
    assert_enp_invariant(module, *inputs)


def _same(compiled, model, *inputs) -> None:
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled(*inputs)), model(*inputs), rtol=1e-4, atol=1e-5)


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32, activation_function="relu")
    return _Logits(OPTForCausalLM(config), "input_ids").eval()


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_act="relu", max_position_embeddings=128, num_labels=3)
    return _Logits(BertForSequenceClassification(config), "input_ids").eval()


def _gnn(kind: str) -> nn.Module:
    from torch_geometric.nn.models import GCN, GIN, GraphSAGE

    torch.manual_seed(0)
    body = {"GCN": GCN, "GIN": GIN, "GraphSAGE": GraphSAGE}[kind](8, 32, num_layers=3, act="relu")
    return _GraphClassifier(body, hidden=32).eval()


def _graph(nodes: int, edges: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(nodes, 8, generator=generator), torch.randint(0, nodes, (2, edges), generator=generator)


class PooledCNN(nn.Module):
    """Convolutions, adaptive pooling and a linear head: any image size of at least 4 x 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pool, self.head = nn.AdaptiveAvgPool2d(2), nn.Linear(32 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.pool(x).flatten(1)))


# --- fixtures: each model compiled once, never-prune and pruning -----------------------------------------------


@pytest.fixture(scope="module")
def opt():
    model = _opt()
    example = (_ids(2, 16),)
    return model, exfx.compile(model, example, NEVER), exfx.compile(model, example, PRUNE)


@pytest.fixture(scope="module")
def bert():
    model = _bert()
    example = (_ids(2, 16),)
    return model, exfx.compile(model, example, NEVER), exfx.compile(model, example, PRUNE)


@pytest.fixture(scope="module")
def gcn():
    model = _gnn("GCN")
    example = _graph(30, 120)
    return model, exfx.compile(model, example, NEVER), exfx.compile(model, example, PRUNE)


# --- HF OPT and BERT: batch and sequence length vary -------------------------------------------------------------


@pytest.mark.slow
@transformers
def test_opt_shapes_of_the_issue(opt):
    model, never, pruned = opt
    for batch, tokens in ((1, 16), (4, 16), (2, 40), (1, 100), (3, 7)):
        ids = _ids(batch, tokens, seed=batch * 1000 + tokens)
        _same(never, model, ids)
        _enp_holds(pruned, ids)
    captures = len(never.meta["exfx_recapture"].modules)
    assert captures <= 1  # batch 1 is specialised by Dynamo: at most one more capture, whatever the length
    for batch, tokens in ((1, 16), (4, 16), (2, 40), (1, 100), (3, 7), (1, 33)):
        _same(never, model, _ids(batch, tokens))
    assert len(never.meta["exfx_recapture"].modules) == captures  # never per call at a shape already seen


@pytest.mark.slow
@transformers
@pytest.mark.parametrize("name", ["opt", "bert"])
@SETTINGS
@given(batch=st.integers(1, 5), tokens=st.integers(1, 64))
def test_language_model_never_prune_equals_the_model(request, name, batch, tokens):
    model, never, pruned = request.getfixturevalue(name)  # module-scoped: compiled once per model
    ids = _ids(batch, tokens, seed=tokens)
    _same(never, model, ids)
    _enp_holds(pruned, ids)


@pytest.mark.slow
@transformers
def test_what_the_model_rejects_fails_clearly(opt):
    """Past max_position_embeddings the original fails; so does the compiled module, with an exfx error."""
    model, never, _ = opt
    ids = _ids(2, 200)
    with pytest.raises(Exception):
        model(ids)
    with pytest.raises(exfx.UnsupportedModelError, match=r"int64\[2, 200\]"):
        never(ids)


# --- PyG: node and edge counts vary --------------------------------------------------------------------------------


@pytest.mark.slow
@geometric
def test_gcn_shapes_of_the_issue(gcn):
    model, never, pruned = gcn
    for nodes, edges in ((20, 60), (50, 300), (400, 2000)):
        inputs = _graph(nodes, edges, seed=nodes)
        _same(never, model, *inputs)
        _enp_holds(pruned, *inputs)
    assert not never.meta["exfx_recapture"].modules  # nodes and edges both symbolic: no capture again


@pytest.mark.slow
@geometric
@SETTINGS
@given(nodes=st.integers(2, 300), edges=st.integers(2, 1500))
def test_gcn_never_prune_equals_the_model(gcn, nodes, edges):
    model, never, pruned = gcn
    inputs = _graph(nodes, edges, seed=edges)
    _same(never, model, *inputs)
    _enp_holds(pruned, *inputs)


@pytest.mark.slow
@geometric
@pytest.mark.parametrize("kind", ["GIN", "GraphSAGE"])
def test_other_gnns_run_at_other_graph_sizes(kind):
    model = _gnn(kind)
    never = exfx.compile(model, _graph(30, 120), NEVER)
    pruned = exfx.compile(model, _graph(30, 120), PRUNE)
    for nodes, edges in ((20, 60), (50, 300), (200, 1000)):
        inputs = _graph(nodes, edges, seed=nodes)
        _same(never, model, *inputs)
        _enp_holds(pruned, *inputs)


@pytest.mark.slow
@geometric
def test_a_wrong_feature_count_fails_clearly(gcn):
    """The feature count is the weights': the original rejects 9 features, and so does the compiled module."""
    _, never, _ = gcn
    with pytest.raises(exfx.UnsupportedModelError):
        never(torch.randn(20, 9), torch.randint(0, 20, (2, 40)))


# --- a CNN with adaptive pooling (torch.fx capture) and one captured by Dynamo -----------------------------------


@pytest.fixture(scope="module")
def cnn():
    model = PooledCNN().eval()
    example = (torch.randn(2, 3, 32, 32),)
    return model, exfx.compile(model, example, NEVER), exfx.compile(model, example, PRUNE)


@SETTINGS
@given(batch=st.integers(1, 6), height=st.integers(4, 64), width=st.integers(4, 64))
def test_cnn_never_prune_equals_the_model(cnn, batch, height, width):
    model, never, pruned = cnn
    x = torch.randn(batch, 3, height, width)
    _same(never, model, x)
    _enp_holds(pruned, x)


def test_cnn_captured_by_dynamo_runs_at_other_image_sizes():
    model = PooledCNN().eval()
    never = exfx.compile(model, (torch.randn(2, 3, 32, 32),), NEVER, capture="dynamo")
    for shape in ((5, 3, 32, 32), (2, 3, 64, 64), (1, 3, 48, 48), (3, 3, 17, 23)):
        _same(never, model, torch.randn(*shape))
    assert len(never.meta["exfx_recapture"].modules) <= 1  # batch 1 at most


# --- nn.TransformerEncoder (captured by Dynamo to see its ReLUs) ---------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = TransformerEncoderClassifier(d=32, ffn=64).eval()
    example = (_ids(2, 10),)
    return model, exfx.compile(model, example, NEVER), exfx.compile(model, example, PRUNE)


@pytest.mark.slow
@SETTINGS
@given(batch=st.integers(1, 5), tokens=st.integers(1, 40))
def test_transformer_encoder_never_prune_equals_the_model(encoder, batch, tokens):
    model, never, pruned = encoder
    ids = _ids(batch, tokens, seed=tokens)
    _same(never, model, ids)
    _enp_holds(pruned, ids)


# --- plans key sites by name; signatures hold weight-derived sizes only --------------------------------------------


def test_signatures_do_not_depend_on_input_sizes():
    model = TransformerEncoderClassifier(d=32, ffn=64).eval()
    small = exfx.analyse(model, (_ids(2, 10),))
    large = exfx.analyse(model, (_ids(5, 23),))
    assert small.signatures and small.signatures == large.signatures
    cnn = PooledCNN().eval()
    assert exfx.analyse(cnn, (torch.randn(2, 3, 32, 32),)).signatures == \
        exfx.analyse(cnn, (torch.randn(3, 3, 20, 40),)).signatures


def test_a_plan_made_at_one_shape_applies_at_another():
    model = TransformerEncoderClassifier(d=32, ffn=64).eval()
    plan = exfx.Plan.from_report(exfx.explain(model, (_ids(2, 10),), PRUNE), PRUNE)
    compiled = exfx.compile(model, (_ids(4, 17),), plan=plan)
    for batch, tokens in ((4, 17), (3, 9)):
        ids = _ids(batch, tokens)
        assert_enp_invariant(compiled.module_for(ids), ids)
    ids = _ids(1, 5)  # batch 1: captured again, with the same plan
    assert_enp_invariant(compiled.module_for(ids), ids)
    assert compiled.module_for(ids).meta["exfx_report"].site(next(iter(plan.sites))).eligible
    compiled(_ids(2, 1))  # one token: fewer sites may be eligible there; the plan applies by name to the rest


# --- dynamic_shapes= -----------------------------------------------------------------------------------------------


class SizeView(nn.Module):
    """Reshapes with the sequence length: stays symbolic unless declared static."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).reshape(x.shape[0] * x.shape[1], -1)
        return self.fc2(h).view(x.shape[0], x.shape[1], -1)


class FixedLength(SizeView):
    """Its code fixes the sequence length to 6."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[1] == 6)
        return super().forward(x)


def test_every_dimension_is_symbolic_by_default():
    model = SizeView().eval()
    gm = exfx.compile(model, (torch.randn(3, 6, 8),), NEVER, capture="dynamo")
    assert gm.meta["exfx_input_sizes"] == ((None, None, 8),)  # the feature size is the weights'
    for shape in ((2, 6, 8), (4, 9, 8), (7, 2, 8)):
        _same(gm, model, torch.randn(*shape))
    assert not gm.meta["exfx_recapture"].modules


def test_a_dimension_declared_static_is_captured_again_per_size():
    from torch.export import Dim

    model = SizeView().eval()
    options = exfx.CaptureOptions(capture="dynamo", dynamic_shapes={"x": {0: Dim("batch"), 1: None}})
    gm = exfx.compile(model, (torch.randn(3, 6, 8),), NEVER, capture_options=options)
    assert gm.meta["exfx_input_sizes"] == ((None, 6, 8),)
    for shape in ((2, 6, 8), (4, 9, 8), (5, 9, 8), (2, 6, 8)):
        _same(gm, model, torch.randn(*shape))
    assert len(gm.meta["exfx_recapture"].modules) == 1  # one for length 9, shared by batches 4 and 5


def test_a_dimension_declared_dynamic_that_the_code_fixes_fails_capture():
    from torch.export import Dim

    options = exfx.CaptureOptions(capture="dynamo", dynamic_shapes=((Dim.AUTO, Dim("length"), None),))
    with pytest.raises(exfx.CaptureError, match="dynamic_shapes declares x\\[1\\] dynamic"):
        exfx.compile(FixedLength().eval(), (torch.randn(3, 6, 8),), NEVER, capture_options=options)
    gm = exfx.compile(FixedLength().eval(), (torch.randn(3, 6, 8),), NEVER, capture="dynamo")
    assert gm.meta["exfx_input_sizes"] == ((None, 6, 8),)  # left to Dynamo: specialised
    with pytest.raises(exfx.UnsupportedModelError):  # the original rejects another length
        gm(torch.randn(3, 7, 8))


@pytest.mark.parametrize("spec, error, match", [
    ("x", TypeError, "dynamic_shapes must map"),
    ({"x": {"0": None}}, TypeError, "dimension indices"),
    ({"x": {0: "batch"}}, TypeError, "must be a torch.export.Dim"),
    ({"y": {0: None}}, ValueError, "not inputs of forward"),
    ({"x": {5: None}}, ValueError, "no dimension 5"),
])
def test_malformed_dynamic_shapes_are_refused(spec, error, match):
    with pytest.raises(error, match=match):
        options = exfx.CaptureOptions(capture="dynamo", dynamic_shapes=spec)
        exfx.compile(SizeView().eval(), (torch.randn(3, 6, 8),), NEVER, capture_options=options)


# --- torch.export of a compiled module, with dynamic dimensions -------------------------------------------------------


def test_export_with_dynamic_dimensions_round_trips(tmp_path):
    from torch.export import Dim

    torch.manual_seed(0)
    model = PooledCNN().eval()
    x = torch.randn(2, 3, 32, 32)
    gm = exfx.compile(model, (x,), PRUNE)
    program = torch.export.export(gm, (x,), dynamic_shapes={"x": {0: Dim("batch"), 2: Dim("h", min=4, max=128),
                                                                  3: Dim("w", min=4, max=128)}})
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for shape in ((2, 3, 32, 32), (5, 3, 20, 48)):
        y = torch.randn(*shape)
        torch.testing.assert_close(loaded(y), gm(y))
    code = (f"import torch, exfx\n"
            f"m = torch.export.load({str(path)!r}).module()\n"
            f"print(tuple(m(torch.randn(3, 3, 40, 24)).shape))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "(3, 10)"


@pytest.mark.slow
@transformers
def test_export_of_a_dynamo_captured_model_with_dynamic_dimensions(opt):
    from torch.export import Dim

    model, _, pruned = opt
    ids = _ids(2, 16)
    program = torch.export.export(pruned, (ids,), dynamic_shapes={"inputs_0": {0: Dim("batch"),
                                                                               1: Dim("tokens", max=128)}})
    for batch, tokens in ((2, 16), (3, 40)):
        ids = _ids(batch, tokens)
        torch.testing.assert_close(_first(program.module()(ids)), _first(pruned(ids)))
