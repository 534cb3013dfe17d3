"""Test helpers: run a compiled module and look at every ENP site from the inside.

:class:`SiteRecorder` runs an exfx-compiled ``GraphModule`` with a
``torch.fx.Interpreter``. At every ``exfx::complete`` node it recomputes the
site's dense pre-activation from the *same* inputs with plain ``F.linear`` /
``F.conv*d`` (an oracle that does not use the exfx ops), and it records the
output of the site's ReLU. :func:`assert_enp_invariant` then checks the ENP
contract at every site: a kept neuron equals the dense value (up to float
reassociation) and a pruned neuron is exactly 0 after its ReLU.

:func:`run_benchmark_code` runs what a test checks of a ``benchmarks/`` script in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from exfx.analysis.opsets import activation_ceiling, is_site_activation
from exfx.cost.model import op_arguments
from exfx.meta import site_of

RTOL = 1e-5
ATOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def dense_preactivation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None, stride: Any = (), padding: Any = (), dilation: Any = (),
                        groups: int = 1) -> torch.Tensor:
    """``producer(x) + bias + residual`` with plain torch ops."""
    if weight.dim() == 2:
        out = F.linear(x, weight)
    else:
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        out = conv(x, weight, None, list(stride), list(padding), list(dilation), groups)
    if bias is not None:
        out = out + (bias if weight.dim() == 2 else bias.reshape(-1, *([1] * (weight.dim() - 2))))
    if residual is not None:
        out = out + residual
    return out


@dataclass
class SiteRecord:
    pre: torch.Tensor  # what exfx::complete returned
    dense: torch.Tensor  # oracle pre-activation from the same inputs
    active: torch.Tensor  # neurons kept by the last early-exit test
    post: torch.Tensor | None = None  # output of the site's ReLU
    ceiling: float | None = None  # upper bound t of a capped-ReLU site (ReLU6: clamp(pre, 0, t)); None for ReLU

    @property
    def pruned(self) -> int:
        return int((~self.active).sum())


class SiteRecorder(fx.Interpreter):
    """Interpret a compiled GraphModule, recording every ENP site (see module docstring)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.records: dict[str, SiteRecord] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.exfx.complete.default:
            a = op_arguments(n.target, *self.fetch_args_kwargs_from_env(n))
            dense = dense_preactivation(a["x"], a["weight"], a["bias"], a["residual"], a["stride"], a["padding"],
                                        a["dilation"], a["groups"])
            self.records[a["site"]] = SiteRecord(pre=result, dense=dense, active=a["active"])
        elif is_site_activation(n):
            site = site_of(n)
            if site in self.records and self.records[site].post is None and n.args[0].target is (
                    torch.ops.exfx.complete.default):
                self.records[site].post = result
                self.records[site].ceiling = activation_ceiling(n)
        return result


def record_sites(gm: fx.GraphModule, *inputs: Any) -> dict[str, SiteRecord]:
    with torch.no_grad():
        recorder = SiteRecorder(gm)
        recorder.run(*inputs)
    return recorder.records


def assert_enp_invariant(gm: fx.GraphModule, *inputs: Any, rtol: float = RTOL,
                         atol: float = ATOL) -> dict[str, SiteRecord]:
    """Every post-ReLU value at every site is the dense value (kept) or exactly 0 (pruned)."""
    records = record_sites(gm, *inputs)
    assert records, "the compiled module has no ENP site"
    for site, rec in records.items():
        assert rec.post is not None, f"site {site}: its ReLU was not found after exfx::complete"
        dense_post = torch.relu(rec.dense) if rec.ceiling is None else torch.clamp(rec.dense, 0.0, rec.ceiling)
        # Pruned neurons: exactly 0 before and after the ReLU.
        assert torch.equal(rec.pre[~rec.active], torch.zeros_like(rec.pre[~rec.active])), site
        assert torch.equal(rec.post[~rec.active], torch.zeros_like(rec.post[~rec.active])), site
        # Kept neurons: the dense pre-activation, up to reassociation.
        torch.testing.assert_close(rec.pre[rec.active], rec.dense[rec.active], rtol=rtol, atol=atol,
                                   msg=lambda m, s=site: f"site {s}: kept neurons differ: {m}")
        # The contract as the user sees it: original value or exactly 0.
        close = torch.isclose(rec.post, dense_post, rtol=rtol, atol=atol)
        assert bool((close | (rec.post == 0)).all()), f"site {site}: a value is neither original nor 0"
    return records


def enp_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "exfx"]


def site_relus(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """ReLU nodes labelled with a site name by the exchangeability pass."""
    return {site_of(n): n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.relu and site_of(n) is not None}


def run_benchmark_code(code: str, *args: str) -> str:
    """Run the Python source ``code`` (with ``args`` as ``sys.argv[1:]``) in a fresh interpreter, with the
    repository root on ``sys.path``; return what it printed, or fail with its traceback.

    The tests never import ``benchmarks``: it is no part of the installed package, and a test run must not depend
    on the scripts' imports (their data sets and extras). What a test checks of a script runs here instead.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the benchmark code failed:\n{done.stderr}"
    return done.stdout
