"""Lowering: run each ENP site in the fastest correct form measured on this machine (``lowering="native"``).

Runs after :class:`~exfx.passes.enp_pass.EnpPass` on the compiled graph. The
reference chain of a linear site with one checkpoint::

    s    = exfx.partial_sum(x, W, None, None, 0, k, n, ...)
    keep = exfx.early_exit(s, W, b, res, None, k, n, rule, param)
    pre  = exfx.complete(x, W, s, b, res, keep, k, n, ...)
    out  = relu(pre)

becomes whichever of these :class:`~exfx.cost.model.LatencyModel` measures
faster at the site's shapes, compile-time batch and keep ratio (dense unless the
native kernel wins by :data:`~exfx.cost.model.WIN_MARGIN`)::

    out = exfx.enp_linear(x, head, tail, b, res, k, n, rule, cutoff(rule, param), relu=True)[0]   # native
    out = relu(F.linear(x, W, b) + res)                                                        # dense

``head`` / ``tail`` are ``W`` relaid once, here, into buffers named after the
site (``exfx_<site>_head``). Then every ``F.linear(out, W2, b2)`` consumer that
reads the site's output directly becomes ``exfx.sparse_input_linear(out, W2.T,
b2)`` where that measures faster. Sites the native kernel cannot run (convs,
multi-checkpoint schedules, the GCN form) are never handed to the ENP rewrite in
native mode (see :func:`native_blocker`), so they stay as the analysed graph had
them: producer + ReLU, plain dense. A site under the exact rule is the exception: no native
kernel runs its test, and it stays on the reference ops, with
:data:`EXACT_LOWERING_REASON` recorded. Otherwise the masked reference ops never survive
in native mode, because they are always slower than dense.

Why it is exact:

- ``enp_linear`` computes the same early-exit statistic with the same float
  operations and the same cutoff as ``early_exit`` (see :mod:`exfx.ops.native`),
  so its keep mask is the reference's; a kept neuron is ``S_k + rest + b + res``,
  the reference's value up to summation order; a pruned one is exactly 0, as the
  reference's ``complete`` makes it; ``relu=True`` applies the ReLU the chain had.
  At a capped-ReLU site (ReLU6: ``clamp(pre, 0.0, t)``) the clamp node stays after
  the kernel and keeps the upper bound.
- the dense form is the original pre-activation (the residual operands joined
  first: a float reassociation), i.e. the site without pruning.
- ``sparse_input_linear`` skips input units that are exactly 0; a 0 input
  contributes exactly 0 to every output (finite weights), so the result is
  ``F.linear`` up to summation order.

Choices are recorded per site in a frozen :class:`~exfx.meta.Lowering` on the
node that now produces the site's output (and on each consumer), and returned in
:attr:`LowerPass.sites` / :attr:`LowerPass.consumers`. ``graph.lint()`` runs
after the rewrite.

Example::

    >>> gm = analysis.compile(plan, lowering="native")            # what the API does
    >>> LowerPass(example_inputs, latency=LatencyModel(force="native"))(reference_graph_module)
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.opsets import activation_ceiling
from exfx.config import Plan, SiteParams
from exfx.cost.flops import register_native_flop_formulas
from exfx.cost.model import LatencyModel, label_weight, op_arguments
from exfx.errors import UnsupportedModelError
from exfx.meta import Lowering, SiteMatch, producer_name, rewrite_role, set_lowering, set_rewrite_role, site_match
from exfx.ops import native
from exfx.ops.enp import cutoff, exit_statistic
from exfx.passes.attributes import register_constant

logger = logging.getLogger(__name__)

__all__ = ["LowerPass", "native_blocker", "LOWERINGS", "EXACT_LOWERING_REASON", "check_lowering", "planned_keep",
           "lowering_rows"]

#: The values of ``compile(..., lowering=...)``.
LOWERINGS = ("reference", "native")
#: Why a site under the exact rule keeps its reference ops in native mode.
EXACT_LOWERING_REASON = ("the exact rule has no native kernel yet: kept on the reference ops (masked dense "
                         "compute, slower than dense; its FLOPs are what the masks save)")

_OPS = torch.ops.exfx


def native_blocker(match: SiteMatch, params: SiteParams) -> str:
    """Why no native kernel can run this site under ``params`` (one line), or ``""`` when one can."""
    if match.kind != "linear":
        return f"{match.kind} sites have no native kernel yet"
    if match.left:
        return "GCN left-matmul sites have no native kernel yet"
    if len(params.samples) > 1:
        return (f"the native kernel tests once; this schedule has {len(params.samples)} checkpoints "
                f"{params.samples}")
    return ""


def check_lowering(lowering: str) -> None:
    """Raise ``ValueError`` unless ``lowering`` is one of :data:`LOWERINGS`."""
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")


def planned_keep(plan: Plan | None) -> dict[str, float]:
    """Per-site keep ratios a calibrated plan records in ``meta["calibration"]["keep"]`` (else none)."""
    if plan is None:
        return {}
    calibration = plan.meta.get("calibration")
    keep = calibration.get("keep") if isinstance(calibration, Mapping) else None
    if not isinstance(keep, Mapping):
        return {}
    return {str(name): float(ratio) for name, ratio in keep.items() if isinstance(ratio, (int, float))}


def lowering_rows(lower: LowerPass) -> dict[str, tuple[str, str]]:
    """The report's ``(lowering, reason)`` per site, each consumer's choice appended to its input site's."""
    rows = {name: [record.form, record.reason] for name, record in lower.sites.items()}
    for name, record in lower.consumers.items():
        if record.input_site in rows:
            rows[record.input_site][1] += f"; consumer {name}: {record.describe()}"
    return {name: (form, reason) for name, (form, reason) in rows.items()}


@dataclass
class _Chain:
    """One reference chain ``partial_sum -> early_exit -> complete -> relu`` of the ENP rewrite."""

    site: str
    relu: fx.Node
    complete: fx.Node
    early_exit: fx.Node
    partial_sum: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    residual: fx.Node | None
    count: int
    n_units: int
    rule: str
    param: float
    blocker: str
    consumers: tuple[fx.Node, ...]


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "site"


def _linear_operands(node: fx.Node) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of an ``F.linear`` call, positional or keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return (node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1]),
            node.kwargs.get("bias", args[2]))


def _is_linear_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def _chain_blocker(match: SiteMatch | None, state: Any, x: Any) -> str:
    if match is None:
        return "the ReLU after this chain carries no analysis record"
    if match.kind != "linear":
        return f"{match.kind} sites have no native kernel yet"
    if state is not None:
        return "the native kernel tests once; this site has several checkpoints"
    role = rewrite_role(x) if isinstance(x, fx.Node) else None
    if role is not None and role.role == "left_matmul":
        return "GCN left-matmul sites have no native kernel yet"
    return ""


def _find_chains(graph: fx.Graph) -> list[_Chain]:
    """Every reference chain, in graph order."""
    chains = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not _OPS.complete.default:
            continue
        done = op_arguments(_OPS.complete, node.args, node.kwargs)
        exit_node, sum_node = done["active"], done["state"]
        exact = exit_node.target is _OPS.exact_exit.default
        exit_args = op_arguments(exit_node.target, exit_node.args, exit_node.kwargs)
        if exact:  # the exact rule's test: no native kernel; the chain stays on the reference ops
            exit_args.update(rule="exact", param=0.0)
        sum_args = op_arguments(_OPS.partial_sum, sum_node.args, sum_node.kwargs)
        users = list(node.users)
        relu = users[0] if len(users) == 1 and site_match(users[0]) is not None else None
        if relu is None:
            logger.debug("lowering: %s feeds %s, not one analysed ReLU; left as is", node.name, users)
            continue
        match = site_match(relu)
        consumers = tuple(u for u in relu.users if _is_linear_call(u) and _linear_operands(u)[0] is relu)
        chains.append(_Chain(
            site=str(done["site"]), relu=relu, complete=node, early_exit=exit_node, partial_sum=sum_node,
            x=done["x"], weight=done["weight"], bias=done["bias"], residual=done["residual"],
            count=int(exit_args["count"]), n_units=int(done["n_units"]), rule=str(exit_args["rule"]),
            param=float(exit_args["param"]),
            blocker=EXACT_LOWERING_REASON if exact else _chain_blocker(
                match, sum_args["state"] if sum_args["state"] is not None else exit_args["active"], done["x"]),
            consumers=consumers))
    return chains


def _refreshed(chain: _Chain) -> _Chain:
    """``chain`` with its operand nodes read again from its ``complete`` node (the graph as it is now)."""
    done = op_arguments(_OPS.complete, chain.complete.args, chain.complete.kwargs)
    return replace(chain, x=done["x"], weight=done["weight"], bias=done["bias"], residual=done["residual"])


class _Capture(fx.Interpreter):
    """Runs the graph once and keeps the values of the nodes asked for."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _capture(gm: fx.GraphModule, inputs: Sequence[Any], chains: Sequence[_Chain]) -> dict[fx.Node, Any]:
    wanted: set[fx.Node] = set()
    for chain in chains:
        wanted.update(n for n in (chain.x, chain.weight, chain.bias, chain.residual, chain.early_exit, chain.relu)
                      if isinstance(n, fx.Node))
        for consumer in chain.consumers:
            wanted.update(n for n in _linear_operands(consumer)[1:] if isinstance(n, fx.Node))
    recorder = _Capture(gm, wanted)
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as error:  # the model's own failure, re-raised with what to do
        raise UnsupportedModelError(
            f"lowering: running the compiled graph on the example inputs failed ({type(error).__name__}: "
            f"{error}); compile with lowering='reference', or check the example inputs") from error
    return recorder.values


def _native_ok(*tensors: Tensor | None) -> str:
    bad = next((t for t in tensors if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu")), None)
    return "" if bad is None else (f"native kernels take float32 CPU tensors; this site is {bad.dtype} on "
                                   f"{bad.device}")


def _timing_cutoff(chain: _Chain, x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                   keep: float) -> float:
    """A cutoff that keeps a fraction ``keep`` of the neurons on ``x`` (to time the kernel at a planned ratio)."""
    with torch.no_grad():
        state = _OPS.partial_sum(x, weight, None, None, 0, chain.count, chain.n_units, [], [], [], 1,
                                 chain.rule == "ztest", chain.site)
        statistic = exit_statistic(state, weight, bias, residual, chain.count, chain.n_units, chain.rule).flatten()
    finite = statistic[torch.isfinite(statistic)].double()
    if finite.numel() == 0 or keep >= 1.0:
        return -math.inf
    return float(torch.quantile(finite[: 1 << 24], min(max(1.0 - keep, 0.0), 1.0)))


def _ms(choice_timings: Mapping[str, float], form: str) -> str:
    value = choice_timings.get(form)
    return "?" if value is None else f"{value:.3g} ms"


class LowerPass(PassBase):
    """Lower each reference chain to ``exfx::enp_linear`` or dense, and its consumers (see module docstring).

    Args:
        example_inputs: the positional inputs the keep ratios, densities and timings are measured on (their
            batch size is the one the choice is made for).
        keep_ratios: site name -> keep ratio to price the site at (e.g. from a calibrated plan's
            ``meta["calibration"]["keep"]``); others are measured on ``example_inputs``.
        latency: the timing model (default: measure, cache in ``~/.cache/exfx``, honour
            ``$EXFX_FORCE_LOWERING``).
        dense_sites: site name -> why it was left dense before the ENP rewrite (recorded on its ReLU).
        sparse_consumers: also consider ``exfx::sparse_input_linear`` for ``relu -> F.linear`` consumers.

    After the call, :attr:`sites` and :attr:`consumers` hold the :class:`~exfx.meta.Lowering` of every site
    and consumer considered, in graph order.
    """

    def __init__(self, example_inputs: Sequence[Any], *, keep_ratios: Mapping[str, float] | None = None,
                 latency: LatencyModel | None = None, dense_sites: Mapping[str, str] | None = None,
                 sparse_consumers: bool = True) -> None:
        super().__init__()
        self.example_inputs = tuple(example_inputs)
        self.keep_ratios = dict(keep_ratios or {})
        self.latency = latency if latency is not None else LatencyModel()
        self.dense_sites = dict(dense_sites or {})
        self.sparse_consumers = sparse_consumers
        self.sites: dict[str, Lowering] = {}
        self.consumers: dict[str, Lowering] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.sites, self.consumers = {}, {}
        graph = graph_module.graph
        self._record_dense_sites(graph)
        chains = _find_chains(graph)
        if not chains:
            return PassResult(graph_module, bool(self.sites))
        native.native_available()  # builds or loads the kernels (or registers the fallback) once per process
        register_native_flop_formulas()
        values = _capture(graph_module, self.example_inputs, chains)
        outputs: list[tuple[_Chain, fx.Node, Tensor]] = []
        for chain in chains:
            outputs.append(self._lower_site(graph_module, chain, values))
        if self.sparse_consumers:
            for chain, out, value in outputs:
                for consumer in chain.consumers:
                    self._lower_consumer(graph_module, chain.site, consumer, out, value, values)
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    # -- sites -------------------------------------------------------------------------------------------------

    def _record_dense_sites(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            match = site_match(node)
            if match is not None and match.name in self.dense_sites:
                record = Lowering(match.name, "dense", self.dense_sites[match.name])
                set_lowering(node, record)
                self.sites[match.name] = record

    def _lower_site(self, gm: fx.GraphModule, chain: _Chain, values: Mapping[fx.Node, Any]) -> tuple[
            _Chain, fx.Node, Tensor]:
        """Decide and rewrite one chain; the node now producing the site's output and its example value."""
        x, weight = values[chain.x], values[chain.weight]
        bias, residual = values.get(chain.bias), values.get(chain.residual)
        measured_keep = float(values[chain.early_exit].float().mean())
        keep = float(self.keep_ratios.get(chain.site, measured_keep))
        if chain.blocker:
            record = Lowering(chain.site, "reference", chain.blocker, keep)
            set_lowering(chain.relu, record)
            self.sites[chain.site] = record
            return chain, chain.relu, values[chain.relu]
        relaid = native.relayout(weight, chain.count, chain.n_units)
        cut = cutoff(chain.rule, chain.param)
        timing_cut = cut if chain.site not in self.keep_ratios else _timing_cutoff(
            chain, x, weight, bias, residual, keep)
        rows = x.numel() // max(1, x.shape[-1])

        ceiling = activation_ceiling(chain.relu)

        def dense() -> Tensor:
            pre = F.linear(x, weight, bias)
            pre = pre if residual is None else pre + residual
            return torch.relu(pre) if ceiling is None else torch.clamp(pre, 0.0, ceiling)

        def native_call() -> Tensor:
            return _OPS.enp_linear(x, relaid.head, relaid.tail, bias, residual, chain.count, chain.n_units,
                                   chain.rule, timing_cut, True)

        unsupported = _native_ok(x, weight, bias, residual)
        if unsupported:
            form, reason, timings = "dense", unsupported, {}
        else:
            key = (f"enp_linear|rows={rows}|in={x.shape[-1]}|out={weight.shape[0]}|count={chain.count}"
                   f"|units={chain.n_units}|rule={chain.rule}|bias={bias is not None}"
                   f"|residual={residual is not None}|keep={keep:.2f}")
            choice = self.latency.choose(key, {"dense": dense, "native": native_call})
            form, timings = choice.form, dict(choice.timings)
            reason = self._site_reason(form, choice.forced, timings, rows, keep)
        record = Lowering(chain.site, form, reason, keep, tuple(timings.items()))
        logger.info("lowering site %s: %s", chain.site, record.describe())
        self.sites[chain.site] = record
        chain = _refreshed(chain)  # an earlier site's rewrite may have replaced this chain's input node
        if form == "native":
            out = self._rewrite_native(gm, chain, relaid, cut, record)
            return chain, out, values[chain.relu]
        self._rewrite_dense(gm.graph, chain, record)
        with torch.no_grad():
            return chain, chain.relu, dense()

    @staticmethod
    def _site_reason(form: str, forced: bool, timings: Mapping[str, float], rows: int, keep: float) -> str:
        if forced:
            return f"{'native enp_linear' if form == 'native' else 'dense'} (forced by EXFX_FORCE_LOWERING)"
        compared = f"{_ms(timings, 'native')} vs dense {_ms(timings, 'dense')} at {rows} rows, keep {keep:.2f}"
        if form == "native":
            return f"native enp_linear: {compared}"
        return f"native measured slower ({compared})"

    @staticmethod
    def _rewrite_native(gm: fx.GraphModule, chain: _Chain, relaid: native.RelaidWeight, cut: float,
                        record: Lowering) -> fx.Node:
        graph, slug = gm.graph, _slug(chain.site)
        label_weight(relaid.head, chain.site)
        head_name = register_constant(gm, f"exfx_{slug}_head", relaid.head)
        tail_name = register_constant(gm, f"exfx_{slug}_tail", relaid.tail)
        with graph.inserting_before(chain.relu):
            head = graph.create_node("get_attr", head_name, name=f"{slug}_head")
            tail = graph.create_node("get_attr", tail_name, name=f"{slug}_tail")
            fused = graph.create_node(
                "call_function", _OPS.enp_linear.default,
                (chain.x, head, tail, chain.bias, chain.residual, chain.count, chain.n_units, chain.rule, cut, True),
                name=f"{slug}_enp_linear")
            out = graph.create_node("call_function", operator.getitem, (fused, 0), name=f"{slug}_enp_out")
        for node, role in ((head, "head"), (tail, "tail"), (fused, "enp_linear"), (out, "enp_out")):
            set_rewrite_role(node, chain.site, role)
        set_lowering(fused, record)
        set_lowering(out, record)
        if activation_ceiling(chain.relu) is not None:
            # A capped ReLU keeps its upper clamp: clamp(relu(pre), 0.0, t) == clamp(pre, 0.0, t).
            chain.relu.args = (out, *chain.relu.args[1:])
            set_lowering(chain.relu, record)
            for node in (chain.complete, chain.early_exit, chain.partial_sum):
                graph.erase_node(node)
            return chain.relu
        # The kernel applied the ReLU (relu=True): the ReLU's readers read the kernel's output instead.
        chain.relu.replace_all_uses_with(out)
        for node in (chain.relu, chain.complete, chain.early_exit, chain.partial_sum):
            graph.erase_node(node)
        return out

    @staticmethod
    def _rewrite_dense(graph: fx.Graph, chain: _Chain, record: Lowering) -> None:
        slug = _slug(chain.site)
        with graph.inserting_before(chain.relu):
            pre = graph.create_node("call_function", F.linear, (chain.x, chain.weight, chain.bias),
                                    name=f"{slug}_dense")
            set_rewrite_role(pre, chain.site, "dense")
            if chain.residual is not None:
                pre = graph.create_node("call_function", torch.add, (pre, chain.residual),
                                        name=f"{slug}_dense_residual")
                set_rewrite_role(pre, chain.site, "dense_residual")
        chain.relu.args = (pre, *chain.relu.args[1:])  # a capped ReLU keeps its bounds
        set_lowering(chain.relu, record)
        for node in (chain.complete, chain.early_exit, chain.partial_sum):
            graph.erase_node(node)

    # -- consumers ---------------------------------------------------------------------------------------------

    def _lower_consumer(self, gm: fx.GraphModule, site: str, consumer: fx.Node, out: fx.Node, h: Tensor,
                        values: Mapping[fx.Node, Any]) -> None:
        """``F.linear(out, W, b)`` -> ``exfx::sparse_input_linear(out, W.T, b)`` where that measures faster."""
        _, weight_node, bias_node = _linear_operands(consumer)
        name = producer_name(consumer)
        weight, bias = values.get(weight_node), values.get(bias_node)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return
        density = float((h != 0).float().mean())
        unsupported = _native_ok(h, weight, bias)
        w_t = native.transpose_for_sparse_input(weight)
        rows = h.numel() // max(1, h.shape[-1])
        if unsupported:
            form, reason, timings = "dense", unsupported, {}
        else:
            key = (f"sparse_input_linear|rows={rows}|in={weight.shape[1]}|out={weight.shape[0]}"
                   f"|bias={bias is not None}|density={density:.2f}")
            candidates: dict[str, Callable[[], object]] = {
                "dense": lambda: F.linear(h, weight, bias),
                "sparse_input": lambda: _OPS.sparse_input_linear(h, w_t, bias)}
            choice = self.latency.choose(key, candidates)
            form, timings = choice.form, dict(choice.timings)
            if choice.forced:
                reason = f"{form} (forced by EXFX_FORCE_LOWERING)"
            else:
                reason = (f"sparse_input_linear {_ms(timings, 'sparse_input')} vs dense {_ms(timings, 'dense')} "
                          f"at {rows} rows, input density {density:.2f}")
        record = Lowering(name, form, reason, density, tuple(timings.items()), input_site=site)
        self.consumers[name] = record
        logger.info("lowering consumer %s of site %s: %s", name, site, record.describe())
        if form != "sparse_input":
            set_lowering(consumer, record)
            return
        graph, slug = gm.graph, _slug(name)
        label_weight(w_t, name)
        attr = register_constant(gm, f"exfx_{slug}_w_t", w_t)
        with graph.inserting_before(consumer):
            w_t_node = graph.create_node("get_attr", attr, name=f"{slug}_w_t")
            sparse = graph.create_node("call_function", _OPS.sparse_input_linear.default, (out, w_t_node, bias_node),
                                       name=f"{slug}_sparse_input")
        set_rewrite_role(w_t_node, name, "w_t")
        set_rewrite_role(sparse, name, "sparse_input")
        set_lowering(sparse, record)
        consumer.replace_all_uses_with(sparse)
        graph.erase_node(consumer)
