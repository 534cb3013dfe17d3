"""Contractions over concatenated inputs (DenseNet-style): every concat block sampled in proportion.

The analysis records the units of each concat block along the contraction axis
(``SiteMatch.concat_blocks``, nested cats flattened, carried through BN, ReLU,
pooling and flatten); the ENP rewrite reorders that axis of the input and the
weight into :func:`~exfx.passes.enp_pass.sample_order`, so any first ``k`` units
hold every block in proportion and ``W' x' == W x``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import exfx
from exfx.cost.model import FORCE_LOWERING_ENV, THRESHOLD_TEST_FLOPS
from exfx.meta import SiteMatch, rewrite_role
from exfx.ops import native
from exfx.passes.operands import sample_order

from fuzz_models import Layer, Spec, build
from helpers import assert_enp_invariant
from models import DenseNetish

OPS = torch.ops.exfx
NEVER = exfx.Config(threshold=-math.inf, samples=8)
PRUNING = exfx.Config(threshold=0.0, samples=8)


class CatMLP(nn.Module):
    """Two hidden branches of different widths, concatenated, then one linear: blocks (24, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 24), nn.Linear(12, 8)
        self.fc, self.head = nn.Linear(32, 40), nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], -1)
        return self.head(torch.relu(self.fc(h)))


class NestedCat(nn.Module):
    """``cat([cat([a, b]), c])`` along channels, then a 1x1 conv: three blocks (8, 4, 12), not two."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 12, 3, padding=1)
        self.mix, self.head = nn.Conv2d(24, 16, 1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ab = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        h = torch.cat([ab, F.relu(self.c(x))], 1)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.mix(h)), 1).flatten(1))


class FlatCat(nn.Module):
    """A linear over a cat of two flattened feature maps: 6 + 3 channel units of ``spatial**2`` features.

    With ``small_b`` the second map is pooled to half the spatial size: units of different sizes.
    """

    def __init__(self, small_b: bool = False) -> None:
        super().__init__()
        self.small_b = small_b
        self.a, self.b = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        features = 6 * 16 + 3 * (4 if small_b else 16)
        self.fc, self.head = nn.Linear(features, 20), nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.relu(self.b(x))
        if self.small_b:
            b = F.max_pool2d(b, 2)
        h = torch.cat([F.relu(self.a(x)).flatten(1), b.flatten(1)], 1)
        return self.head(F.relu(self.fc(h)))


class InputCat(nn.Module):
    """A linear over ``cat([model input, hidden])``: the input block pins the group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc, self.head = nn.Linear(10, 22), nn.Linear(32, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.cat([x, torch.relu(self.a(x))], -1))))


class GroupedCat(nn.Module):
    """A grouped conv over a concat of two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.mix, self.head = nn.Conv2d(16, 16, 1, groups=2), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.head(F.relu(self.mix(h)).mean((2, 3)))


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.eval()


@pytest.fixture(scope="module")
def densenet() -> tuple[nn.Module, torch.Tensor, exfx.Analysis]:
    torch.manual_seed(0)
    model, x = DenseNetish().eval(), torch.randn(2, 3, 16, 16)
    return model, x, exfx.analyse(model, (x,))


def _sites(analysis: exfx.Analysis) -> dict[str, SiteMatch]:
    return {s.name: s for s in analysis.sites}


# ---------------------------------------------------------------------------
# The sample order
# ---------------------------------------------------------------------------


def _prefix_counts_are_fair(sizes: list[int], order: list[int]) -> None:
    total = sum(sizes)
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    block_of = [b for b, size in enumerate(sizes) for _ in range(size)]
    assert sorted(order) == list(range(total))
    counts = [0] * len(sizes)
    for k, unit in enumerate(order, start=1):
        b = block_of[unit]
        assert unit == starts[b] + counts[b], "a block's units must come in their own order"
        counts[b] += 1
        for block, size in enumerate(sizes):
            assert k * size // total <= counts[block] <= -(-k * size // total), (sizes, k, block, counts)


def test_sample_order_interleaves_blocks_in_proportion() -> None:
    assert sample_order([4, 2]) == [0, 1, 4, 2, 3, 5]
    assert sample_order([2, 2]) == [0, 2, 1, 3]
    assert sample_order([5]) == [0, 1, 2, 3, 4]
    assert sample_order([]) == [] and sample_order([0, 3, 0]) == [0, 1, 2]
    # Sorting by (i + 0.5) / n_b (Sainte-Lague) puts 32 units of the third block in the first 45 here.
    _prefix_counts_are_fair([3, 9, 39, 2], sample_order([3, 9, 39, 2]))
    with pytest.raises(ValueError, match="negative"):
        sample_order([3, -1])


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=10))
def test_every_prefix_holds_floor_or_ceil_of_each_share(sizes: list[int]) -> None:
    _prefix_counts_are_fair(sizes, sample_order(sizes))


# ---------------------------------------------------------------------------
# DenseNet-style model
# ---------------------------------------------------------------------------


def test_densenet_dense_layers_are_sites_with_their_blocks(densenet) -> None:
    _, _, analysis = densenet
    sites = _sites(analysis)
    assert sites["block.0.conv1"].eligible and sites["block.0.conv1"].concat_blocks == ()
    assert sites["block.1.conv1"].eligible and sites["block.1.conv1"].concat_blocks == (16, 8)
    assert sites["block.2.conv1"].eligible and sites["block.2.conv1"].concat_blocks == (16, 8, 8)  # flattened
    assert sites["block.2.conv1"].fan_in == sites["block.2.conv1"].n_units == 32
    assert "concat" not in str(analysis.report).split("block.2.conv1")[1].splitlines()[0]


def test_densenet_never_prune_is_the_original(densenet) -> None:
    model, x, analysis = densenet
    gm = analysis.compile(NEVER)  # samples 8 fits the first layer's fan-in 16
    assert {s.name for s in gm.meta["exfx_report"].eligible} == {f"block.{i}.conv1" for i in range(3)}
    with torch.no_grad():
        for batch in (x, torch.randn(5, 3, 16, 16)):
            torch.testing.assert_close(gm(batch), model(batch), rtol=1e-5, atol=1e-5)


def test_densenet_invariant_with_a_real_threshold(densenet) -> None:
    _, x, analysis = densenet
    gm = analysis.compile(PRUNING)
    records = assert_enp_invariant(gm, x)
    assert set(records) == {f"block.{i}.conv1" for i in range(3)}
    assert all(0 < r.pruned < r.active.numel() for r in records.values())


def test_the_rewrite_reorders_input_and_weight_once(densenet) -> None:
    model, x, analysis = densenet
    gm = analysis.compile(PRUNING)
    roles = {(r.site, r.role): n for n in gm.graph.nodes if (r := rewrite_role(n)) is not None}
    assert ("block.0.conv1", "sampled_input") not in roles  # one block: nothing to reorder
    order = roles[("block.2.conv1", "sample_order")]
    assert order.op == "get_attr" and str(order.target) == "exfx_block_2_conv1_sample_order"
    assert getattr(gm, str(order.target)).tolist() == sample_order([16, 8, 8])
    selected = roles[("block.2.conv1", "sampled_input")]
    assert selected.target is torch.index_select and selected.args[1] == 1 and selected.args[2] is order
    weight = getattr(gm, str(roles[("block.2.conv1", "sampled_weight")].target))
    original = model.block[2].conv1.weight  # BN2 folded into it: compare up to a per-row scale
    permuted = original[:, sample_order([16, 8, 8])]
    scale = weight[:, :1] / permuted[:, :1]
    torch.testing.assert_close(weight, permuted * scale)
    partial = next(n for n in gm.graph.nodes if n.target is OPS.partial_sum.default and "block_2" in n.name)
    assert partial.args[0] is selected


def test_densenet_flops_match_flop_counter_mode(densenet) -> None:
    model, x, analysis = densenet
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    gm = analysis.compile(NEVER)
    report = exfx.count_flops(gm, x)
    assert report.dense == counter.get_total_flops()
    neurons = sum(s.neurons for s in report.sites.values())
    assert report.executed - report.dense == THRESHOLD_TEST_FLOPS * neurons  # the test, nothing else
    assert all(s.pruned == 0 for s in report.sites.values())


def test_densenet_static_pruning_still_refuses_concatenated_units(densenet) -> None:
    _, x, analysis = densenet
    _, report = exfx.prune(analysis, (x,), None, method="l1", ratio=0.25)
    refused = {r.name: r.reason for r in report.refused}
    assert "concatenated" in refused["stem.0"] and "concat slicing is not supported" in refused["stem.0"]
    assert {layer.name for layer in report.layers} >= {"block.1.conv1", "block.2.conv1"}


# ---------------------------------------------------------------------------
# Other concat shapes
# ---------------------------------------------------------------------------


def test_nested_cats_flatten_into_three_blocks() -> None:
    model, x = _eval(NestedCat()), torch.randn(3, 3, 6, 6)
    analysis = exfx.analyse(model, (x,))
    mix = analysis.site("mix")
    assert mix.eligible and mix.concat_blocks == (8, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(NEVER)(x), model(x), rtol=1e-5, atol=1e-5)
    records = assert_enp_invariant(analysis.compile(exfx.Config(threshold=0.0, samples=6)), x)
    assert records["mix"].pruned > 0


def test_linear_over_a_cat_of_hidden_vectors() -> None:
    model, x = _eval(CatMLP()), torch.randn(16, 12)
    analysis = exfx.analyse(model, (x,))
    assert analysis.site("fc").concat_blocks == (24, 8)
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(NEVER)(x), model(x), rtol=1e-5, atol=1e-5)
    assert assert_enp_invariant(analysis.compile(PRUNING), x)["fc"].pruned > 0


def test_linear_over_a_cat_of_flattened_maps_moves_whole_units() -> None:
    model, x = _eval(FlatCat()), torch.randn(4, 2, 4, 4)
    analysis = exfx.analyse(model, (x,))
    fc = analysis.site("fc")
    assert fc.eligible and fc.concat_blocks == (6, 3) and fc.n_units == 9 and fc.signature.endswith("blocks of 16")
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(NEVER)(x), model(x), rtol=1e-5, atol=1e-5)
    gm = analysis.compile(exfx.Config(threshold=0.0, samples=3))
    assert assert_enp_invariant(gm, x)["fc"].pruned > 0
    index = gm.exfx_fc_sample_order.tolist()
    units = sample_order([6, 3])
    assert index == [u * 16 + i for u in units for i in range(16)]


def test_blocks_of_different_unit_sizes_are_refused() -> None:
    model, x = _eval(FlatCat(small_b=True)), torch.randn(2, 2, 4, 4)
    fc = exfx.analyse(model, (x,)).site("fc")
    assert not fc.eligible
    assert "units of different sizes (16, 4 elements per unit)" in fc.reason
    with torch.no_grad():
        torch.testing.assert_close(exfx.compile(model, (x,), NEVER)(x), model(x))


def test_a_pinned_block_pins_the_site_with_a_clear_reason() -> None:
    model, x = _eval(InputCat()), torch.randn(4, 10)
    fc = exfx.analyse(model, (x,)).site("fc")
    assert not fc.eligible
    assert fc.reason == "contraction axis is a model input (`x`) (it concatenates 2 blocks, pinned together)"


def test_a_grouped_conv_over_blocks_is_refused() -> None:
    model, x = _eval(GroupedCat()), torch.randn(2, 3, 5, 5)
    mix = exfx.analyse(model, (x,)).site("mix")
    assert not mix.eligible and "grouped conv (groups=2) over 2 concat blocks" in mix.reason


def test_native_lowering_runs_a_concat_site(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("EXFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(FORCE_LOWERING_ENV, "native")
    native.native_available()
    model, x = _eval(CatMLP()), torch.randn(16, 12)
    analysis = exfx.analyse(model, (x,))
    reference, lowered = analysis.compile(PRUNING), analysis.compile(PRUNING, lowering="native")
    assert lowered.meta["exfx_report"].site("fc").lowering == "native"
    assert OPS.enp_linear.default in {n.target for n in lowered.graph.nodes}
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), reference(x), rtol=1e-5, atol=1e-5)
        never = analysis.compile(NEVER, lowering="native")
        torch.testing.assert_close(never(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Fuzzed concat-then-contract
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(first=st.integers(1, 12), second=st.integers(1, 12), bn=st.booleans(), kernel=st.sampled_from((1, 3)),
       width=st.integers(2, 16), batch=st.integers(1, 3), seed=st.integers(0, 100))
def test_concat_then_contract_is_a_site(first, second, bn, kernel, width, batch, seed) -> None:
    spec = Spec("cnn", 3, 4, batch, (Layer("concat", width=first, width2=second, bn=bn),
                                     Layer("conv", width=width, kernel=kernel)), seed=seed)
    model, x = build(spec)
    analysis = exfx.analyse(model, (x,))
    site = analysis.site("blocks.1.op")
    assert site.eligible and site.concat_blocks == (first, second)
    samples = max(1, (first + second) // 2)
    with torch.no_grad():
        torch.testing.assert_close(analysis.compile(exfx.Config(threshold=-math.inf, samples=samples))(x), model(x),
                                   rtol=1e-4, atol=1e-5)
    assert_enp_invariant(analysis.compile(exfx.Config(threshold=0.0, samples=samples)), x, rtol=1e-4, atol=1e-5)
