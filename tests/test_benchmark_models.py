"""The graph and language benchmarks' building blocks, on synthetic data (no Debian package, no training).

The benchmark GCN (:class:`exfx.examples.GCN`) is skipped where PyTorch Geometric is missing (``pip install
".[thirdparty]"``). What is the scripts' own (the text split, the predictor frontier's helpers) runs in a
subprocess (:func:`helpers.run_benchmark_code`).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import exfx
from exfx.examples import GCN

from helpers import assert_enp_invariant, run_benchmark_code


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
    from models import randomise_bn

    torch.manual_seed(0)
    model = GCN(hidden=64, layers=3, aggregation="gather")
    randomise_bn(model)
    return model.eval()


def test_gcn_sparse_and_gather_aggregations_agree(gcn):
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


#: Splits the files of the folder ``sys.argv[1]`` twice; prints JSON: whether both splits agree, and the first's names.
TEXT_SPLIT = """
import json
import sys
from pathlib import Path

from benchmarks import text_data

first = text_data.split_files(Path(sys.argv[1]))
text_data.split_files.cache_clear()
second = text_data.split_files(Path(sys.argv[1]))
print(json.dumps({"same": first == second, "splits": {split: [path.name for path in first[split]]
                                                      for split in text_data.SPLITS}}))
"""


def test_text_split_deals_whole_files_deterministically(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.rst.txt").write_bytes(bytes([65 + i % 26]) * (100 + 10 * i))
    out = json.loads(run_benchmark_code(TEXT_SPLIT, str(tmp_path)))
    assert out["same"]
    files = [name for names in out["splits"].values() for name in names]
    assert sorted(files) == sorted(path.name for path in tmp_path.glob("*.rst.txt")) and len(set(files)) == 40
    assert list(out["splits"]) == ["train", "val", "test"] and all(out["splits"].values())


#: A random VGG-11 ordered by importance: the same function, its second conv's filters moved; ResNet-18 is not.
IMPORTANCE_ORDER = """
import torch

from benchmarks.exprune_table import Benchmark, accuracy
from benchmarks.predictor_frontier import importance_ordered
from exfx.examples import VGG11
from tests.models import randomise_bn

torch.manual_seed(0)
model = randomise_bn(VGG11(in_channels=1, width=2)).eval()
batches = [(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))) for _ in range(8)]


def bench(name):
    return Benchmark(name, model, (batches[0][0][:2],), batches, batches, accuracy, "accuracy")


ordered = importance_ordered(bench("vgg11"))
with torch.no_grad():
    torch.testing.assert_close(ordered(batches[0][0]), model(batches[0][0]), rtol=1e-4, atol=1e-5)
ordered_convs, convs = ([m for m in net.features if isinstance(m, torch.nn.Conv2d)] for net in (ordered, model))
assert not torch.equal(ordered_convs[1].weight, convs[1].weight)
assert importance_ordered(bench("resnet18")) is None
"""


def test_importance_order_keeps_the_function_and_puts_the_heaviest_units_first():
    run_benchmark_code(IMPORTANCE_ORDER)


CHANNEL_OF = """
import torch

from benchmarks.predictor_frontier import channel_of

flat = torch.arange(2 * 3 * 4 * 5)
assert torch.equal(channel_of(flat, (2, 3, 4, 5), linear=False), torch.unravel_index(flat, (2, 3, 4, 5))[1])
assert torch.equal(channel_of(torch.arange(24), (2, 3, 4), linear=True), torch.arange(24) % 4)
"""


def test_channel_of_matches_unravel_index():
    run_benchmark_code(CHANNEL_OF)
