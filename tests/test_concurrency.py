"""Concurrent use: a compiled module and FLOP counting shared by 8 threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

import exfx

from models import ResNetish, VGGish

THREADS = 8


def test_compiled_module_from_8_threads_matches_sequential_calls():
    model = ResNetish(width=32).eval()
    gm = exfx.compile(model, (torch.randn(2, 3, 16, 16),), exfx.Config(rule="ztest", alpha=0.2, samples=(8, 16)))
    inputs = [torch.randn(1 + i % 3, 3, 16, 16) for i in range(4 * THREADS)]
    with torch.no_grad():
        sequential = [gm(x) for x in inputs]
        with ThreadPoolExecutor(THREADS) as pool:
            concurrent = list(pool.map(lambda x: gm(x), inputs))
    for a, b in zip(sequential, concurrent):
        assert torch.equal(a, b)


def test_flop_counts_are_per_call_under_threads():
    model = VGGish(width=16).eval()
    gm = exfx.compile(model, (torch.randn(2, 3, 16, 16),), exfx.Config(samples=16))
    inputs = [torch.randn(1 + i % 4, 3, 16, 16) * (1 + i) for i in range(2 * THREADS)]
    sequential = [exfx.count_flops(gm, x).to_dict() for x in inputs]
    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(lambda x: exfx.count_flops(gm, x).to_dict(), inputs))
    assert concurrent == sequential
    assert len({d["executed"] for d in sequential}) > 1  # the inputs really differ in what they prune


def test_compiling_from_8_threads_gives_identical_graphs():
    from exfx.ci.graphdiff import graph_text

    model, x = VGGish(width=16).eval(), torch.randn(2, 3, 16, 16)
    with ThreadPoolExecutor(THREADS) as pool:
        texts = set(pool.map(lambda _: graph_text(exfx.compile(model, (x,), exfx.Config(samples=16))), range(THREADS)))
    assert len(texts) == 1
