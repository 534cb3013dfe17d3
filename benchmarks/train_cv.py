"""Train the CV benchmark models on Fashion-MNIST (train split only; validation picks nothing here).

Run:
    python -m benchmarks.train_cv --model small_cnn   # the demo CNN, bundled into exfx/data/
    python -m benchmarks.train_cv --model vgg11 --width 32
    python -m benchmarks.train_cv --model resnet18 --width 32

Checkpoints go to benchmarks/checkpoints/<model>-w<width>.pt, except the demo CNN, which is
written to exfx/data/small_cnn.pt. vgg11-w32.pt and resnet18-w16.pt are committed, with their
training commands and SHA-256 in benchmarks/checkpoints/MANIFEST.json; :func:`load_trained`
checks them against it (``benchmarks.manifest``). Training is seeded; on CPU, thread scheduling
can still change the last bits.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.data import load_fashion_mnist, to_float
from benchmarks.manifest import verify_checkpoint
from benchmarks.models import MODELS, build_model
from exfx.examples import SmallCNN

logger = logging.getLogger("benchmarks.train_cv")

CHECKPOINTS = Path(__file__).parent / "checkpoints"
DEMO_CHECKPOINT = Path(__file__).parent.parent / "exfx" / "data" / "small_cnn.pt"


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dx, dy = (int(v) for v in torch.randint(0, 5, (2,), generator=generator))
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, side: int, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((model(to_float(images[i:i + batch], side)).argmax(-1) == labels[i:i + batch]).sum())
    return correct / len(images)


def train(model: nn.Module, side: int, epochs: int, batch: int, lr: float, seed: int) -> dict[str, float]:
    data = load_fashion_mnist()
    images, labels = data.train
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(images) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        started, order = time.perf_counter(), torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch):
            index = order[i:i + batch]
            x = _augment(to_float(images[index], side), generator)
            loss = F.cross_entropy(model(x), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        val = accuracy(model, *data.val, side)
        logger.info("epoch %d/%d: loss %.4f, validation accuracy %.4f (%.0f s)", epoch + 1, epochs, loss.item(), val,
                    time.perf_counter() - started)
    model.eval()
    return {"val_accuracy": accuracy(model, *data.val, side), "test_accuracy": accuracy(model, *data.test, side)}


def load_trained(model: str, width: int) -> tuple[nn.Module, dict[str, Any]]:
    """The trained ``model`` of base ``width`` in eval mode, and its checkpoint's other entries (epochs, accuracy).

    Raises ``benchmarks.manifest.CheckpointMissingError`` (a FileNotFoundError naming the training command) when
    it is not trained yet, and ``CheckpointMismatchError`` when a committed checkpoint was changed.
    """
    path = CHECKPOINTS / f"{model}-w{width}.pt"
    verify_checkpoint(path, f"python -m benchmarks.train_cv --model {model} --width {width} --threads 1")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network = build_model(model, width)
    network.load_state_dict(checkpoint.pop("state_dict"))
    return network.eval(), checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small_cnn", *MODELS], required=True)
    parser.add_argument("--width", type=int, default=64, help="base width (ignored for small_cnn: 32)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model == "small_cnn":
        model, side, out = SmallCNN(), 28, DEMO_CHECKPOINT
    else:
        model, side = build_model(args.model, args.width), MODELS[args.model][1]
        out = CHECKPOINTS / f"{args.model}-w{args.width}.pt"
    results = train(model, side, args.epochs, args.batch, args.lr, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() and args.model == "small_cnn" else v
             for k, v in model.state_dict().items()}
    torch.save({"model": args.model, "width": args.width, "side": side, "state_dict": state, **results,
                "epochs": args.epochs, "seed": args.seed}, out)
    logger.info("saved %s: %s", out, results)


if __name__ == "__main__":
    main()
