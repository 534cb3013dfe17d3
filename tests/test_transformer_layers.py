"""PyTorch's own transformer layers: captured op by op (MHA fast path off), FFN ReLUs as sites, FLOPs counted.

In eval mode ``nn.TransformerEncoderLayer`` runs as one fused op and, under
``no_grad``, ``nn.MultiheadAttention`` as another; both hide their work from the
analysis and from ``FlopCounterMode``. exfx captures and counts with the fast
path off (the same math), restores the flag afterwards, and names a fused op
that reaches the analysis anyway.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import exfx
from helpers import assert_enp_invariant
from models import TransformerEncoderClassifier

NEVER = exfx.Config(threshold=-math.inf, samples=8)
FUSED = {torch._transformer_encoder_layer_fwd, torch._native_multi_head_attention}


def _fastpath(enabled: bool) -> None:
    torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.fixture(autouse=True)
def _restore_fastpath():
    """Each test starts with the fast path on (torch's default) and leaves it as it found it."""
    before = torch.backends.mha.get_fastpath_enabled()
    _fastpath(True)
    yield
    _fastpath(before)


def reference_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """An independent count: ``FlopCounterMode`` on the original model, grad enabled and the fast path off."""
    before = torch.backends.mha.get_fastpath_enabled()
    _fastpath(False)
    try:
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        _fastpath(before)
    return int(counter.get_total_flops())


def no_grad_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """What ``FlopCounterMode`` alone counts under ``no_grad`` with the fast path on (the bug being fixed)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def _encoder() -> nn.Module:
    """The issue's snippet."""
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True), 2).eval()


class DecoderClassifier(nn.Module):
    """An embedding, ``nn.TransformerDecoderLayer`` (causal self-attention, cross-attention), a head."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layer = nn.TransformerDecoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor, memory_ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.layer(self.embed(ids), self.embed(memory_ids), tgt_mask=mask))


class AttentionMLP(nn.Module):
    """A bare ``nn.MultiheadAttention`` (self-attention: its fast path applies under no_grad), then an MLP."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d, 4, batch_first=True)
        self.fc1 = nn.Linear(d, 64)
        self.fc2 = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attention(x, x, x, need_weights=False)[0]
        return self.fc2(torch.relu(self.fc1(y + x)))


class FusedEncoderLayer(nn.Module):
    """Calls the fast path's fused op itself, as a graph captured with the fast path on does."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, attention = self.layer, self.layer.self_attn
        return torch._transformer_encoder_layer_fwd(
            x, 32, 4, attention.in_proj_weight, attention.in_proj_bias, attention.out_proj.weight,
            attention.out_proj.bias, False, False, 1e-5, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
            layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
            None, None)


class FusedAttentionMLP(AttentionMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        y = torch._native_multi_head_attention(x, x, x, 32, 4, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
                                               a.out_proj.bias, None, False)[0]
        return self.fc2(torch.relu(self.fc1(y)))


@pytest.fixture(scope="module")
def classifier() -> tuple[nn.Module, torch.Tensor, exfx.Analysis]:
    torch.manual_seed(0)
    model = TransformerEncoderClassifier().eval()
    ids = torch.randint(0, 100, (4, 12))
    return model, ids, exfx.analyse(model, (ids,))


def test_issue_snippet_reports_its_ffn_relus_and_counts_its_flops() -> None:
    model, x = _encoder(), torch.randn(2, 10, 64)
    report = exfx.explain(model, (x,))
    assert "no ReLU" not in str(report)
    assert [s.name for s in report.sites] == ["layers.0.linear1", "layers.1.linear1"]
    for site in report.sites:  # a raw float input pins the residual stream's embedding axis: correct, not a site
        assert not site.eligible and site.reason == "contraction axis is a model input (`src`)", site
    flops = exfx.count_flops(model, x)
    assert flops.dense > 0 and flops.dense == reference_flops(model, x)


def test_encoder_is_captured_op_by_op_through_dynamo(classifier) -> None:
    _, _, analysis = classifier
    gm = analysis.graph_module  # torch.fx would keep `encoder` opaque: the auto capture took Dynamo's graph
    assert type(gm).__name__ == "ExfxDynamoGraph"
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(t in FUSED for t in targets)
    assert sum(t is torch.relu for t in targets) == 2  # canonical ReLUs
    assert sum(t is torch.nn.functional.multi_head_attention_forward for t in targets) == 2
    assert [str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and "linear1" in str(n.target)] == [
        "encoder.layers.0.linear1.weight", "encoder.layers.0.linear1.bias",
        "encoder.layers.1.linear1.weight", "encoder.layers.1.linear1.bias"]


def test_ffn_sites_after_an_embedding_are_eligible(classifier) -> None:
    _, _, analysis = classifier
    sites = {s.name: s for s in analysis.sites}
    assert set(sites) == {"encoder.layers.0.linear1", "encoder.layers.1.linear1"}
    assert all(s.eligible and s.fan_in == 64 for s in sites.values()), sites


def _axis_group(analysis: exfx.Analysis, target: str, axis: int) -> str | None:
    node = next(n for n in analysis.graph_module.graph.nodes if n.op == "get_attr" and n.target == target)
    return analysis.groups.group_of[(node.name, axis)]


def test_attention_axes_embedding_free_heads_pinned(classifier) -> None:
    _, _, analysis = classifier
    layer = "encoder.layers.0"
    residual = _axis_group(analysis, f"{layer}.linear1.weight", 1)
    assert residual is not None  # the embedding axis, through the attention's projections
    assert _axis_group(analysis, f"{layer}.self_attn.in_proj_weight", 1) == residual
    assert _axis_group(analysis, f"{layer}.self_attn.out_proj.weight", 0) == residual
    assert _axis_group(analysis, f"{layer}.self_attn.out_proj.bias", 0) == residual
    assert _axis_group(analysis, "embed.weight", 1) == residual
    # Projection rows are split into q/k/v and heads; out_proj's columns are the merged heads: pinned.
    assert _axis_group(analysis, f"{layer}.self_attn.in_proj_weight", 0) is None
    assert _axis_group(analysis, f"{layer}.self_attn.in_proj_bias", 0) is None
    assert _axis_group(analysis, f"{layer}.self_attn.out_proj.weight", 1) is None
    # The FFN's hidden units are their own group (linear1's rows, linear2's columns).
    hidden = _axis_group(analysis, f"{layer}.linear1.weight", 0)
    assert hidden not in (None, residual) and _axis_group(analysis, f"{layer}.linear2.weight", 1) == hidden


def test_never_prune_equivalence_and_enp_invariant(classifier) -> None:
    model, ids, analysis = classifier
    never = analysis.compile(NEVER)
    pruning = analysis.compile(exfx.Config(threshold=0.0, samples=16))
    fresh = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(never(fresh), model(fresh), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(never(ids), model(ids), rtol=1e-5, atol=1e-5)
    records = assert_enp_invariant(pruning, fresh)
    assert set(records) == {"encoder.layers.0.linear1", "encoder.layers.1.linear1"}
    assert sum(r.pruned for r in records.values()) > 0  # the threshold did prune: the invariant was exercised


def test_compiled_module_runs_unfused_whatever_the_flag(classifier) -> None:
    model, ids, analysis = classifier
    never = analysis.compile(NEVER)
    assert not any(n.target in FUSED for n in never.graph.nodes if n.op == "call_function")
    op_by_op = exfx.count_flops(never, ids).executed  # counted with the fast path off
    assert op_by_op >= reference_flops(model, ids)
    for enabled in (True, False):
        _fastpath(enabled)
        # FlopCounterMode sees a fused op's work as nothing: the same count shows the graph ran op by op.
        assert no_grad_flops(never, ids) == op_by_op
        with torch.no_grad():
            torch.testing.assert_close(never(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_count_flops_of_the_classifier_and_its_compiled_form(classifier) -> None:
    model, ids, analysis = classifier
    reference = reference_flops(model, ids)
    assert no_grad_flops(model, ids) < reference  # the fast path hides its work from FlopCounterMode
    assert exfx.count_flops(model, ids).dense == reference
    with torch.no_grad():
        assert exfx.count_flops(model, ids).dense == reference
    assert exfx.count_flops(analysis.compile(NEVER), ids).dense == reference


@pytest.mark.parametrize("model_fn, inputs_fn", [
    (DecoderClassifier, lambda: (torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 9)))),
    (AttentionMLP, lambda: (torch.randn(2, 7, 32),)),
], ids=["TransformerDecoderLayer", "MultiheadAttention"])
def test_no_grad_counts_the_same_flops_as_grad(model_fn, inputs_fn) -> None:
    model, inputs = model_fn().eval(), inputs_fn()
    reference = reference_flops(model, *inputs)
    with torch.no_grad():
        assert exfx.count_flops(model, *inputs).dense == reference
    assert exfx.count_flops(model, *inputs).dense == reference


def test_bare_attention_fast_path_is_invisible_to_flop_counter_mode() -> None:
    model, x = AttentionMLP().eval(), torch.randn(2, 7, 32)
    assert no_grad_flops(model, x) < reference_flops(model, x)  # why count_flops switches the fast path off


def test_decoder_layer_ffn_site_is_eligible_and_exact_when_never_pruning() -> None:
    model = DecoderClassifier().eval()
    ids, memory = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 9))
    analysis = exfx.analyse(model, (ids, memory))
    assert [(s.name, s.eligible) for s in analysis.sites] == [("layer.linear1", True)]
    never = analysis.compile(exfx.Config(threshold=-math.inf, samples=16))
    with torch.no_grad():
        torch.testing.assert_close(never(ids, memory), model(ids, memory), rtol=1e-5, atol=1e-5)
    assert_enp_invariant(analysis.compile(exfx.Config(threshold=0.0, samples=16)), ids, memory)


def test_fused_encoder_layer_in_a_given_graph_module_is_named() -> None:
    gm = fx.symbolic_trace(FusedEncoderLayer().eval())
    report = exfx.explain(gm, (torch.randn(2, 5, 32),))
    assert "no ReLU" not in str(report)
    [site] = report.sites
    assert site.name == "layer.linear1" and not site.eligible
    assert site.reason == ("fused op `_transformer_encoder_layer_fwd` hides its ReLU; capture with "
                           "exfx.analyse/compile, which disables the fast path")


def test_fused_attention_in_a_given_graph_module_is_named_in_the_pin() -> None:
    gm = fx.symbolic_trace(FusedAttentionMLP().eval())
    [site] = exfx.explain(gm, (torch.randn(2, 5, 32),)).sites
    assert site.name == "fc1" and not site.eligible
    assert "fused op `_native_multi_head_attention`" in site.reason and "disables the fast path" in site.reason


def test_opaque_encoder_under_fx_capture_is_reported() -> None:
    model, ids = TransformerEncoderClassifier().eval(), torch.randint(0, 100, (2, 5))
    [site] = exfx.explain(model, (ids,), capture="fx").sites
    assert site.name == "encoder" and not site.eligible
    assert "opaque to torch.fx" in site.reason and "2 ReLUs" in site.reason and "capture='dynamo'" in site.reason


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.mark.parametrize("enabled", [True, False])
def test_fast_path_flag_is_restored(enabled: bool) -> None:
    _fastpath(enabled)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1).eval()
    x = torch.randn(2, 5, 16)
    exfx.analyse(model, (x,))
    assert torch.backends.mha.get_fastpath_enabled() is enabled
    exfx.compile(model, (x,), NEVER)
    assert torch.backends.mha.get_fastpath_enabled() is enabled
    exfx.count_flops(model, x)
    assert torch.backends.mha.get_fastpath_enabled() is enabled
    with pytest.raises(exfx.UnsupportedModelError, match="boom"):  # it fails eagerly too: the model's own error
        exfx.analyse(Boom().eval(), (x,))
    assert torch.backends.mha.get_fastpath_enabled() is enabled
    with pytest.raises(exfx.UnsupportedModelError, match="boom"):
        exfx.compile(Boom().eval(), (x,), NEVER)
    assert torch.backends.mha.get_fastpath_enabled() is enabled
    with pytest.raises(RuntimeError, match="boom"):
        exfx.count_flops(Boom(), x)
    assert torch.backends.mha.get_fastpath_enabled() is enabled
