"""The ``exfx`` command.

Usage::

    exfx explain [SPEC] [--rule ztest --alpha 0.05 --samples 16,32] [--plan plan.json] [--json]
    exfx flops   [SPEC] [config options]        # dense vs executed FLOPs on the example inputs
    exfx plan    [SPEC] -o plan.json            # write a plan giving every site the config's settings

``SPEC`` is ``module:factory``, a zero-argument callable returning
``(model, example_inputs)``; the default is the built-in ``exfx.examples:small_cnn``.
Exit status: 0 on success, 2 on bad usage or an exfx error (the message says why).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

import exfx
from exfx.capture import normalise_inputs
from exfx.errors import ExfxError

logger = logging.getLogger(__name__)

__all__ = ["main", "load_spec"]

DEFAULT_SPEC = "exfx.examples:small_cnn"


def load_spec(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Import ``module:factory`` and call it; returns ``(model, example_inputs)``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ExfxError(f"SPEC must look like 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ExfxError(f"cannot import {module_name!r} from SPEC {spec!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExfxError(f"{module_name!r} has no callable {attr!r} (SPEC {spec!r})")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ExfxError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, normalise_inputs(inputs)


def _samples(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--samples takes comma-separated ints such as 16,32, got {text!r}") from None


def _config(args: argparse.Namespace) -> exfx.Config:
    fields: dict[str, Any] = {}
    for name in ("rule", "threshold", "alpha", "samples"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    try:
        return exfx.Config(**fields)
    except ValueError as err:
        raise ExfxError(f"bad option: {err}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exfx", description="ExPrune early negative prediction for torch.fx")
    parser.add_argument("--version", action="version", version=f"exfx {exfx.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "explain": "print every ReLU's verdict: site or not, group, fan-in, reason",
        "flops": "compile and count dense vs executed FLOPs on the example inputs",
        "plan": "write a plan (JSON) giving every eligible site the configured settings",
    }
    for name, help_text in commands.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                         help=f"module:factory returning (model, example_inputs); default {DEFAULT_SPEC}")
        cmd.add_argument("--rule", choices=exfx.ops.RULES)
        cmd.add_argument("--threshold", type=float, help="threshold rule: prune when the mean term < T")
        cmd.add_argument("--alpha", type=float, help="z-test level in [0, 0.5]")
        cmd.add_argument("--samples", type=_samples, help="checkpoint schedule, e.g. 32 or 16,32,64")
        cmd.add_argument("--plan", help="a plan JSON file with per-site parameters")
        if name == "plan":
            cmd.add_argument("-o", "--output", required=True, help="where to write the plan")
        else:
            cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _run(args: argparse.Namespace) -> int:
    model, inputs = load_spec(args.spec)
    config = _config(args)
    plan = exfx.Plan.load(args.plan) if args.plan else None
    if args.command == "explain":
        report = exfx.explain(model, inputs, config, plan=plan)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    elif args.command == "flops":
        compiled = exfx.compile(model, inputs, config, plan)
        flops = exfx.count_flops(compiled, *inputs)
        print(json.dumps(flops.to_dict(), indent=2) if args.json else flops)
    else:
        report = exfx.explain(model, inputs, config, plan=plan)
        new_plan = plan or exfx.Plan.from_report(report, config)
        new_plan.save(args.output)
        print(f"wrote a plan for {len(new_plan.sites)} sites to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return _run(args)
    except ExfxError as err:
        print(f"exfx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
