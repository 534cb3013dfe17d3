"""Train the GCN benchmark (:class:`exfx.examples.GCN`: width 300, five layers) on Fashion-MNIST superpixel graphs.

Run:
    python -m benchmarks.train_gcn [--epochs N] [--threads 1] [--graphs-per-epoch G]

Why: the ExPrune reproduction table needs a trained graph model; exfx's early exit is only meaningful on
trained weights. Training uses the train split only (Adam, cosine learning-rate decay per step, batches
of 128 graphs in a seeded random order); validation accuracy is logged after each epoch and picks
nothing. ``--graphs-per-epoch`` trains each epoch on a fresh random subset of the training graphs, to
fit a CPU time budget.

The checkpoint goes to ``benchmarks/checkpoints/gcn-h300.pt`` (committed: trained with ``--epochs 10``, see
``benchmarks/checkpoints/MANIFEST.json``, which :func:`load_trained` checks it against) with the keys
``state_dict``, ``val_accuracy``, ``test_accuracy``, ``epochs``, ``seed`` and ``graphs_per_epoch``;
:func:`load_trained` returns the model in eval mode, by default with the gather aggregation, whose FLOPs
``exfx.count_flops`` counts correctly (training uses the faster sparse one). Training is seeded; on CPU,
thread scheduling can still change the last bits.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.manifest import verify_checkpoint
from benchmarks.superpixels import GraphBatch, SuperpixelGraphs, graph_batches, load_superpixels
from exfx.examples import GCN, Aggregation

__all__ = ["CHECKPOINT", "TRAIN_COMMAND", "accuracy", "load_trained", "train"]

logger = logging.getLogger("benchmarks.train_gcn")

CHECKPOINT = Path(__file__).parent / "checkpoints" / "gcn-h300.pt"
EPOCHS = 4
TRAIN_COMMAND = f"python -m benchmarks.train_gcn --epochs {EPOCHS} --threads 1"


def accuracy(model: nn.Module, batches: list[GraphBatch]) -> float:
    """Fraction of graphs whose arg-max logit is the label (the model is put in eval mode)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in batches:
            correct += int((model(*inputs).argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def _epoch(model: nn.Module, graphs: SuperpixelGraphs, order: torch.Tensor, batch_size: int,
           optimiser: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler) -> float:
    """One pass over the graphs ``order``; returns the mean training loss."""
    model.train()
    losses = []
    for i in range(0, len(order), batch_size):
        inputs, labels = graphs.collate(order[i:i + batch_size])
        loss = F.cross_entropy(model(*inputs), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def train(model: nn.Module, epochs: int, batch_size: int, lr: float, seed: int,
          graphs_per_epoch: int | None = None) -> dict[str, float]:
    """Train ``model`` in place; returns its final validation and test accuracy."""
    graphs = load_superpixels()["train"]
    per_epoch = min(graphs_per_epoch or len(graphs), len(graphs))
    val = graph_batches("val", 500)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((per_epoch + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    val_accuracy = 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(graphs), generator=generator)[:per_epoch]
        loss = _epoch(model, graphs, order, batch_size, optimiser, schedule)
        val_accuracy = accuracy(model, val)
        logger.info("epoch %d/%d: %d graphs, loss %.4f, validation accuracy %.4f (%.0f s)", epoch + 1, epochs,
                    per_epoch, loss, val_accuracy, time.perf_counter() - started)
    return {"val_accuracy": val_accuracy, "test_accuracy": accuracy(model, graph_batches("test", 500))}


def load_trained(path: Path = CHECKPOINT, aggregation: Aggregation = "gather") -> nn.Module:
    """The trained GCN in eval mode; FileNotFoundError (naming the training command) when not trained yet, and
    ``benchmarks.manifest.CheckpointMismatchError`` when a committed checkpoint was changed.

    ``aggregation="gather"`` (the default) makes ``exfx.count_flops`` count exactly the linear layers;
    ``"sparse"`` computes the same outputs about 4x faster on CPU, but FLOP counters count its sparse
    matmuls as dense (n, n) matmuls (see :class:`exfx.examples.GCN`).
    """
    verify_checkpoint(path, TRAIN_COMMAND)
    checkpoint = torch.load(path, weights_only=True)
    model = GCN(aggregation=aggregation)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--graphs-per-epoch", type=int, default=None,
                        help="train each epoch on this many randomly drawn training graphs (default: all 55,000)")
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GCN()
    results = train(model, args.epochs, args.batch, args.lr, args.seed, args.graphs_per_epoch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), **results, "epochs": args.epochs, "seed": args.seed,
                "graphs_per_epoch": args.graphs_per_epoch or len(load_superpixels()["train"])}, args.out)
    logger.info("saved %s: %s", args.out, results)


if __name__ == "__main__":
    main()
