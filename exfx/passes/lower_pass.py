"""Lowering: run each site the annotate step marked ``native`` in the fastest correct form measured here.

Runs after :class:`~exfx.passes.enp_pass.EnpPass` on the compiled graph (``lowering="native"``), and reads only
the records on it: each site's :class:`~exfx.meta.SiteDecision` (its parameters and lowering intent) and the
analysis's :class:`~exfx.meta.SiteMatch` (its producer, input and residuals). For a site whose intent is
``native``, it prepares the sum's operands as the ENP rewrite would (:func:`~exfx.passes.operands.site_operands`),
then replaces ``relu(producer(x, W, b) + res)`` by whichever of these
:class:`~exfx.cost.model.LatencyModel` measures faster at the site's shapes, compile-time batch and keep ratio
(dense unless the native kernel wins by :data:`~exfx.cost.model.WIN_MARGIN`)::

    out = exfx.enp_linear(x, head, tail, b, res, k, n, rule, cutoff(rule, param), relu=True)[0]   # native
    out = relu(F.linear(x, W, b) + res)                                                        # dense

``head`` / ``tail`` are ``W`` relaid once, here, into buffers named after the
site (``exfx_<site>_head``). The keep ratio priced is the one calibration measured
(the decision's ``keep``), else the one the example inputs give. Then every
``F.linear(out, W2, b2)`` consumer that reads the site's output directly becomes
``exfx.sparse_input_linear(out, W2.T, b2)`` where that measures faster. Sites the
decision leaves ``dense`` (convs, multi-checkpoint schedules, the GCN form) and
those it keeps on the reference ops (the exact rule) are recorded, not changed.

Why it is exact:

- ``enp_linear`` computes the same early-exit statistic with the same float
  operations and the same cutoff as ``early_exit`` (see :mod:`exfx.ops.native`),
  so its keep mask is the reference's; a kept neuron is ``S_k + rest + b + res``,
  the reference's value up to summation order; a pruned one is exactly 0, as the
  reference's ``complete`` makes it; ``relu=True`` applies the ReLU the site had.
  At a capped-ReLU site (ReLU6: ``clamp(pre, 0.0, t)``) the clamp node stays after
  the kernel and keeps the upper bound.
- the dense form is the original pre-activation (the residual operands joined
  first: a float reassociation), i.e. the site without pruning.
- ``sparse_input_linear`` skips input units that are exactly 0; a 0 input
  contributes exactly 0 to every output (finite weights), so the result is
  ``F.linear`` up to summation order.

What was chosen is written in a frozen :class:`~exfx.meta.Lowering` on the node
that now produces the site's output (and on each consumer): the report reads
those records (:func:`exfx.report.lowering_rows`). ``graph.lint()`` runs after the
rewrite.

Example::

    >>> gm = analysis.compile(plan, lowering="native")            # what the API does
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.analysis.opsets import activation_ceiling
from exfx.config import SiteParams
from exfx.cost.flops import register_native_flop_formulas
from exfx.cost.model import LatencyModel, label_weight
from exfx.errors import UnsupportedModelError
from exfx.meta import (Lowering, SiteDecision, SiteMatch, lowering, producer_name, set_lowering, set_rewrite_role,
                       site_decision, site_match)
from exfx.ops import native
from exfx.ops.enp import cutoff, exit_statistic
from exfx.passes.attributes import register_constant, slug
from exfx.passes.enp_pass import require_annotated
from exfx.passes.operands import SiteOperands, site_operands

logger = logging.getLogger(__name__)

__all__ = ["LowerPass"]

_OPS = torch.ops.exfx


@dataclass
class _Site:
    """One site the lowering handles: its nodes, records and (for the native intent) prepared operands."""

    relu: fx.Node
    match: SiteMatch
    decision: SiteDecision
    operands: SiteOperands | None
    consumers: tuple[_Consumer, ...]

    @property
    def params(self) -> SiteParams:
        assert self.decision.params is not None  # the site is eligible: validated by the annotate step
        return self.decision.params


def _linear_operands(node: fx.Node) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of an ``F.linear`` call, positional or keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return (node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1]),
            node.kwargs.get("bias", args[2]))


def _is_linear_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.linear


@dataclass(frozen=True)
class _Consumer:
    """An ``F.linear`` whose input is the site's output (``gate`` None), or the site's output times another
    tensor, ``gate = mul(site output, other)``: the gated FFN ``down(relu(gate(x)) * up(x))``. Either way its
    input is exactly 0 wherever the site's output is, which is what a sparse-input kernel skips."""

    linear: fx.Node
    gate: fx.Node | None = None

    @property
    def other(self) -> fx.Node | None:
        """The gate's other operand (``up(x)``: the second; :func:`_consumers` takes ``mul(site output, other)``
        only), or None."""
        return None if self.gate is None else self.gate.args[1]  # type: ignore[return-value]


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def _consumers(relu: fx.Node, rewritten: set[str]) -> tuple[_Consumer, ...]:
    """The ``F.linear`` calls that read the site's output, directly or through one product with another tensor,
    as their input, and that are not themselves the producer of a site rewritten into another form
    (``rewritten``: producer node names)."""
    def reads(linear: fx.Node, source: fx.Node) -> bool:
        return _is_linear_call(linear) and _linear_operands(linear)[0] is source and linear.name not in rewritten

    found = [_Consumer(u) for u in relu.users if reads(u, relu)]
    for gate in (u for u in relu.users if _is_mul(u) and u.args[0] is relu and u.args[1] is not relu):
        found += [_Consumer(u, gate) for u in gate.users if reads(u, gate)]
    return tuple(found)


def _sites(graph: fx.Graph) -> list[_Site]:
    """The eligible sites of ``graph`` in graph order, the native ones with their operands prepared."""
    nodes = {n.name: n for n in graph.nodes}
    found = [(node, match, decision) for node in list(graph.nodes)
             if (decision := site_decision(node)) is not None and decision.eligible
             and (match := site_match(node)) is not None]
    rewritten = {match.producer for _, match, decision in found if decision.lowering != "dense"}
    return [_Site(node, match, decision,
                  site_operands(graph, match, nodes) if decision.lowering == "native" else None,
                  _consumers(node, rewritten)) for node, match, decision in found]


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


def _capture(gm: fx.GraphModule, inputs: Sequence[Any], sites: Sequence[_Site]) -> dict[fx.Node, Any]:
    wanted: set[fx.Node] = set()
    for site in sites:
        wanted.add(site.relu)
        if site.operands is not None:
            operands = site.operands
            wanted.update(n for n in (operands.x, operands.weight, operands.bias, operands.residual)
                          if isinstance(n, fx.Node))
        for consumer in site.consumers:
            wanted.update(n for n in _linear_operands(consumer.linear)[1:] if isinstance(n, fx.Node))
            if consumer.other is not None:
                wanted.add(consumer.other)
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


@dataclass
class _Values:
    """A native-intent site's operands and parameters, evaluated on the example inputs."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    residual: Tensor | None
    count: int
    n_units: int
    fan_in: int
    rule: str
    param: float
    name: str

    def _state(self) -> Tensor:
        """The reference ``partial_sum`` at the site's one checkpoint (with moments under the z-test)."""
        with torch.no_grad():
            return _OPS.partial_sum(self.x, self.weight, None, None, 0, self.count, self.n_units, [], [], [], 1,
                                    self.rule == "ztest", self.name)

    def statistic(self) -> Tensor:
        """The early-exit statistic of every neuron (what the rule compares with its cutoff)."""
        with torch.no_grad():
            return exit_statistic(self._state(), self.weight, self.bias, self.residual, self.count, self.n_units,
                                  self.rule)

    def measured_keep(self) -> float:
        """The share of neurons the reference ``early_exit`` keeps on the example inputs."""
        with torch.no_grad():
            active = _OPS.early_exit(self._state(), self.weight, self.bias, self.residual, None, self.count,
                                     self.fan_in, self.rule, self.param, self.name)
        return float(active.float().mean())

    def cutoff_keeping(self, keep: float) -> float:
        """A cutoff that keeps a fraction ``keep`` of the neurons (to time the kernel at a planned ratio)."""
        finite = self.statistic().flatten()
        finite = finite[torch.isfinite(finite)].double()
        if finite.numel() == 0 or keep >= 1.0:
            return -math.inf
        return float(torch.quantile(finite[: 1 << 24], min(max(1.0 - keep, 0.0), 1.0)))


def _site_values(site: _Site, values: Mapping[fx.Node, Any]) -> _Values:
    operands = site.operands
    assert operands is not None
    params = site.params
    return _Values(values[operands.x], values[operands.weight], values.get(operands.bias),
                   values.get(operands.residual), params.samples[0], site.match.n_units, site.match.fan_in or 0,
                   params.rule, params.param, site.match.name)


def _refreshed(operands: SiteOperands, replaced: Mapping[fx.Node, fx.Node]) -> SiteOperands:
    """``operands`` with every node an earlier rewrite erased replaced by the node that took its place."""
    return replace(operands, **{name: replaced.get(value, value) for name in ("x", "weight", "bias", "residual")
                                if isinstance(value := getattr(operands, name), fx.Node)})


#: The lowered model as a whole is kept unless it measures slower than dense by more than this factor: each form
#: in it already beat dense on its own, so only a loss beyond timing noise reverts it.
WHOLE_MODEL_TOLERANCE = 1.03
#: The row counts (batch x tokens) each native form is timed at, from one row up: past the last size where it wins,
#: the op runs dense, per call. Above the ladder's top it runs dense too (not measured, so not trusted).
ROW_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class _Crossover:
    """How far up :data:`ROW_LADDER` a native form beat dense: ``rows`` (0: not even at one row)."""

    rows: int
    forced: bool = False
    timings: tuple[tuple[str, float], ...] = ()
    lost_at: int = 0
    lost_timings: tuple[tuple[str, float], ...] = ()

    @property
    def max_rows(self) -> int:
        """The op's ``max_rows``: -1 (native at every size) when forced, else the crossover."""
        return -1 if self.forced and self.rows else self.rows

    def reason(self, kernel: str, priced: str) -> str:
        if self.forced:
            return f"{kernel if self.rows else 'dense'} (forced by EXFX_FORCE_LOWERING)"
        at_one = f"{_ms(dict(self.timings), _other(self.timings))} vs dense {_ms(dict(self.timings), 'dense')} " \
                 f"at 1 row, {priced}"
        if not self.rows:
            return f"native measured slower ({at_one})"
        past = (f"dense past {self.rows} rows ({_ms(dict(self.lost_timings), _other(self.lost_timings))} vs dense "
                f"{_ms(dict(self.lost_timings), 'dense')} at {self.lost_at})" if self.lost_at
                else f"dense past {self.rows} rows (not measured above)")
        return f"{kernel} up to {self.rows} rows: {at_one}; {past}"


def _other(timings: tuple[tuple[str, float], ...]) -> str:
    return next((form for form, _ in timings if form != "dense"), "native")


def _row_sampler(x: Tensor, residual: Tensor | None) -> Callable[[int], tuple[Tensor, Tensor | None]]:
    """``rows -> (x, residual)``: that many timing rows made (seeded) from the example's rows.

    Copies of one row would keep the same neurons, so a batch of them would time the kernel at a far smaller
    union of kept neurons than real rows give. Past the example's own rows, each row's features are therefore
    shuffled: over an exchangeable contraction axis a shuffled row is another draw of the same distribution,
    with its own kept neurons and the same keep ratio.
    """
    features = x.shape[-1]
    flat = x.reshape(-1, features)
    res = None if residual is None else residual.expand(*x.shape[:-1], residual.shape[-1]).reshape(
        flat.shape[0], -1)

    def sample(rows: int) -> tuple[Tensor, Tensor | None]:
        generator = torch.Generator().manual_seed(rows)
        index = torch.arange(rows) % flat.shape[0]
        picked = flat.index_select(0, index)
        if rows > flat.shape[0]:
            order = torch.argsort(torch.rand(rows, features, generator=generator), dim=1)
            order[: flat.shape[0]] = torch.arange(features)  # the example's own rows as they are
            picked = picked.gather(1, order.to(picked.device))
        return picked.contiguous(), None if res is None else res.index_select(0, index)

    return sample


def _ms(choice_timings: Mapping[str, float], form: str) -> str:
    value = choice_timings.get(form)
    return "?" if value is None else f"{value:.3g} ms"


class LowerPass(PassBase):
    """Lower each ``native``-intent site to ``exfx::enp_linear`` or dense, and its consumers (see module docstring).

    Args:
        example_inputs: the positional inputs the keep ratios, densities and timings are measured on (their
            batch size is the one the choice is made for).
        latency: the timing model (default: measure, cache in ``~/.cache/exfx``, honour
            ``$EXFX_FORCE_LOWERING``).
        sparse_consumers: also consider ``exfx::sparse_input_linear`` for ``relu -> F.linear`` consumers.
    """

    def __init__(self, example_inputs: Sequence[Any], *, latency: LatencyModel | None = None,
                 sparse_consumers: bool = True) -> None:
        super().__init__()
        self.example_inputs = tuple(example_inputs)
        self.latency = latency if latency is not None else LatencyModel()
        self.sparse_consumers = sparse_consumers

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_annotated(graph_module, "the lowering")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        before = copy.deepcopy(graph_module.graph)  # every native-intent site still dense: the whole-model check
        sites = _sites(graph_module.graph)
        for site in sites:
            if site.operands is None:  # kept as the decision says: dense, or the reference ops (exact rule)
                set_lowering(site.relu, Lowering(site.match.name, site.decision.lowering,
                                                 site.decision.lowering_reason, site.decision.keep))
        lowered = [site for site in sites if site.operands is not None or site.decision.lowering == "reference"]
        if not lowered:
            return PassResult(graph_module, bool(sites))
        native.native_available()  # builds or loads the kernels (or registers the fallback) once per process
        register_native_flop_formulas()
        values = _capture(graph_module, self.example_inputs, lowered)
        outputs = []
        replaced: dict[fx.Node, fx.Node] = {}  # an erased site output -> the node that now computes it
        for site in lowered:
            if site.operands is not None:  # an earlier site's output, read here, may have been replaced
                site.operands = _refreshed(site.operands, replaced)
            out, value = self._lower_site(graph_module, site, values)
            outputs.append((out, value))
            values[out] = value  # later sites are priced on this site's output as it now is (pruned)
            if out is not site.relu:
                replaced[site.relu] = out
        if self.sparse_consumers:
            for site, (out, value) in zip(lowered, outputs):
                for consumer in site.consumers:
                    self._lower_consumer(graph_module, site.match.name, consumer, out, value, values)
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        slower = self._slower_whole_model(graph_module, before)
        if slower:
            _revert_to_dense(graph_module, before, slower)
        return PassResult(graph_module, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()

    def _slower_whole_model(self, lowered: fx.GraphModule, dense_graph: fx.Graph) -> str:
        """Why the lowered model as a whole is slower than dense at the example inputs (one line), or ``""``.

        Each form was chosen on its own; the model may still lose as a whole (per-op overhead in a small model,
        caches), and "never slower than dense" is about the model a user runs.
        """
        chosen = {record.form for node in lowered.graph.nodes if (record := lowering(node)) is not None}
        if self.latency.force is not None or not chosen & {"native", "sparse_input"}:
            return ""
        dense = fx.GraphModule(lowered, dense_graph)
        timings = self.latency.time({"dense": lambda: dense(*self.example_inputs),
                                     "native": lambda: lowered(*self.example_inputs)})
        logger.info("lowering: whole model %.3g ms native vs %.3g ms dense", timings["native"], timings["dense"])
        if timings["native"] <= WHOLE_MODEL_TOLERANCE * timings["dense"]:
            return ""
        return (f"the lowered model as a whole measured slower ({timings['native']:.3g} ms vs dense "
                f"{timings['dense']:.3g} ms at the example inputs): every site runs dense")

    # -- sites -------------------------------------------------------------------------------------------------

    def _lower_site(self, gm: fx.GraphModule, site: _Site, values: Mapping[fx.Node, Any]) -> tuple[fx.Node, Tensor]:
        """Decide and rewrite one site; the node now producing its output and that output's example value."""
        if site.operands is None:  # the reference ops stay; only its consumers are lowered
            return site.relu, values[site.relu]
        v = _site_values(site, values)
        keep = site.decision.keep if site.decision.keep is not None else v.measured_keep()
        relaid = native.relayout(v.weight, v.count, v.n_units)
        cut = cutoff(v.rule, v.param)
        timing_cut = cut if site.decision.keep is None else v.cutoff_keeping(keep)
        ceiling = activation_ceiling(site.relu)

        def finish(pre: Tensor) -> Tensor:
            return torch.relu(pre) if ceiling is None else torch.clamp(pre, 0.0, ceiling)

        def candidates(x: Tensor, residual: Tensor | None) -> dict[str, Callable[[], object]]:
            def dense() -> Tensor:
                pre = F.linear(x, v.weight, v.bias)
                return finish(pre if residual is None else pre + residual)

            def native_call() -> object:
                return _OPS.enp_linear(x, relaid.head, relaid.tail, v.bias, residual, v.count, v.n_units, v.rule,
                                       timing_cut, True)

            return {"dense": dense, "native": native_call}

        unsupported = _native_ok(v.x, v.weight, v.bias, v.residual)
        key = (f"enp_linear|in={v.x.shape[-1]}|out={v.weight.shape[0]}|count={v.count}|units={v.n_units}"
               f"|rule={v.rule}|bias={v.bias is not None}|residual={v.residual is not None}|keep={keep:.2f}")
        crossover = _Crossover(0, forced=False) if unsupported else self._crossover(
            key, _row_sampler(v.x, v.residual), candidates)
        form = "native" if crossover.rows else "dense"
        reason = unsupported or crossover.reason("native enp_linear", f"keep {keep:.2f}")
        record = Lowering(site.match.name, form, reason, keep, crossover.timings, max_rows=crossover.max_rows)
        logger.info("lowering site %s: %s", site.match.name, record.describe())
        with torch.no_grad():
            if form == "native":
                out = _rewrite_native(gm, site, relaid, cut, record)
                return out, finish(_OPS.enp_linear(v.x, relaid.head, relaid.tail, v.bias, v.residual, v.count,
                                                   v.n_units, v.rule, cut, True)[0])
            _rewrite_dense(gm.graph, site, record)
            return site.relu, candidates(v.x, v.residual)["dense"]()  # type: ignore[return-value]

    def _crossover(self, key: str, sample: Callable[[int], tuple[Tensor, Tensor | None]],
                   candidates: Callable[[Tensor, Tensor | None], dict[str, Callable[[], object]]]) -> _Crossover:
        """The largest row count of :data:`ROW_LADDER` up to which the native form beats dense at every step.

        Timed from one row upwards on rows sampled from the example inputs, stopping at the first size where
        native does not win by :data:`~exfx.cost.model.WIN_MARGIN`: the op runs dense past that size.
        """
        best, timings = 0, ()
        for rows in ROW_LADDER:
            choice = self.latency.choose(f"{key}|rows={rows}", candidates(*sample(rows)))
            if choice.forced:
                return _Crossover(ROW_LADDER[-1] if choice.form != "dense" else 0, forced=True)
            if rows == 1:
                timings = choice.timings
            if choice.form == "dense":
                return _Crossover(best, timings=timings, lost_at=rows, lost_timings=choice.timings)
            best = rows
        return _Crossover(best, timings=timings)

    # -- consumers ---------------------------------------------------------------------------------------------

    def _lower_consumer(self, gm: fx.GraphModule, site: str, reader: _Consumer, out: fx.Node, h: Tensor,
                        values: Mapping[fx.Node, Any]) -> None:
        """``F.linear(out, W, b)`` -> ``exfx::sparse_input_linear(out, W.T, b)`` where that measures faster (the
        same for ``F.linear(out * other, W, b)``, on the product)."""
        consumer = reader.linear
        _, weight_node, bias_node = _linear_operands(consumer)
        if reader.gate is not None:  # the product, as it now is: zero wherever the site's output is
            other = values.get(reader.other)
            if not isinstance(other, Tensor):
                return
            h, out = h * other, reader.gate
        name = producer_name(consumer)
        weight, bias = values.get(weight_node), values.get(bias_node)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return
        density = float((h != 0).float().mean())
        unsupported = _native_ok(h, weight, bias)
        w_t = native.transpose_for_sparse_input(weight)

        def candidates(x: Tensor, _: Tensor | None) -> dict[str, Callable[[], object]]:
            return {"dense": lambda: F.linear(x, weight, bias),
                    "sparse_input": lambda: _OPS.sparse_input_linear(x, w_t, bias)}

        key = (f"sparse_input_linear|in={weight.shape[1]}|out={weight.shape[0]}|bias={bias is not None}"
               f"|density={density:.2f}")
        crossover = _Crossover(0, forced=False) if unsupported else self._crossover(
            key, _row_sampler(h, None), candidates)
        form = "sparse_input" if crossover.rows else "dense"
        reason = unsupported or crossover.reason("sparse_input_linear", f"input density {density:.2f}")
        record = Lowering(name, form, reason, density, crossover.timings, input_site=site,
                          max_rows=crossover.max_rows)
        logger.info("lowering consumer %s of site %s: %s", name, site, record.describe())
        if form != "sparse_input":
            set_lowering(consumer, record)
            return
        graph, prefix = gm.graph, slug(name)
        label_weight(w_t, name)
        attr = register_constant(gm, f"exfx_{prefix}_w_t", w_t)
        with graph.inserting_before(consumer):
            w_t_node = graph.create_node("get_attr", attr, name=f"{prefix}_w_t")
            sparse = graph.create_node("call_function", _OPS.sparse_input_linear.default,
                                       (out, w_t_node, bias_node, crossover.max_rows, weight_node),
                                       name=f"{prefix}_sparse_input")
        set_rewrite_role(w_t_node, name, "w_t")
        set_rewrite_role(sparse, name, "sparse_input")
        set_lowering(sparse, record)
        consumer.replace_all_uses_with(sparse)
        graph.erase_node(consumer)


def _rewrite_native(gm: fx.GraphModule, site: _Site, relaid: native.RelaidWeight, cut: float,
                    record: Lowering) -> fx.Node:
    operands, params, name = site.operands, site.params, site.match.name
    assert operands is not None
    graph, prefix, relu = gm.graph, slug(name), site.relu
    label_weight(relaid.head, name)
    head_name = register_constant(gm, f"exfx_{prefix}_head", relaid.head)
    tail_name = register_constant(gm, f"exfx_{prefix}_tail", relaid.tail)
    with graph.inserting_before(relu):
        head = graph.create_node("get_attr", head_name, name=f"{prefix}_head")
        tail = graph.create_node("get_attr", tail_name, name=f"{prefix}_tail")
        fused = graph.create_node(
            "call_function", _OPS.enp_linear.default,
            (operands.x, head, tail, operands.bias, operands.residual, params.samples[0], site.match.n_units,
             params.rule, cut, True, operands.weight, record.max_rows), name=f"{prefix}_enp_linear")
        out = graph.create_node("call_function", operator.getitem, (fused, 0), name=f"{prefix}_enp_out")
    for node, role in ((head, "head"), (tail, "tail"), (fused, "enp_linear"), (out, "enp_out")):
        set_rewrite_role(node, name, role)
    set_lowering(fused, record)
    set_lowering(out, record)
    if activation_ceiling(relu) is not None:
        # A capped ReLU keeps its upper clamp: clamp(relu(pre), 0.0, t) == clamp(pre, 0.0, t).
        relu.args = (out, *relu.args[1:])
        set_lowering(relu, record)
        return relu
    # The kernel applied the ReLU (relu=True): the ReLU's readers read the kernel's output instead.
    relu.replace_all_uses_with(out)
    graph.erase_node(relu)
    return out


def _rewrite_dense(graph: fx.Graph, site: _Site, record: Lowering) -> None:
    operands, name, relu = site.operands, site.match.name, site.relu
    assert operands is not None
    prefix = slug(name)
    with graph.inserting_before(relu):
        pre = graph.create_node("call_function", F.linear, (operands.x, operands.weight, operands.bias),
                                name=f"{prefix}_dense")
        set_rewrite_role(pre, name, "dense")
        if operands.residual is not None:
            pre = graph.create_node("call_function", torch.add, (pre, operands.residual),
                                    name=f"{prefix}_dense_residual")
            set_rewrite_role(pre, name, "dense_residual")
    relu.args = (pre, *relu.args[1:])  # a capped ReLU keeps its bounds
    set_lowering(relu, record)


def _revert_to_dense(gm: fx.GraphModule, dense_graph: fx.Graph, reason: str) -> None:
    """Give ``gm`` back its graph from before the lowering, every native-intent site dense with ``reason``."""
    used = {str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    kept = {str(node.target) for node in dense_graph.nodes if node.op == "get_attr"}
    gm.graph = dense_graph
    for name in used - kept:  # the relaid weights the lowering made: nothing reads them any more
        if name.startswith("exfx_") and hasattr(gm, name):
            delattr(gm, name)
    for node in gm.graph.nodes:
        decision = site_decision(node)
        if decision is None or not decision.eligible:
            continue
        form, why = ("dense", reason) if decision.lowering == "native" else (decision.lowering,
                                                                            decision.lowering_reason)
        set_lowering(node, Lowering(decision.site, form, why, decision.keep))
    logger.info("lowering: %s", reason)
    gm.recompile()
