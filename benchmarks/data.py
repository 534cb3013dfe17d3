"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT licence).

Install the data with ``apt-get install dataset-fashion-mnist``; the files land in
``/usr/share/datasets/fashion-mnist/`` (override with ``EXFX_FASHION_MNIST``).
Nothing is downloaded.

Split (fixed): train 55,000 and validation 5,000, taken from the 60,000 training
images with a seeded permutation; test is the 10,000 official test images.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["FashionMNIST", "load_fashion_mnist", "batches", "to_float", "DATA_DIR", "SPLIT_SEED", "MEAN", "STD"]

DATA_DIR = Path(os.environ.get("EXFX_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SPLIT_SEED = 0
VALIDATION = 5_000
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip or plain): magic, dimensions, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (DATA_DIR / name).exists():
            return DATA_DIR / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem} not found in {DATA_DIR}; install Debian's "
                            f"dataset-fashion-mnist package or set EXFX_FASHION_MNIST")


@dataclass
class FashionMNIST:
    """uint8 images (N, 28, 28) and int64 labels per split."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_fashion_mnist() -> FashionMNIST:
    images = torch.from_numpy(_read_idx(_find("train-images-idx3-ubyte")).copy())
    labels = torch.from_numpy(_read_idx(_find("train-labels-idx1-ubyte")).astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[:VALIDATION], order[VALIDATION:]
    test_images = torch.from_numpy(_read_idx(_find("t10k-images-idx3-ubyte")).copy())
    test_labels = torch.from_numpy(_read_idx(_find("t10k-labels-idx1-ubyte")).astype(np.int64))
    return FashionMNIST(train=(images[train_idx], labels[train_idx]), val=(images[val_idx], labels[val_idx]),
                        test=(test_images, test_labels))


def to_float(images: torch.Tensor, pad_to: int = 28) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 1, pad_to, pad_to), zero-padded (in [0, 1] terms) to pad_to."""
    x = images.float().div(255.0).unsqueeze(1)
    if pad_to > x.shape[-1]:
        pad = (pad_to - x.shape[-1]) // 2
        x = torch.nn.functional.pad(x, (pad, pad_to - x.shape[-1] - pad) * 2)
    return (x - MEAN) / STD


def batches(images: torch.Tensor, labels: torch.Tensor, size: int, pad_to: int = 28
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The split as a list of (float inputs, labels) batches, in order."""
    return [(to_float(images[i:i + size], pad_to), labels[i:i + size]) for i in range(0, len(images), size)]
