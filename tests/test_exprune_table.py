"""The reproduction table's protocol on a tiny model: plans are selected on the validation split only.

``benchmarks/exprune_table.py`` measures in a subprocess (:func:`helpers.run_benchmark_code`), with
``exfx.calibrate`` and ``exfx.random_search`` wrapped to note which split each search was given.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_benchmark_code

#: Measures a tiny MLP; prints JSON: each search and whether it saw the validation split, the record (less its
#: plans), the chosen plans' (reduction, score) on the test split, and the table's confidence.
MEASURE = """
import json

import torch
from torch import nn

import exfx
from benchmarks import exprune_table
from exfx.tune.evaluation import evaluate


def split(generator, batches):
    return [(torch.randn(64, 8, generator=generator), torch.randint(0, 4, (64,), generator=generator))
            for _ in range(batches)]


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4)).eval()
generator = torch.Generator().manual_seed(1)
val, test = split(generator, 3), split(generator, 3)
bench = exprune_table.Benchmark("tiny", model, (val[0][0][:2],), val, test, exprune_table.accuracy, "accuracy")
selected_on = []


def spy(name, function):
    def wrapped(model, example_inputs, data, *args, **kwargs):
        selected_on.append((name, data is bench.val))
        return function(model, example_inputs, data, *args, **kwargs)
    return wrapped


exfx.calibrate, exfx.random_search = spy("calibrate", exfx.calibrate), spy("random_search", exfx.random_search)
record = exprune_table.measure(bench, search_factor=2)
on_test = {}
for key in ("0p1", "1p0"):
    plan = exfx.Plan.from_dict(record[f"plan_{key}"])
    result = evaluate(exfx.compile(bench.model, bench.example_inputs, plan=plan), bench.test, bench.metric)
    on_test[key] = (result.reduction, result.score)
print(json.dumps({"selected_on": selected_on, "on_test": on_test, "confidence": exprune_table.CONFIDENCE,
                  "record": {k: v for k, v in record.items() if not k.startswith("plan_")}}))
"""


def test_selection_sees_only_the_validation_split() -> None:
    out = json.loads(run_benchmark_code(MEASURE))
    record = out["record"]

    assert [name for name, _ in out["selected_on"]] == ["calibrate", "calibrate", "random_search"]
    assert all(on_val for _, on_val in out["selected_on"])
    # The reported figures are the chosen plans run on the test split.
    for key, (reduction, score) in out["on_test"].items():
        assert record[f"reduction_{key}"] == pytest.approx(reduction)
        assert record[f"drop_{key}"] == pytest.approx(record["baseline"] - score)
    assert record["search_evals"] == 2 * record["calib_evals"] + 1
    assert record["confidence"] == out["confidence"]
