"""`exfx demo`: runs from the package alone and writes its report and files."""

from __future__ import annotations

import json

import pytest
import torch

from exfx.cli import main
from exfx.demo import load_demo_images, load_demo_model


def test_bundled_model_and_images_are_real():
    model = load_demo_model()
    x, y = load_demo_images()
    assert x.shape == (1000, 1, 28, 28) and y.shape == (1000,)
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.8  # a trained network, not a random one (random is about 0.1)


@pytest.mark.slow  # calibrates and evaluates the demo CNN on 1,000 images (about a minute)
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--budget", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "SmallCNN: 3 of 4 ReLUs are ENP sites" in text
    assert "reported on images 500-999" in text
    assert "latency   dense" in text and "per batch of 1 " in text and "per batch of 100 " in text
    assert "native: " in text  # what the default lowering runs, one line
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["reduction"] <= summary["oracle_reduction"] + 0.05
    assert summary["calibration"]["baseline"] - summary["calibration"]["score"] <= 0.01 + 1e-9
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "exfx.partial_sum" in (out / "graph_diff.txt").read_text()
    assert json.loads((out / "plan.json").read_text())["sites"]
