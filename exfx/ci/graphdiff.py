"""Stable graph text, diffs and golden checks, for CI.

:func:`graph_text` renders a GraphModule as text that is identical across runs and
processes: node names come from tracing (deterministic), targets are printed by
qualified name, parameters by name and shape, and there are no memory addresses,
file paths or stack traces. An exfx-compiled module's text opens with one line per
site (name, signature, group, rule and parameters), and its exfx nodes carry their
site and role.

:func:`check` compares a module with a golden file, either textually or
structurally (``structural=True``: node, module and parameter names are ignored
and the op graphs are compared with a ``networkx`` isomorphism over op/target
labels).

Example::

    >>> text = graph_text(exfx.compile(model, (x,)))
    >>> result = check(text, "tests/golden/small_cnn.txt")
    >>> result.ok, result.diff
"""

from __future__ import annotations

import difflib
import logging
import math
import operator
import os
import re
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from networkx.algorithms.isomorphism import categorical_multiedge_match, categorical_node_match

from exfx.errors import ExfxError
from exfx.meta import REPORT_KEY, rewrite_role
from exfx.report import Report

logger = logging.getLogger(__name__)

__all__ = ["graph_text", "site_summary", "unified_diff", "structural_graph", "check", "CheckResult",
           "FORMAT_VERSION", "UPDATE_ENV", "update_requested"]

#: 2: a ``call_module`` node's note holds the module's hyperparameters (``extra_repr``), so a changed
#: stride or kernel size of a leaf module shows in the diff (format 1 printed only its type).
FORMAT_VERSION = 2
_FORMAT_LINE = re.compile(r"^# exfx graph, format (?P<version>\d+)$")
#: Set to 1 to make ``exfx check`` and :func:`exfx.testing.assert_graph_matches` rewrite golden files.
UPDATE_ENV = "EXFX_UPDATE_GOLDEN"
#: How to accept the current graph, from the command line or from pytest (exfx.testing).
_RERECORD = f"(exfx check --update, or {UPDATE_ENV}=1)"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_NODE_LINE = re.compile(r"^(?P<name>\S+) = (?P<op>\w+) (?P<target>[^(\s]+)\((?P<args>.*)\)(?:\s+# (?P<note>.*))?$")
_RETURN_LINE = re.compile(r"^return (?P<args>.*)$")
_REF = re.compile(r"%([A-Za-z_][\w]*)")
_SITE_NOTE = re.compile(r"(?:^|; )site=(?P<site>\S+) role=")


def _format_arg(value: Any) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("-inf" if value < 0 else ("inf" if value > 0 else "nan"))
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_format_arg(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (set, frozenset)):  # sorted: a set's order changes with the process's hash seed
        return "{" + ", ".join(sorted(_format_arg(v) for v in value)) + "}" if value else "set()"
    if isinstance(value, torch.Tensor):
        return f"tensor({_tensor_type(value)})"
    return _ADDRESS.sub("", repr(value))


def _tensor_type(value: torch.Tensor) -> str:
    return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"


def _target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}<{type(gm.get_submodule(str(node.target))).__name__}>"
    if node.op == "call_method":
        return f".{node.target}"
    if node.op in ("get_attr", "placeholder"):
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    try:
        return fx.node._get_qualified_name(node.target)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - any unnamed callable
        return getattr(node.target, "__name__", type(node.target).__name__)


def _module_hyperparameters(gm: fx.GraphModule, node: fx.Node) -> str:
    """A leaf module's ``extra_repr()`` (``kernel_size=2, stride=2, ...``) on one line, addresses removed."""
    text = gm.get_submodule(str(node.target)).extra_repr()
    return _ADDRESS.sub("", " ".join(text.split()))


def _node_line(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "output":
        return f"return {_format_arg(node.args[0])}"
    args = [_format_arg(a) for a in node.args] + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
    notes = []
    if node.op == "get_attr":
        try:
            value = operator.attrgetter(str(node.target))(gm)
        except AttributeError:
            value = None
        if isinstance(value, torch.Tensor):
            notes.append(_tensor_type(value))
    if node.op == "call_module":
        hyperparameters = _module_hyperparameters(gm, node)
        if hyperparameters:
            notes.append(hyperparameters)
    role = rewrite_role(node)
    if role is not None:
        notes.append(f"site={role.site} role={role.role}")
    note = f"  # {'; '.join(notes)}" if notes else ""
    return f"{node.name} = {node.op} {_target_name(gm, node)}({', '.join(args)}){note}"


def site_summary(report: Report | None) -> list[str]:
    """One line per ReLU-family activation: the site, its shape signature, group, and parameters or reason; under
    the native lowering, the form it was lowered to (the graph text format is unchanged for the reference ops).

    Other activations (GELU, sigmoid, ...), never sites, are left out: the text shows what the rewrite did.
    """
    if report is None:
        return []
    lines = []
    for s in report.sites:
        if not s.relu_family:
            continue
        if s.eligible and s.params is not None:
            p = s.params
            threshold = _format_arg(float(p.threshold))
            rule = f"threshold T={threshold}" if p.rule == "threshold" else f"ztest alpha={p.alpha!r}"
            rule = "exact" if p.rule == "exact" else (f"{rule} + exact" if p.exact else rule)
            samples = ",".join(map(str, p.checkpoints))
            lowered = f"; lowered {s.lowering}" if s.lowering else ""  # the form (native lowering only)
            lines.append(f"site {s.name}: {s.signature}; group {s.group}; {rule}; samples {samples}{lowered}")
        else:
            detail = f"{s.signature}; " if s.signature else ""
            lines.append(f"site {s.name}: {detail}not rewritten: {s.reason}")
    return lines


def graph_text(gm: fx.GraphModule, report: Report | None = None) -> str:
    """Deterministic text of ``gm`` (with the site summary of ``report`` or of ``gm.meta``)."""
    report = report if report is not None else gm.meta.get(REPORT_KEY)
    lines = [f"# exfx graph, format {FORMAT_VERSION}"]
    lines += [f"# {line}" for line in site_summary(report)]
    lines += [_node_line(gm, node) for node in gm.graph.nodes]
    return "\n".join(lines) + "\n"


def unified_diff(before: str, after: str, before_name: str = "original", after_name: str = "exfx") -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), before_name, after_name))


def structural_graph(text: str) -> nx.MultiDiGraph:
    """Parse graph text into a MultiDiGraph labelled by op and target (node names dropped).

    Names of modules and parameters are dropped too: ``get_attr`` nodes are
    labelled by the tensor type instead of the attribute name, ``call_module``
    nodes by the module's type and hyperparameters (its note), and an exfx
    node's site-name argument is blanked. So renaming a module does not change
    the structure, but resizing it (or changing its stride) does. A
    line that is neither a comment, a node nor the return raises ``ValueError``.
    """
    graph = nx.MultiDiGraph()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _NODE_LINE.match(line)
        if match:
            name, op, target, args = match["name"], match["op"], match["target"], match["args"]
            note = match["note"] or ""
            if op == "placeholder":
                label = "placeholder"
            elif op == "get_attr":
                label = f"{op} {note.split(';')[0]}"
            elif op == "call_module":  # its type and hyperparameters (the note), not its name
                label = f"{op} <{target.partition('<')[2]} [{note}]"
            else:
                label = f"{op} {target}"
            site = _SITE_NOTE.search(note)
            if site:  # the exfx ops' last argument is the site's name
                args = args.replace(repr(site["site"]), "<site>")
            graph.add_node(name, label=f"{label}({_REF.sub('%', args)})")
            refs = _REF.findall(args)
        elif (ret := _RETURN_LINE.match(line)) is not None:
            name = "<output>"
            graph.add_node(name, label="output")
            refs = _REF.findall(ret["args"])
        else:
            raise ValueError(f"line {number} is not exfx graph text: {line!r}")
        for position, ref in enumerate(refs):
            graph.add_edge(ref, name, position=position)
    return graph


@dataclass
class CheckResult:
    """The outcome of :func:`check`: ``ok`` and, when not, a diff naming what changed."""

    ok: bool
    diff: str
    updated: bool = False


def _changed_sites(golden: str, current: str) -> list[str]:
    def sites(text: str) -> dict[str, str]:
        out = {}
        for line in text.splitlines():
            if line.startswith("# site "):
                name, _, rest = line[len("# site "):].partition(": ")
                out[name] = rest
        return out

    old, new = sites(golden), sites(current)
    changed = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changed.append(f"site {name}: {old.get(name, '(absent)')} -> {new.get(name, '(absent)')}")
    return changed


def _format_note(golden: str, path: str) -> str:
    """A first line for the diff when the golden file was written in another format of the text."""
    match = _FORMAT_LINE.match(golden.partition("\n")[0])
    if match is None or int(match["version"]) == FORMAT_VERSION:
        return ""
    return (f"{path} is in graph-text format {match['version']}, this exfx writes format {FORMAT_VERSION}: "
            f"review the diff, then re-record the file {_RERECORD}\n")


def update_requested() -> bool:
    """Whether the environment asks for golden files to be rewritten (``EXFX_UPDATE_GOLDEN=1``)."""
    return os.environ.get(UPDATE_ENV) == "1"


def _read_golden(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise ExfxError(f"golden file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"is it an exfx graph file? Re-record it {_RERECORD}") from None


def check(current: str, golden_path: str | os.PathLike[str], *, update: bool = False,
          structural: bool = False) -> CheckResult:
    """Compare ``current`` graph text with the golden file; rewrite the file when ``update``."""
    path = os.fspath(golden_path)
    if update:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(current)
        return CheckResult(ok=True, diff="", updated=True)
    if not os.path.exists(path):
        return CheckResult(ok=False, diff=f"golden file {path} does not exist; run with --update to create it\n")
    golden = _read_golden(path)
    if structural:
        try:
            expected = structural_graph(golden)
        except ValueError as err:
            raise ExfxError(f"golden file {path}: {err}. Fix the file or re-record it {_RERECORD}") from None
        matcher = nx.is_isomorphic(expected, structural_graph(current),
                                   node_match=categorical_node_match("label", None),
                                   edge_match=categorical_multiedge_match("position", None))
        ok = bool(matcher)
    else:
        ok = golden == current
    if ok:
        return CheckResult(ok=True, diff="")
    changed = _changed_sites(golden, current)
    header = _format_note(golden, path) + "".join(f"{line}\n" for line in changed)
    return CheckResult(ok=False, diff=header + unified_diff(golden, current, f"golden {path}", "current"))
