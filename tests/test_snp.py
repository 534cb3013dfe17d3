"""Static structured pruning (SNP and baselines): physical removal, exact folds, refusals, bad inputs.

Small random models and a few batches; every check runs the pruned GraphModule itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import exfx
from exfx.pruning import prune
from exfx.snp import (
    PruneError,
    PruneWarning,
    count_parameters,
    kept_from_energy,
    kept_from_ratio,
    ldl_diagonal,
    pivoted_ldl,
    zca_order,
)
from models import MLP, ResNetish, VGGish

# The small data sets here give the classifier layers fewer samples than units; that warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore::exfx.snp.PruneWarning")


def _data(shape: tuple[int, ...], batches: int = 3, size: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=generator), None) for _ in range(batches)]


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


# ---------------------------------------------------------------------------
# Models with exactly redundant hidden units
# ---------------------------------------------------------------------------


def _redundant_rows(layer: nn.Module, n_base: int, sources: list[int], scales: list[float]) -> None:
    """Rows ``n_base + j`` of ``layer`` become ``scales[j] * row[sources[j]]``: after the ReLU, unit ``n_base + j``
    is exactly ``scales[j]`` times unit ``sources[j]`` (positive scaling commutes with ReLU)."""
    with torch.no_grad():
        for j, (src, scale) in enumerate(zip(sources, scales)):
            layer.weight[n_base + j] = scale * layer.weight[src]
            layer.bias[n_base + j] = scale * layer.bias[src]


class TwoLayer(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvConv(nn.Module):
    def __init__(self, hidden: int, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.conv1 = nn.Conv2d(3, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 5, 3, padding=1)
        self.fc = nn.Linear(hidden * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        return self.fc(h.flatten(1)) if self.flatten else self.conv2(h)


def _redundant_model(kind: str, n_base: int, n_dup: int, seed: int) -> tuple[nn.Module, tuple[int, ...], str]:
    torch.manual_seed(seed)
    n = n_base + n_dup
    if kind == "linear":
        model, shape, layer, name = TwoLayer(6, n, 4), (6,), None, "fc1"
        layer = model.fc1
    else:
        model, shape, name = ConvConv(n, flatten=kind == "conv_flatten"), (3, 6, 6), "conv1"
        layer = model.conv1
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randint(0, n_base, (n_dup,), generator=generator).tolist()
    scales = (2.0 + 3.0 * torch.rand(n_dup, generator=generator)).tolist()  # large rows: L1 keeps them
    _redundant_rows(layer, n_base, sources, scales)
    return model.eval(), shape, name


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_flatten"])
@pytest.mark.parametrize("order", ["pivoted_cholesky", "zca"])
def test_snp_removes_exactly_redundant_units_without_error_and_l1_does_not(kind: str, order: str) -> None:
    model, shape, name = _redundant_model(kind, n_base=6, n_dup=4, seed=0)
    data = _data(shape)
    x = data[0][0]
    ratio = 4 / 10
    pruned, report = prune(model, (x[:2],), data, ratio=ratio, order=order)
    assert report.layer(name).units_after == 6
    assert _rel_error(_run(pruned, x), _run(model, x)) < 1e-4
    l1, _ = prune(model, (x[:2],), data, ratio=ratio, method="l1")
    assert _rel_error(_run(l1, x), _run(model, x)) > 1e-2


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_base=st.integers(2, 8), n_dup=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_property_duplicated_units_are_pruned_losslessly(n_base: int, n_dup: int, seed: int) -> None:
    model, shape, name = _redundant_model("linear", n_base, n_dup, seed)
    data = _data(shape, batches=2)
    x = data[0][0]
    pruned, report = prune(model, (x[:2],), data, ratio=n_dup / (n_base + n_dup))
    assert report.layer(name).units_after == n_base
    assert _rel_error(_run(pruned, x), _run(model, x)) < 1e-4
    # keep_variance=1 keeps just the rank of the layer: never more than the independent units.
    _, full = prune(model, (x[:2],), data, keep_variance=1.0)
    assert full.layer(name).units_after <= n_base


# ---------------------------------------------------------------------------
# The fold is the least-squares reconstruction it claims
# ---------------------------------------------------------------------------


def test_fold_equals_a_direct_numpy_least_squares_solution() -> None:
    torch.manual_seed(3)
    model = TwoLayer(5, 12, 3).eval()
    data = _data((5,), batches=4, size=40, seed=7)
    pruned, report = prune(model, (data[0][0][:2],), data, ratio=0.5, ridge=0.0)
    kept = list(report.layer("fc1").kept)
    removed = [i for i in range(12) if i not in kept]
    with torch.no_grad():
        hidden = torch.cat([torch.relu(model.fc1(x)) for x, _ in data]).double().numpy()
    design = np.hstack([hidden[:, kept], np.ones((hidden.shape[0], 1))])
    solution, *_ = np.linalg.lstsq(design, hidden[:, removed], rcond=None)
    a_matrix, offset = solution[:-1].T, solution[-1]  # a_P ~ A a_K + c
    w, b = model.fc2.weight.detach().double().numpy(), model.fc2.bias.detach().double().numpy()
    expected_w = w[:, kept] + w[:, removed] @ a_matrix
    expected_b = b + w[:, removed] @ offset
    np.testing.assert_allclose(pruned.fc2.weight.detach().double().numpy(), expected_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pruned.fc2.bias.detach().double().numpy(), expected_b, rtol=1e-4, atol=1e-5)
    # ... and the smaller network's output is the original with a_P replaced by its reconstruction.
    x = data[1][0]
    with torch.no_grad():
        h = torch.relu(model.fc1(x)).double().numpy()
    h[:, removed] = h[:, kept] @ a_matrix.T + offset
    reconstructed = h @ w.T + b
    np.testing.assert_allclose(_run(pruned, x).double().numpy(), reconstructed, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Physical removal on the shared models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["snp", "l1", "random", "bias_fold"])
def test_pruned_vggish_is_smaller_runs_and_reports_its_parameter_count(method: str) -> None:
    model = VGGish().eval()
    data = _data((3, 16, 16), batches=2, size=8)
    x = data[0][0]
    pruned, report = prune(model, (x[:2],), data, ratio=0.5, method=method)
    assert _run(pruned, x).shape == (8, 10)
    assert report.params_after == sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned)
    assert report.params_after < report.params_before / 2
    assert report.flops_after < report.flops_before / 2
    assert [layer.name for layer in report.layers] == ["features.0", "features.3", "features.7", "classifier.1"]
    assert all(layer.units_after == layer.units_before // 2 for layer in report.layers)
    # conv -> relu -> pool -> conv, and conv -> relu -> pool -> flatten -> linear (channel blocks of 4x4).
    assert pruned.get_parameter("features.3.weight").shape == (16, 8, 3, 3)
    assert pruned.get_parameter("classifier.1.weight").shape == (32, 32 * 16)
    assert report.refused == ()
    assert "features.7" in str(report) and "params" in str(report)


def test_resnet_block_internal_channels_are_pruned_and_the_residual_stream_left_alone() -> None:
    model = ResNetish().eval()
    data = _data((3, 8, 8), batches=2, size=8)
    x = data[0][0]
    pruned, report = prune(model, (x[:2],), data, ratio=0.5)
    assert [layer.name for layer in report.layers] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]
    refused = {r.name: r.reason for r in report.refused}
    assert set(refused) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"}
    assert all("residual" in reason for reason in refused.values()), refused
    assert pruned.get_parameter("layer1.0.conv1.weight").shape[0] == 8
    assert pruned.get_parameter("layer1.0.conv2.weight").shape == (16, 8, 3, 3)
    assert pruned.get_parameter("conv1.weight").shape[0] == 16  # the stream keeps its width
    assert _rel_error(_run(pruned, x), _run(model, x)) < 0.5


@pytest.mark.parametrize("model, shape", [(MLP(), (20,)), (VGGish(), (3, 16, 16)), (ResNetish(), (3, 8, 8))],
                         ids=["mlp", "vggish", "resnetish"])
@pytest.mark.parametrize("method", ["snp", "l1", "bias_fold"])
def test_ratio_zero_changes_nothing(model: nn.Module, shape: tuple[int, ...], method: str) -> None:
    model.eval()
    data = _data(shape, batches=1, size=8)
    x = data[0][0]
    pruned, report = prune(model, (x[:2],), data, ratio=0.0, method=method)
    torch.testing.assert_close(_run(pruned, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert report.params_after == report.params_before and report.units_removed == 0


@pytest.mark.parametrize("model, shape", [(VGGish(), (3, 16, 16)), (ResNetish(), (3, 8, 8))],
                         ids=["vggish", "resnetish"])
def test_pruned_module_compiles_and_never_prune_is_equivalent(model: nn.Module, shape: tuple[int, ...]) -> None:
    data = _data(shape, batches=1, size=8)
    x = data[0][0]
    pruned, _ = prune(model.eval(), (x[:2],), data, ratio=0.5)
    compiled = exfx.analyse(pruned, (x[:2],)).compile(exfx.Config(threshold=float("-inf")))
    torch.testing.assert_close(_run(compiled, x), _run(pruned, x), rtol=1e-5, atol=1e-5)


def test_keep_variance_sets_per_layer_counts_shared_by_every_method() -> None:
    model = VGGish().eval()
    data = _data((3, 16, 16), batches=2, size=8)
    x = data[0][0]
    _, snp = prune(model, (x[:2],), data, keep_variance=0.8, round_to=4)
    _, l1 = prune(model, (x[:2],), data, keep_variance=0.8, round_to=4, method="l1")
    assert [layer.units_after for layer in snp.layers] == [layer.units_after for layer in l1.layers]
    assert all(layer.units_after % 4 == 0 or layer.units_after == layer.units_before for layer in snp.layers)
    assert all(layer.energy_kept is not None and layer.energy_kept >= 0.8 for layer in snp.layers)
    assert any(layer.units_after < layer.units_before for layer in snp.layers)


def test_random_is_seeded_and_l1_needs_no_data() -> None:
    model = MLP().eval()
    x = torch.randn(4, 20)
    _, first = prune(model, (x,), None, ratio=0.5, method="random", seed=3)
    _, again = prune(model, (x,), None, ratio=0.5, method="random", seed=3)
    _, other = prune(model, (x,), None, ratio=0.5, method="random", seed=4)
    assert [layer.kept for layer in first.layers] == [layer.kept for layer in again.layers]
    assert [layer.kept for layer in first.layers] != [layer.kept for layer in other.layers]
    pruned, _ = prune(model, (x,), None, ratio=0.5, method="l1")
    assert _run(pruned, x).shape == (4, 10)


def test_bias_fold_absorbs_a_constant_unit_exactly_where_l1_loses_it() -> None:
    torch.manual_seed(0)
    model = TwoLayer(6, 8, 3).eval()
    with torch.no_grad():
        model.fc1.weight[5] = 0.0  # unit 5 is the constant relu(2.0): the smallest L1 row
        model.fc1.bias[5] = 2.0
        model.fc2.weight[:, 5] = 3.0
    data = _data((6,), batches=2)
    x = data[0][0]
    folded, report = prune(model, (x[:2],), data, ratio=1 / 8, method="bias_fold")
    assert 5 not in report.layer("fc1").kept
    torch.testing.assert_close(_run(folded, x), _run(model, x), rtol=1e-5, atol=1e-5)
    dropped, _ = prune(model, (x[:2],), data, ratio=1 / 8, method="l1")
    assert _rel_error(_run(dropped, x), _run(model, x)) > 0.1


def test_a_bias_free_consumer_gets_a_bias_for_the_folded_constant() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)).eval()
    data = _data((6,), batches=2)
    x = data[0][0]
    pruned, _ = prune(model, (x[:2],), data, ratio=0.5)
    assert pruned.get_parameter("4.bias").shape == (3,)
    assert _run(pruned, x).shape == (32, 3)


# ---------------------------------------------------------------------------
# The subspace algebra
# ---------------------------------------------------------------------------


def test_pivoted_ldl_puts_dependent_units_last_with_zero_energy() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    x = torch.cat([base, base[:, :1] * 3 + base[:, 1:2], base[:, 2:3]], 1)  # units 4, 5 depend on 0..2
    cov = torch.cov(x.T, correction=0)
    order, energies = pivoted_ldl(cov)
    assert sorted(order) == list(range(6))
    assert float(energies[:4].min()) > 0.1 and float(energies[4:].abs().max()) < 1e-9
    assert all(float(a) >= float(b) - 1e-12 for a, b in itertools.pairwise(energies))  # greedy: non-increasing
    assert float(torch.linalg.eigvalsh(cov[order[:4]][:, order[:4]]).min()) > 1e-3  # the kept four span it all
    torch.testing.assert_close(ldl_diagonal(cov, order), energies)
    # LDL^T energies in any order are the conditional variances: their product is det(cov) on a full-rank block.
    block = order[:4]
    torch.testing.assert_close(torch.prod(ldl_diagonal(cov[block][:, block], [0, 1, 2, 3])),
                               torch.linalg.det(cov[block][:, block]))
    ranked = zca_order(cov)
    assert sorted(ranked) == list(range(6)) and ranked[0] == 4  # the largest unit carries most own energy
    assert float(ldl_diagonal(cov, ranked)[4:].abs().max()) < 1e-9  # ZCA also leaves two redundant units last


def test_kept_counts_round_to_multiples_and_never_reach_zero() -> None:
    assert kept_from_ratio(10, 0.0) == 10 and kept_from_ratio(10, 0.5) == 5 and kept_from_ratio(3, 0.9) == 1
    assert kept_from_ratio(10, 0.5, round_to=4) == 4 and kept_from_ratio(64, 0.25, round_to=8) == 48
    energies = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert kept_from_energy(energies, 0.7) == 2 and kept_from_energy(energies, 1.0) == 4
    assert kept_from_energy(energies, 0.7, round_to=3) == 3
    assert kept_from_energy(torch.zeros(5, dtype=torch.float64), 0.9) == 1


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"keep_variance": 0.0}, "keep_variance"),
    ({"keep_variance": 1.5}, "keep_variance"), ({}, "ratio"), ({"ratio": 0.5, "keep_variance": 0.9}, "ratio"),
    ({"ratio": 0.5, "method": "taylor"}, "method"), ({"ratio": 0.5, "order": "svd"}, "order"),
    ({"ratio": 0.5, "round_to": 0}, "round_to"), ({"ratio": 0.5, "ridge": -1.0}, "ridge"),
])
def test_bad_arguments_raise_a_prune_error_naming_the_field(kwargs: dict, field: str) -> None:
    model = MLP().eval()
    x = torch.randn(4, 20)
    with pytest.raises(PruneError, match=field) as info:
        prune(model, (x,), _data((20,), batches=1), **kwargs)
    assert isinstance(info.value, exfx.ExfxError)


def test_snp_without_data_and_empty_data_raise() -> None:
    model, x = MLP().eval(), torch.randn(4, 20)
    with pytest.raises(PruneError, match="needs data"):
        prune(model, (x,), None, ratio=0.5)
    with pytest.raises(PruneError, match="no batch"):
        prune(model, (x,), [], ratio=0.5)


def test_nan_statistics_name_the_layer() -> None:
    model, x = MLP().eval(), torch.randn(4, 20)
    bad = torch.randn(8, 20)
    bad[0, 0] = float("nan")
    with pytest.raises(PruneError, match=r"layer `net\.0`.*NaN"):
        prune(model, (x,), [(bad, None)], ratio=0.5)


def test_fewer_samples_than_units_warns_with_the_numbers_and_still_prunes() -> None:
    model, x = MLP().eval(), torch.randn(4, 20)
    with pytest.warns(PruneWarning, match=r"`net\.0`: 8 statistics samples .* 64 units"):
        pruned, _ = prune(model, (x,), [(torch.randn(8, 20), None)], ratio=0.5)
    assert torch.isfinite(_run(pruned, x)).all()


def test_a_model_with_no_prunable_axis_is_returned_whole_with_the_reasons() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).eval()
    x = torch.randn(4, 6)
    with pytest.warns(PruneWarning, match=r"no layer of Sequential can be pruned.*\n  0: pinned: model output"):
        pruned, report = prune(model, (x,), _data((6,), batches=1), ratio=0.5)
    assert report.layers == () and len(report.refused) == 1
    assert "model output" in report.refused[0].reason
    torch.testing.assert_close(_run(pruned, x), _run(model, x))
    assert report.params_after == report.params_before


# ---------------------------------------------------------------------------
# Magnitude pruning, composition with ExPrune, fine-tuning
# ---------------------------------------------------------------------------


def _weight_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    from exfx.snp.magnitude import weight_targets

    return {target: gm.get_parameter(target) if target in dict(gm.named_parameters()) else gm.get_buffer(target)
            for target in weight_targets(gm)}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_magnitude_zeros_exactly_the_reported_fraction_of_the_smallest_weights(sparsity: float) -> None:
    torch.manual_seed(0)
    model, x = VGGish(width=8).eval(), torch.randn(4, 3, 16, 16)
    analysis = exfx.analyse(model, (x,))
    before = {t: w.detach().clone() for t, w in _weight_tensors(analysis.graph_module).items()}
    sparse, report = prune(analysis, (x,), None, method="magnitude", ratio=sparsity)
    after = _weight_tensors(sparse)
    numel = sum(w.numel() for w in before.values())
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == round(sparsity * numel)
    assert report.sparsity == pytest.approx(zeros / numel)
    assert report.layers == () and report.flops_after == report.flops_before
    kept = torch.cat([before[t][after[t] != 0].abs().reshape(-1) for t in before])
    dropped = torch.cat([before[t][after[t] == 0].abs().reshape(-1) for t in before])
    if dropped.numel():
        assert float(dropped.max()) <= float(kept.min())
    for target, w in after.items():  # a kept weight is unchanged; the analysed graph is untouched
        assert torch.equal(w[w != 0], before[target][w != 0])
        assert torch.equal(_weight_tensors(analysis.graph_module)[target], before[target])


def test_magnitude_refuses_bad_arguments() -> None:
    model, x = VGGish(width=8).eval(), torch.randn(4, 3, 16, 16)
    with pytest.raises(PruneError, match="ratio="):
        prune(model, (x,), _data((3, 16, 16)), method="magnitude", keep_variance=0.9)
    with pytest.raises(PruneError, match="ratio="):
        prune(model, (x,), None, method="magnitude", ratio=1.0)
    from exfx.snp import magnitude_prune

    with pytest.raises(PruneError, match="sparsity=1.5"):
        magnitude_prune(exfx.analyse(model, (x,)), (x,), sparsity=1.5)


def test_never_prune_exprune_on_a_magnitude_pruned_model_equals_it() -> None:
    torch.manual_seed(0)
    model, x = VGGish(width=8).eval(), torch.randn(6, 3, 16, 16)
    sparse, _ = prune(model, (x,), None, method="magnitude", ratio=0.7)
    compiled = exfx.analyse(sparse, (x,)).compile(exfx.Config(rule="ztest", alpha=0.0))
    torch.testing.assert_close(_run(compiled, x), _run(sparse, x), rtol=1e-5, atol=1e-5)


def test_exprune_composes_on_an_snp_pruned_model_within_budget() -> None:
    torch.manual_seed(0)
    model, x = VGGish(width=8).eval(), torch.randn(4, 3, 16, 16)
    pruned, report = prune(model, (x,), _data((3, 16, 16)), ratio=0.5)
    assert report.units_removed > 0
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(32, 3, 16, 16, generator=generator) for _ in range(2)]
    data = [(batch, _run(pruned, batch).argmax(-1)) for batch in inputs]  # the pruned model's own labels

    def agreement(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float((outputs.argmax(-1) == targets).float().mean())

    budget = 0.05
    plan = exfx.calibrate(pruned, (x,), data, agreement, budget, max_evals=2)
    compiled = exfx.analyse(pruned, (x,)).compile(plan)
    score = sum(agreement(_run(compiled, b), t) * len(t) for b, t in data) / sum(len(t) for _, t in data)
    assert 1.0 - score <= budget + 1e-9
    assert plan.meta["calibration"]["reduction"] >= 0.0


def test_finetune_lowers_the_loss_keeps_masks_and_restores_the_module() -> None:
    from exfx.snp.finetune import finetune

    torch.manual_seed(0)
    model, x = VGGish(width=8).eval(), torch.randn(4, 3, 16, 16)
    sparse, _ = prune(model, (x,), None, method="magnitude", ratio=0.5)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(2)]
    frozen = {name: p.requires_grad for name, p in sparse.named_parameters()}
    result = finetune(sparse, data, steps=30, lr=0.05, keep_zeros=True)
    assert result.steps == 30 and result.examples == 30 * 16
    assert result.final_loss < result.first_loss
    zeros = sum(int((w == 0).sum()) for w in _weight_tensors(sparse).values())
    assert zeros == round(0.5 * sum(w.numel() for w in _weight_tensors(sparse).values()))
    assert not sparse.training
    assert {name: p.requires_grad for name, p in sparse.named_parameters()} == frozen
    with pytest.raises(PruneError, match="steps=0"):
        finetune(sparse, data, steps=0)
    with pytest.raises(PruneError, match="optimiser='lbfgs'"):
        finetune(sparse, data, steps=1, optimiser="lbfgs")
