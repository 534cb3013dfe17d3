"""torch.export round-trip of an exfx-compiled module: export, save, load in a fresh process, run."""

from __future__ import annotations

import subprocess
import sys

import torch

import exfx

from models import ResNetish, VGGish


def _exported(model, x, config):
    gm = exfx.compile(model, (x,), config)
    return gm, torch.export.export(gm, (x,))


def test_export_keeps_exfx_ops_and_results():
    torch.manual_seed(0)
    model, x = VGGish(width=16).eval(), torch.randn(2, 3, 16, 16)
    gm, program = _exported(model, x, exfx.Config(rule="ztest", alpha=0.2, samples=(8, 16)))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"exfx.partial_sum.default", "exfx.early_exit.default", "exfx.complete.default"} <= targets
    torch.testing.assert_close(program.module()(x), gm(x))


def test_export_save_and_load_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model, x = ResNetish(width=32).eval(), torch.randn(2, 3, 16, 16)
    gm, program = _exported(model, x, exfx.Config(threshold=0.0, samples=16))
    path, inputs, expected = tmp_path / "model.pt2", tmp_path / "x.pt", tmp_path / "y.pt"
    torch.export.save(program, path)
    torch.save(x, inputs)
    torch.save(gm(x), expected)
    code = (f"import torch, exfx\n"
            f"program = torch.export.load({str(path)!r})\n"
            f"y = program.module()(torch.load({str(inputs)!r}))\n"
            f"assert torch.equal(y, torch.load({str(expected)!r})), (y - torch.load({str(expected)!r})).abs().max()\n"
            f"print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_loading_without_exfx_fails_clearly(tmp_path):
    """The saved program needs the exfx:: operators: `import exfx` registers them."""
    torch.manual_seed(0)
    model, x = VGGish(width=16).eval(), torch.randn(2, 3, 16, 16)
    _, program = _exported(model, x, exfx.Config(samples=16))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    code = f"import torch\ntorch.export.load({str(path)!r}).module()(torch.randn(2, 3, 16, 16))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "exfx" in result.stderr
