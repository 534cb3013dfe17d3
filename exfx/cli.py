"""The ``exfx`` command.

Usage::

    exfx explain [SPEC] [--rule ztest --alpha 0.05 --samples 16,32] [--plan plan.json] [--json]
    exfx flops   [SPEC] [config options]        # dense vs executed FLOPs on the example inputs
    exfx plan    [SPEC] [--plan partial.json] -o plan.json   # every site the options' settings (or the plan's)
    exfx graph   [SPEC] [--plan plan.json]      # the rewritten graph as stable text
    exfx diff    [SPEC]                         # unified diff original -> rewritten, one line per site
    exfx check   SPEC GOLDEN [--update] [--structural]   # exit 0 if the graph matches, 1 with a diff if not
    exfx demo    [--out exfx-demo] [--budget 0.01]       # calibrate + compile a trained CNN on real images

``--format markdown`` (graph, diff, check) prints a block suited to a pull-request comment.

``SPEC`` is ``module:factory``, a zero-argument callable returning
``(model, example_inputs)``; the default is the built-in ``exfx.examples:small_cnn``.
Exit status: 0 on success, 1 when ``check`` finds a mismatch, 2 on bad usage, an
exfx error or a file that cannot be written (the message says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

import exfx
from exfx.ci import graphdiff
from exfx.capture import capture
from exfx.errors import ExfxError
from exfx.meta import REPORT_KEY
from exfx.passes.annotate_pass import LOWERINGS
from exfx.ci.graphdiff import UPDATE_ENV
from exfx.report import Report
from exfx.tune.evaluation import budget_error, check_budget
from exfx.ci.spec import DEFAULT_SPEC, load_spec

#: The options that make a Config (every command but demo takes them).
CONFIG_OPTIONS = ("rule", "threshold", "alpha", "samples")

logger = logging.getLogger(__name__)

__all__ = ["main", "UPDATE_ENV"]


def _samples(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--samples takes comma-separated ints such as 16,32, got {text!r}") from None


def _budget(text: str) -> float:
    try:
        return check_budget(float(text))
    except ValueError:  # not a number, or out of range
        raise argparse.ArgumentTypeError(budget_error(text, "--budget")) from None


def _config(args: argparse.Namespace) -> exfx.Config:
    rule = args.rule or exfx.Config().rule
    if args.alpha is not None and rule != "ztest":
        raise ExfxError(f"--alpha is the z-test's level, but the rule is {rule}: add --rule ztest, or drop --alpha")
    if args.threshold is not None and rule != "threshold":
        raise ExfxError(f"--threshold is the threshold rule's, but the rule is {rule}: drop --threshold, or use "
                        "--rule threshold")
    fields: dict[str, Any] = {}
    for name in CONFIG_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    try:
        return exfx.Config(**fields)
    except ValueError as err:
        raise ExfxError(f"bad option: {err}") from None


def _options_given(args: argparse.Namespace) -> list[str]:
    """The rule options on the command line, as ``--name``."""
    return [f"--{name}" for name in CONFIG_OPTIONS if getattr(args, name) is not None]


def _check_options_with_plan(args: argparse.Namespace, report: Report, plan: exfx.Plan | None) -> None:
    """Rule options next to ``--plan`` set only the sites the plan leaves out: say so, or refuse if there are none."""
    given = _options_given(args)
    if plan is None or not given:
        return
    unset = [s.name for s in report.sites if s.structurally_eligible and s.name not in plan.sites]
    options = ", ".join(given)
    if not unset:
        raise ExfxError(f"{options} would change nothing: the plan {args.plan} sets every site "
                        f"({', '.join(sorted(plan.sites))}). Edit the plan, or drop --plan to use {options}.")
    print(f"exfx: note: {options} apply only to the sites the plan {args.plan} does not set: {', '.join(unset)}",
          file=sys.stderr)


#: Commands whose output is graph text compared across machines: they lower to the reference ops by default.
GOLDEN_COMMANDS = ("graph", "diff", "check")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exfx", description="ExPrune early negative prediction for torch.fx")
    parser.add_argument("--version", action="version", version=f"exfx {exfx.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "explain": "print every ReLU's verdict: site or not, group, fan-in, reason",
        "flops": "compile and count dense vs executed FLOPs on the example inputs",
        "plan": "write a plan (JSON) giving every eligible site the configured settings",
        "graph": "print the rewritten graph as stable text (for golden files)",
        "diff": "show a unified diff between the original and the rewritten graph",
        "check": "compare the rewritten graph with a golden file: exit 0 if equal, 1 with a diff if not",
    }
    demo = sub.add_parser("demo", help="calibrate and compile the bundled trained CNN on 1,000 Fashion-MNIST images",
                          description="calibrate and compile the bundled trained CNN on 1,000 Fashion-MNIST images")
    demo.add_argument("--out", default="exfx-demo", help="output folder (default exfx-demo)")
    demo.add_argument("--budget", type=_budget, default=0.01, help="allowed accuracy drop (0.01 = 1 point)")
    for name, help_text in commands.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == "check":
            cmd.add_argument("spec", help="module:factory returning (model, example_inputs)")
            cmd.add_argument("golden", help="the golden graph text file")
            cmd.add_argument("--update", action="store_true",
                             help=f"rewrite the golden file (also when {UPDATE_ENV}=1)")
            cmd.add_argument("--structural", action="store_true",
                             help="ignore node names; compare the op graphs (networkx isomorphism)")
        else:
            cmd.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                             help=f"module:factory returning (model, example_inputs); default {DEFAULT_SPEC}")
        cmd.add_argument("--rule", choices=exfx.ops.RULES)
        cmd.add_argument("--threshold", type=float, help="threshold rule: prune when the mean term < T")
        cmd.add_argument("--alpha", type=float, help="z-test level in [0, 0.5]")
        cmd.add_argument("--samples", type=_samples, help="checkpoint schedule, e.g. 32 or 16,32,64")
        cmd.add_argument("--plan", help="a plan JSON file with per-site parameters")
        golden = name in GOLDEN_COMMANDS
        cmd.add_argument("--lowering", choices=LOWERINGS, default="reference" if golden else None,
                         help=("reference ops (default here: the graph text must not depend on this machine's "
                               "timings)" if golden else "native: the fastest correct form measured here (default, or "
                               "$EXFX_LOWERING); reference: the reference ops, for FLOP studies"))
        if name == "plan":
            cmd.add_argument("-o", "--output", required=True, help="where to write the plan")
        elif name in ("explain", "flops"):
            cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            cmd.add_argument("--format", choices=("text", "markdown"), default="text")
    return parser


def _fenced(body: str, lang: str = "") -> str:
    return f"```{lang}\n{body.rstrip()}\n```"


def _graph_commands(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, compiled: Any) -> int:
    text = graphdiff.graph_text(compiled)
    markdown = args.format == "markdown"
    if args.command == "graph":
        print(_fenced(text, "text") if markdown else text, end="" if not markdown else "\n")
        return 0
    if args.command == "diff":
        original = graphdiff.graph_text(capture(model, inputs))
        diff = graphdiff.unified_diff(original, text)
        summary = graphdiff.site_summary(compiled.meta.get(REPORT_KEY))
        if markdown:
            print(f"### exfx: {args.spec}\n")
            print("\n".join(f"- `{line}`" for line in summary) + "\n")
            print(_fenced(diff, "diff"))
        else:
            print("\n".join(summary))
            print(diff, end="")
        return 0
    update = args.update or graphdiff.update_requested()
    result = graphdiff.check(text, args.golden, update=update, structural=args.structural)
    if result.updated:
        print(f"updated {args.golden}")
        return 0
    if result.ok:
        print(f"{args.golden}: graph matches" + (" (structural)" if args.structural else ""))
        return 0
    if markdown:
        print(f"### exfx check failed: `{args.spec}` differs from `{args.golden}`\n")
        print(_fenced(result.diff, "diff"))
    else:
        print(f"{args.golden}: graph differs (run with --update to accept)")
        print(result.diff, end="")
    return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from exfx.demo import run_demo

        print(run_demo(args.out, args.budget)[1])
        return 0
    model, inputs = load_spec(args.spec)
    config = _config(args)
    plan = exfx.Plan.load(args.plan) if args.plan else None
    if args.command in ("explain", "plan"):
        report = exfx.explain(model, inputs, config, plan=plan, lowering=args.lowering)
        _check_options_with_plan(args, report, plan)
        if args.command == "explain":
            print(json.dumps(report.to_dict(), indent=2) if args.json else report)
        else:
            _write_plan(args, report, config, plan)
        return 0
    compiled = exfx.compile(model, inputs, config, plan, lowering=args.lowering)
    _check_options_with_plan(args, compiled.meta[REPORT_KEY], plan)
    if args.command == "flops":
        flops = exfx.count_flops(compiled, *inputs)
        print(json.dumps(flops.to_dict(), indent=2) if args.json else flops)
        return 0
    return _graph_commands(args, model, inputs, compiled)


def _write_plan(args: argparse.Namespace, report: Report, config: exfx.Config, plan: exfx.Plan | None) -> None:
    """``exfx plan``: every eligible site the config's settings; a given plan's sites keep their own."""
    new_plan = exfx.Plan.from_report(report, config)
    if plan is not None:
        filled = [name for name in new_plan.sites if name not in plan.sites]
        if filled and not _options_given(args):
            print(f"exfx: note: the plan {args.plan} does not set {', '.join(filled)}: written with the "
                  f"default settings ({config.rule}, samples {list(config.samples)})", file=sys.stderr)
        new_plan = exfx.Plan(sites={**new_plan.sites, **plan.sites}, signatures=new_plan.signatures,
                             meta=dict(plan.meta), keep=dict(plan.keep))
    new_plan.save(args.output)
    print(f"wrote a plan for {len(new_plan.sites)} sites to {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return _run(args)
    except (ExfxError, OSError) as err:  # OSError: an output file or folder that cannot be written
        print(f"exfx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
