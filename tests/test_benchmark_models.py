"""The graph and language benchmarks' building blocks, on synthetic data (no Debian package, no training).

Skipped where PyTorch Geometric or transformers is missing (``pip install ".[thirdparty]"``).
"""

from __future__ import annotations

import math

import pytest
import torch

import exfx

from helpers import assert_enp_invariant


def _graphs(sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A disjoint union of random graphs with the given node counts: (x, edge_index, batch)."""
    generator = torch.Generator().manual_seed(seed)
    xs, edges, batch, offset = [], [], [], 0
    for graph, n in enumerate(sizes):
        xs.append(torch.rand(n, 3, generator=generator))
        src = torch.randint(0, n, (4 * n,), generator=generator)
        dst = torch.randint(0, n, (4 * n,), generator=generator)
        edges.append(torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]) + offset)
        batch.append(torch.full((n,), graph))
        offset += n
    return torch.cat(xs), torch.cat(edges, 1), torch.cat(batch)


@pytest.fixture(scope="module")
def gcn():
    pytest.importorskip("torch_geometric")
    from benchmarks.gcn import GCN

    from models import randomise_bn

    torch.manual_seed(0)
    model = GCN(hidden=64, layers=3, aggregation="gather")
    randomise_bn(model)
    return model.eval()


def test_gcn_sparse_and_gather_aggregations_agree(gcn):
    from benchmarks.gcn import GCN

    sparse = GCN(hidden=64, layers=3, aggregation="sparse")
    sparse.load_state_dict(gcn.state_dict())
    inputs = _graphs([7, 12, 5], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(*inputs), gcn(*inputs), rtol=1e-4, atol=1e-5)


def test_gcn_has_a_site_per_layer_and_runs_on_other_batch_shapes(gcn):
    example = _graphs([9, 11], seed=2)
    report = exfx.explain(gcn, example)
    assert sorted(s.name for s in report.sites if s.eligible) == [f"layers.{i}.linear" for i in range(3)]
    never = exfx.compile(gcn, example, exfx.Config(threshold=-math.inf, samples=16))
    pruning = exfx.compile(gcn, example, exfx.Config(threshold=0.0, samples=16))
    for sizes, seed in (([9, 11], 2), ([4, 20, 8, 6], 3), ([30], 4)):
        inputs = _graphs(sizes, seed)
        with torch.no_grad():
            out = never(*inputs)
            assert out.shape == (len(sizes), 10)
            torch.testing.assert_close(out, gcn(*inputs), rtol=1e-4, atol=1e-5)
        assert_enp_invariant(pruning, *inputs, rtol=1e-4, atol=1e-5)


def test_gcn_flops_count_the_linear_layers_only(gcn):
    x, edge_index, batch = _graphs([10, 10], seed=5)
    flops = exfx.count_flops(exfx.compile(gcn, (x, edge_index, batch), exfx.Config(threshold=-math.inf)),
                             x, edge_index, batch)
    nodes, hidden = x.shape[0], 64
    linear = 2 * nodes * (3 * hidden + 3 * hidden * hidden) + 2 * 2 * hidden * 10
    assert flops.dense == linear


def test_text_split_deals_whole_files_deterministically(tmp_path):
    from benchmarks import text_data

    for i in range(40):
        (tmp_path / f"doc{i:02d}.rst.txt").write_bytes(bytes([65 + i % 26]) * (100 + 10 * i))
    first = text_data.split_files(tmp_path)
    text_data.split_files.cache_clear()
    second = text_data.split_files(tmp_path)
    assert first == second
    files = [path for split in text_data.SPLITS for path in first[split]]
    assert sorted(files) == sorted(tmp_path.glob("*.rst.txt")) and len(set(files)) == 40
    assert all(first[split] for split in text_data.SPLITS)


def _tiny_bench(name: str, model: torch.nn.Module, batches: list) -> "Benchmark":
    from benchmarks.exprune_table import Benchmark, accuracy

    return Benchmark(name, model.eval(), (batches[0][0][:2],), batches, batches, accuracy, "accuracy")


def test_importance_order_keeps_the_function_and_puts_the_heaviest_units_first():
    from benchmarks.models import VGG11
    from benchmarks.predictor_frontier import importance_ordered

    from models import randomise_bn

    torch.manual_seed(0)
    model = randomise_bn(VGG11(in_channels=1, width=2)).eval()
    batches = [(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))) for _ in range(8)]
    ordered = importance_ordered(_tiny_bench("vgg11", model, batches))
    with torch.no_grad():
        torch.testing.assert_close(ordered(batches[0][0]), model(batches[0][0]), rtol=1e-4, atol=1e-5)
    convs = [m for m in ordered.features if isinstance(m, torch.nn.Conv2d)]
    second = convs[1].weight.detach()
    assert not torch.equal(second, [m for m in model.features if isinstance(m, torch.nn.Conv2d)][1].weight)
    assert importance_ordered(_tiny_bench("resnet18", model, batches)) is None


def test_channel_of_matches_unravel_index():
    from benchmarks.predictor_frontier import channel_of

    flat = torch.arange(2 * 3 * 4 * 5)
    assert torch.equal(channel_of(flat, (2, 3, 4, 5), linear=False), torch.unravel_index(flat, (2, 3, 4, 5))[1])
    assert torch.equal(channel_of(torch.arange(24), (2, 3, 4), linear=True), torch.arange(24) % 4)
