"""Calibration over ``torch.distributed`` ranks: each rank reads its shard, and the plan is one process's.

:func:`exfx.calibrate` runs distributed when a process group of more than one
rank is initialised (``torch.distributed.is_available() and is_initialized()``;
``distributed=False`` opts out, ``True`` insists). Every rank calls it with the
same arguments and its own shard of the data: rank ``r`` of ``W`` should hold the
``r``-th contiguous block of the batches (:func:`shard_batches` cuts one). Each
rank then instruments and evaluates only its own batches, and :class:`Ranks`
combines what they found. The plan equals, bit for bit, the plan one process
returns on the shards concatenated in rank order, because nothing a decision
depends on is computed differently:

- **Arguments and model.** Before any pass, the ranks exchange their arguments,
  their model's site signatures, a SHA-256 of its analysed weights and their
  batch counts. A rank that differs from rank 0, or holds no batch, raises
  :class:`~exfx.errors.DistributedError` on every rank, naming the rank and field.
  The counts also give each rank the index of its first batch in the whole data.
- **Evaluations.** Executed and dense FLOPs are integer sums: ``all_reduce`` of
  int64 is exact. The metric is not a sum in general (accuracy is, an AUC or a
  median is not), so each rank's per-batch outputs and targets are gathered to
  rank 0 in rank order. That is the list one process builds, so rank 0 scores it
  exactly as one process would, and broadcasts the score (and, with
  ``confidence``, the bootstrap bound).
- **Instrumented records.** Each batch draws its neuron sample and its gain
  projection from a generator seeded by its index in the whole data
  (:func:`~exfx.tune.instrument.batch_generator`), so a rank records for its
  batches exactly what one process records for them. The records are per-batch
  lists; gathered to rank 0 and concatenated in rank order they are one
  process's lists. Quantiles, harm sums and the allocation path are then computed
  once, on identical tensors in an identical order. No float is ever summed
  across ranks, so there is no reduction order to pin.
- **Decisions.** Pricing runs on rank 0 alone, and the allocation path, each
  drop and the final plans are broadcast from it. Every rank therefore follows
  the same binary search and returns the same plan, even on machines whose
  kernels round differently. A failure on rank 0 is re-raised on every rank
  instead of leaving the others waiting.

Outputs and targets are moved to the CPU to be gathered, so under ``torch.distributed``
the metric sees CPU tensors. Rank 0 holds all outputs, as one process does.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import reduce
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from exfx.api import Analysis
from exfx.errors import DistributedError, ExfxError
from exfx.tune.evaluation import Batch, Counts, Evaluation, Metric, run_batches, score_batches
from exfx.tune.instrument import SiteSample
from exfx.tune.options import check_distributed

logger = logging.getLogger(__name__)

__all__ = ["Ranks", "shard_batches", "weights_digest", "merge_samples"]

T = TypeVar("T")


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default process group, or None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def shard_batches(batches: Iterable[Batch], rank: int | None = None, world_size: int | None = None) -> list[Batch]:
    """This rank's contiguous block of ``batches``: what to hand :func:`exfx.calibrate` under ``torch.distributed``.

    Rank ``r`` of ``W`` gets ``batches[r * n // W:(r + 1) * n // W]``, so the
    blocks in rank order are ``batches`` again and the plan is the one a single
    process returns on ``batches``. ``rank`` and ``world_size`` default to the
    initialised process group's (rank 0 of 1 without one). The batches before
    this rank's are read and dropped; with a large set, load only your block
    instead (e.g. a ``DataLoader`` over ``torch.utils.data.Subset``), cut the same way.

    Raises:
        DistributedError: fewer batches than ranks (a rank would have none), or a bad ``rank``/``world_size``.
    """
    group = _process_group() or (0, 1)
    rank = group[0] if rank is None else rank
    world_size = group[1] if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"shard_batches needs 0 <= rank < world_size, got rank={rank}, "
                               f"world_size={world_size}")
    batches = batches if isinstance(batches, (list, tuple)) else list(batches)
    if len(batches) < world_size:
        raise DistributedError(f"rank {rank}: {len(batches)} batches cannot be shared by world_size={world_size} "
                               "ranks (a rank would get none); use smaller batches or fewer ranks")
    return list(batches[rank * len(batches) // world_size:(rank + 1) * len(batches) // world_size])


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor ``module`` holds or its graph reads (name, dtype, shape and bytes), in name order."""
    tensors: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=True))
    graph = getattr(module, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "get_attr" and node.target not in tensors:
            value = reduce(getattr, str(node.target).split("."), module)
            if isinstance(value, torch.Tensor):
                tensors[str(node.target)] = value
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def merge_samples(parts: Sequence[Mapping[str, SiteSample]]) -> dict[str, SiteSample]:
    """The ranks' records, concatenated in rank order: one process's records over all their batches.

    Per-batch lists (and the per-checkpoint lists) are extended and neuron counts
    added; every other field (the per-neuron cost, a capped ReLU's ceiling) is the
    last rank's, as one process keeps its last batch's. If a rank has no gains
    (autograd failed there), no site keeps any, as in one process.
    """
    merged: dict[str, SiteSample] = {}
    for part in parts:
        for name, sample in part.items():
            into = merged.setdefault(name, SiteSample())
            for field in fields(SiteSample):
                value = getattr(sample, field.name)
                if field.name == "checkpoints":
                    for count, per_rule in value.items():
                        for rule, values in per_rule.items():
                            into.checkpoints.setdefault(count, {}).setdefault(rule, []).extend(values)
                elif field.name == "neurons":
                    into.neurons += value
                elif isinstance(value, list):
                    getattr(into, field.name).extend(value)
                else:
                    setattr(into, field.name, value)
    if any(len(sample.gains) != len(sample.pre) for sample in merged.values()):
        for sample in merged.values():
            sample.gains.clear()
    return merged


def _on_cpu(value: Any) -> Any:
    return tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, value)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the calibrating ranks; with one rank every method is the one-process step."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def detect(cls, distributed: bool | None) -> Ranks:
        """The ranks to calibrate over: the default process group's (``distributed`` None: if initialised with
        more than one rank; True: it must be initialised), or this process alone (False)."""
        check_distributed(distributed)
        group = _process_group()
        if distributed and group is None:
            raise DistributedError("distributed=True, but torch.distributed is not initialised: call "
                                   "torch.distributed.init_process_group('gloo') first (torchrun sets its "
                                   "environment), or pass distributed=None")
        if distributed is False or group is None:
            return cls()
        return cls(*group)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def progress(self, progress: bool | None) -> bool | None:
        """Progress bars on rank 0 only, so the ranks do not draw over each other."""
        return progress if self.rank == 0 else False

    def _all_gather(self, value: Any) -> list[Any]:
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, value)
        return everyone

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on rank 0 (an empty list on the others)."""
        everyone: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, everyone, dst=0)
        return everyone or []

    def check_arguments(self, arguments: Mapping[str, Any]) -> None:
        """Raise on every rank if one passed a different argument than rank 0 (compared by ``repr``).

        ``arguments``: the budgets and :meth:`~exfx.tune.options.CalibrationOptions.rank_arguments`."""
        if not self.active:
            return
        everyone = self._all_gather({name: repr(value) for name, value in arguments.items()})
        for rank, theirs in enumerate(everyone[1:], start=1):
            for name, first in everyone[0].items():
                if theirs.get(name) != first:
                    raise DistributedError(
                        f"rank {rank} passed calibrate argument {name}={theirs.get(name)} but rank 0 passed "
                        f"{name}={first}: every rank must call exfx.calibrate with the same arguments, only its "
                        "data differs")

    def check_model_and_data(self, analysis: Analysis, batches: int) -> tuple[int, int]:
        """(index of this rank's first batch in the whole data, number of batches in all), after checking that
        every rank has rank 0's model (site signatures and weights) and at least one batch."""
        if not self.active:
            return 0, batches
        mine = {"model fingerprint (site shapes)": analysis.fingerprint,
                "model weights (SHA-256)": weights_digest(analysis.graph_module), "batches": batches}
        everyone = self._all_gather(mine)
        for rank, theirs in enumerate(everyone):
            if theirs["batches"] == 0:
                raise DistributedError(
                    f"rank {rank} has no calibration batch (batches per rank: {[e['batches'] for e in everyone]}): "
                    "give every rank at least one batch (exfx.shard_batches), with smaller batches or fewer ranks")
            for field in ("model fingerprint (site shapes)", "model weights (SHA-256)"):
                if theirs[field] != everyone[0][field]:
                    raise DistributedError(
                        f"rank {rank}'s {field} is {theirs[field][:16]} but rank 0's is {everyone[0][field][:16]}: "
                        "every rank must calibrate the same model (load the same checkpoint on each, and "
                        "broadcast or seed any random initialisation)")
        counts = [theirs["batches"] for theirs in everyone]
        return sum(counts[:self.rank]), sum(counts)

    def evaluate(self, module: torch.nn.Module, data: Iterable[Batch], metric: Metric, *, desc: str,
                 progress: bool | None) -> Evaluation:
        """:func:`~exfx.tune.evaluation.evaluate` over every rank's data: FLOPs summed, outputs scored on rank 0.

        Rank 0's result holds all outputs and targets; the others' hold none."""
        outputs, targets, counts = run_batches(module, data, desc=desc, progress=progress)
        if not self.active:
            return score_batches(outputs, targets, counts, metric)
        counts = _all_reduced(counts)
        parts = self._gather((_on_cpu(outputs), _on_cpu(targets)))
        scored: list[Evaluation] = []

        def score() -> float:
            scored.append(score_batches([o for outs, _ in parts for o in outs], [t for _, ts in parts for t in ts],
                                        counts, metric))
            return scored[0].score

        value = self.on_first(score)
        return scored[0] if scored else Evaluation(score=value, executed=counts.executed, dense=counts.dense,
                                                   keep=counts.keep)

    def merge_samples(self, samples: dict[str, SiteSample]) -> dict[str, SiteSample]:
        """Every rank's records, concatenated in rank order, on rank 0 (empty on the others)."""
        if not self.active:
            return samples
        parts = self._gather(samples)
        return merge_samples(parts) if self.rank == 0 else {}

    def on_first(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its result broadcast to every rank; if it raises, every rank raises."""
        if not self.active:
            return compute()
        box: list[Any] = [None]
        failure: Exception | None = None
        if self.rank == 0:
            try:
                box[0] = (True, compute())
            except Exception as error:  # re-raised below, on every rank
                failure = error
                box[0] = (False, _portable(error))
        dist.broadcast_object_list(box, src=0)
        succeeded, value = box[0]
        if failure is not None:
            raise failure
        if not succeeded:
            raise value
        return value


def _portable(error: Exception) -> Exception:
    """``error`` itself if it can be sent to the other ranks, else an ExfxError with its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # any pickling failure: send the text instead
        return ExfxError(f"rank 0 failed: {error!r}")


def _all_reduced(counts: Counts) -> Counts:
    """Every rank's counts summed (every rank runs the same compiled module, so it counts the same sites)."""
    names = sorted(counts.neurons)
    values = [counts.executed, counts.dense] + [v for name in names for v in (counts.neurons[name],
                                                                             counts.pruned[name])]
    total = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(total)
    summed = [int(v) for v in total]
    return Counts(summed[0], summed[1], {name: summed[2 + 2 * i] for i, name in enumerate(names)},
                  {name: summed[3 + 2 * i] for i, name in enumerate(names)})
