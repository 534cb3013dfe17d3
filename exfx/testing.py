"""Test helpers for users' own suites.

:func:`assert_graph_matches` guards the exfx rewrite of a model against
unintended change::

    def test_model_graph():
        exfx.testing.assert_graph_matches("mypkg.models:small", "tests/golden/small.txt")

Set ``EXFX_UPDATE_GOLDEN=1`` (or pass ``update=True``) to accept the new graph.
"""

from __future__ import annotations

import os
from typing import Any

import torch.fx as fx

from exfx.ci import graphdiff
from exfx.api import compile as exfx_compile
from exfx.ci.graphdiff import UPDATE_ENV
from exfx.config import Config, Plan
from exfx.ci.spec import load_spec

__all__ = ["assert_graph_matches"]


def assert_graph_matches(gm_or_spec: fx.GraphModule | str, golden_path: str | os.PathLike[str], *,
                         config: Config | None = None, plan: Plan | None = None, update: bool | None = None,
                         structural: bool = False) -> None:
    """Assert that the rewritten graph equals the golden file (``AssertionError`` with the diff if not).

    ``gm_or_spec`` is an exfx-compiled GraphModule or a ``module:factory`` spec
    (compiled here with ``config``/``plan`` to the reference ops: a golden graph must not
    depend on which forms this machine's timings pick).
    """
    if isinstance(gm_or_spec, str):
        model, inputs = load_spec(gm_or_spec)
        gm: Any = exfx_compile(model, inputs, config, plan, lowering="reference")
    else:
        gm = gm_or_spec
    if update is None:
        update = graphdiff.update_requested()
    result = graphdiff.check(graphdiff.graph_text(gm), golden_path, update=update, structural=structural)
    if not result.ok:
        raise AssertionError(f"exfx graph differs from {os.fspath(golden_path)} "
                             f"(set {UPDATE_ENV}=1 to accept):\n{result.diff}")
