"""The reproduction table's protocol on a tiny model: plans are selected on the validation split only."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import exfx
from benchmarks import exprune_table
from benchmarks.exprune_table import Benchmark
from exfx.tune.evaluation import evaluate


def _split(generator: torch.Generator, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(64, 8, generator=generator), torch.randint(0, 4, (64,), generator=generator))
            for _ in range(batches)]


@pytest.fixture
def bench() -> Benchmark:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4)).eval()
    generator = torch.Generator().manual_seed(1)
    val, test = _split(generator, 3), _split(generator, 3)
    return Benchmark("tiny", model, (val[0][0][:2],), val, test, exprune_table.accuracy, "accuracy")


def test_selection_sees_only_the_validation_split(bench: Benchmark, monkeypatch: pytest.MonkeyPatch) -> None:
    selected_on: list[tuple[str, Any]] = []
    calibrate, random_search = exfx.calibrate, exfx.random_search

    def spy(name: str, function: Any) -> Any:
        def wrapped(model: Any, example_inputs: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
            selected_on.append((name, data))
            return function(model, example_inputs, data, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(exfx, "calibrate", spy("calibrate", calibrate))
    monkeypatch.setattr(exfx, "random_search", spy("random_search", random_search))
    record = exprune_table.measure(bench, search_factor=2)

    assert [name for name, _ in selected_on] == ["calibrate", "calibrate", "random_search"]
    assert all(data is bench.val for _, data in selected_on)
    # The reported figures are the chosen plans run on the test split.
    for key in ("0p1", "1p0"):
        plan = exfx.Plan.from_dict(record[f"plan_{key}"])
        on_test = evaluate(exfx.compile(bench.model, bench.example_inputs, plan=plan), bench.test, bench.metric)
        assert record[f"reduction_{key}"] == pytest.approx(on_test.reduction)
        assert record[f"drop_{key}"] == pytest.approx(record["baseline"] - on_test.score)
    assert record["search_evals"] == 2 * record["calib_evals"] + 1
    assert record["confidence"] == exprune_table.CONFIDENCE
