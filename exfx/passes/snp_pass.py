"""The SNP rewrite: :class:`SnpPass` folds removed hidden units into their consumers and slices them out.

The pass only applies edits; choosing them (which units of which layer, and the
fold of each) is :func:`exfx.pruning.prune`'s job. A :class:`LayerEdit` names
the kept units of one :class:`exfx.snp.layers.PrunableLayer` and, for each
consumer, a :class:`ConsumerFold`: the removed units ``P`` are replaced by
their reconstruction from the kept ones, ``a_P ~ A a_K + c``, so
``W_K <- W_K + W_P A`` at every kernel tap or flatten position and
``b <- b + W_P c`` (a bias-less consumer that receives a constant gets a zero
bias ``get_attr`` first); then producer rows, biases and consumer columns are
sliced out. Without ``A`` and ``c`` the units are just removed.

Why the rewrite is safe: only ``get_attr`` tensors change, and along exactly the
axes of one exchangeable group, so every shape stays consistent; the graph is
linted and recompiled. An edit that keeps every unit changes nothing. A removed
unit's contribution ``W_P a_P`` is replaced by ``W_P (A a_K + c)``, which is
exact whenever the removed units are affine in the kept ones on the data
(duplicated or linearly dependent units) and otherwise the least-squares best.
The fold is exact for linear consumers and in the interior of a conv; at
zero-padded conv borders the constant ``W_P c`` is added where the removed unit
would have read padding (the paper's choice too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from exfx.passes.attributes import free_bias_target, owner_of, replace_tensor
from exfx.snp.layers import ConsumerSlot, PrunableLayer

logger = logging.getLogger(__name__)

__all__ = ["SnpPass", "LayerEdit", "ConsumerFold"]


@dataclass(frozen=True)
class ConsumerFold:
    """How to fold the removed units into one consumer: ``W_K += W_P A``, ``b += W_P c`` (either may be None)."""

    slot: ConsumerSlot
    a_matrix: torch.Tensor | None = None
    offset: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerEdit:
    """The kept units of one layer (original indices, ascending) and the fold into each consumer."""

    layer: PrunableLayer
    kept: tuple[int, ...]
    folds: tuple[ConsumerFold, ...]

    @property
    def removed(self) -> tuple[int, ...]:
        keep = set(self.kept)
        return tuple(i for i in range(self.layer.n_units) if i not in keep)



# ---------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------


def _read(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner, leaf = owner_of(gm, target)
    return getattr(owner, leaf)


def _write(gm: torch.nn.Module, target: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    """Replace (or create) the tensor at ``target``: a parameter stays a parameter, a buffer a buffer."""
    dtype = like.dtype if like is not None else value.dtype
    grad = bool(like.requires_grad) if isinstance(like, torch.nn.Parameter) else False
    replace_tensor(gm, target, value.to(dtype).contiguous(), requires_grad=grad)


class SnpPass(PassBase):
    """Apply :class:`LayerEdit` s to a GraphModule in place: fold into consumers, then slice (see the module docstring).

    The pass changes ``get_attr`` tensors only (and adds a bias ``get_attr`` to a
    bias-less consumer that receives a constant). Call it on a copy: the
    weights of the module it is given are replaced.
    """

    def __init__(self, edits: Sequence[LayerEdit]) -> None:
        super().__init__()
        self.edits = tuple(edits)
        self.created_biases: dict[str, str] = {}  # consumer weight target -> bias target this pass created

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        work: dict[str, torch.Tensor] = {}
        originals: dict[str, torch.Tensor | None] = {}

        def load(target: str) -> torch.Tensor:
            if target not in work:
                originals[target] = _read(graph_module, target)
                work[target] = originals[target].detach().to(torch.float64).clone()  # type: ignore[union-attr]
            return work[target]

        changed = False
        # Columns first: a consumer's weight may also be the next layer's producer weight, whose rows are
        # sliced below; folds act within rows, so the two commute when columns go first.
        for edit in self.edits:
            if len(edit.kept) == edit.layer.n_units:
                continue
            for fold in edit.folds:
                self._fold_consumer(graph_module, edit, fold, load, work, originals)
            changed = True
        for edit in self.edits:
            if len(edit.kept) == edit.layer.n_units:
                continue
            rows = torch.tensor(edit.kept, dtype=torch.long)
            work[edit.layer.weight] = load(edit.layer.weight)[rows]
            bias = edit.layer.bias or self.created_biases.get(edit.layer.weight)
            if bias is not None:
                work[bias] = load(bias)[rows]
        for target, value in work.items():
            _write(graph_module, target, value, originals.get(target))
        if changed:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, changed)

    def _fold_consumer(self, gm: fx.GraphModule, edit: LayerEdit, fold: ConsumerFold, load: Any,
                       work: dict[str, torch.Tensor], originals: dict[str, torch.Tensor | None]) -> None:
        slot, n = fold.slot, edit.layer.n_units
        weight = load(slot.weight)
        shape = weight.shape
        view = weight.reshape(shape[0], n, -1)  # (out, units, taps): kernel taps, or flatten positions
        kept = torch.tensor(edit.kept, dtype=torch.long)
        removed = torch.tensor(edit.removed, dtype=torch.long)
        w_removed = view[:, removed]
        if fold.a_matrix is not None:
            view = view.clone()
            view[:, kept] += torch.einsum("opt,pk->okt", w_removed, fold.a_matrix.to(torch.float64))
        if fold.offset is not None:
            delta = torch.einsum("opt,p->o", w_removed, fold.offset.to(torch.float64))
            self._add_to_bias(gm, slot, delta, load, work, originals)
        sliced = view[:, kept]
        work[slot.weight] = sliced.reshape(shape[0], len(edit.kept) * slot.block, *shape[2:]) \
            if slot.kind == "linear" else sliced.reshape(shape[0], len(edit.kept), *shape[2:])

    def _add_to_bias(self, gm: fx.GraphModule, slot: ConsumerSlot, delta: torch.Tensor, load: Any,
                     work: dict[str, torch.Tensor], originals: dict[str, torch.Tensor | None]) -> None:
        target = slot.bias or self.created_biases.get(slot.weight)
        if target is None:
            if not bool(delta.abs().max() > 0):
                return
            target = self._new_bias(gm, slot)
            originals[target] = _read(gm, slot.weight)
            work[target] = torch.zeros_like(delta)
        work[target] = load(target) + delta

    def _new_bias(self, gm: fx.GraphModule, slot: ConsumerSlot) -> str:
        """Give a bias-less consumer a zero bias ``get_attr`` (so it can receive the folded constant)."""
        target = free_bias_target(gm, slot.weight, "_snp_bias")
        node = next(n for n in gm.graph.nodes if n.name == slot.node)
        weight = _read(gm, slot.weight)
        _write(gm, target, torch.zeros(weight.shape[0], dtype=weight.dtype), weight)
        with gm.graph.inserting_before(node):
            bias_node = gm.graph.get_attr(target)
        node.args = (node.args[0], node.args[1], bias_node, *node.args[3:])
        self.created_biases[slot.weight] = target
        logger.debug("snp: gave %s a bias `%s` for the folded constant", slot.name, target)
        return target
