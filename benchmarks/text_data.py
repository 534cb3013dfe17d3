"""Byte-level language-modelling data: the Python 3.11 documentation sources (reST).

The corpus is the ``*.rst.txt`` files that Debian's ``python3.11-doc`` package installs under
``/usr/share/doc/python3.11/html/_sources/`` (override the folder with ``EXFX_PYDOCS``). Install it with
``apt-get install python3.11-doc``. Nothing is downloaded.

Why bytes: a token is one byte (0..255), so the tokenizer needs no vocabulary file and no hub download, and
anyone with the same Debian package gets exactly the same token streams.

Split (fixed): the sorted file list is shuffled with ``SPLIT_SEED`` and whole files are dealt, in that order, to
train until it holds 90% of the bytes, then to validation until 95%, the rest to test. No file is shared between
splits. Within a split the files are concatenated in sorted path order.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import torch

__all__ = ["DATA_DIR", "SPLITS", "SPLIT_SEED", "VOCAB_SIZE", "lm_batches", "random_windows", "source_files",
           "split_files", "split_tokens"]

DATA_DIR = Path(os.environ.get("EXFX_PYDOCS", "/usr/share/doc/python3.11/html/_sources"))
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
FRACTIONS = (0.90, 0.95)  # cumulative byte shares closing train and validation; test takes the rest
VOCAB_SIZE = 256  # one token per byte value


def source_files(root: Path = DATA_DIR) -> list[Path]:
    """All ``*.rst.txt`` files under ``root``, sorted by their path relative to it."""
    paths = sorted(root.rglob("*.rst.txt"), key=lambda path: path.relative_to(root).as_posix())
    if not paths:
        raise FileNotFoundError(f"no *.rst.txt files under {root}; run `apt-get install -y python3.11-doc` "
                                f"or set EXFX_PYDOCS to a folder of reST sources")
    return paths


@functools.lru_cache(maxsize=None)
def split_files(root: Path = DATA_DIR, seed: int = SPLIT_SEED) -> dict[str, tuple[Path, ...]]:
    """Deal whole files to train/validation/test by a seeded shuffle, about 90/5/5 by bytes."""
    paths = source_files(root)
    order = list(paths)
    random.Random(seed).shuffle(order)
    total = sum(path.stat().st_size for path in order)
    splits: dict[str, list[Path]] = {name: [] for name in SPLITS}
    seen = 0
    for path in order:
        share = seen / total
        name = "train" if share < FRACTIONS[0] else "val" if share < FRACTIONS[1] else "test"
        splits[name].append(path)
        seen += path.stat().st_size
    rank = {path: i for i, path in enumerate(paths)}
    return {name: tuple(sorted(files, key=rank.__getitem__)) for name, files in splits.items()}


@functools.lru_cache(maxsize=None)
def split_tokens(split: str, root: Path = DATA_DIR) -> torch.Tensor:
    """The bytes of one split's files, concatenated in sorted path order, as a uint8 tensor."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data = b"".join(path.read_bytes() for path in split_files(root)[split])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def lm_batches(split: str, n_sequences: int, seq_len: int = 128,
               batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_sequences`` non-overlapping windows of a split, batched; targets are the next bytes.

    Window ``i`` reads bytes ``[i * seq_len, (i + 1) * seq_len)`` and predicts bytes shifted by one. Every batch
    holds ``batch_size`` sequences except possibly the last. Both tensors are int64 of shape (B, seq_len).
    """
    tokens = split_tokens(split)
    needed = n_sequences * seq_len + 1
    if n_sequences < 1 or needed > len(tokens):
        raise ValueError(f"{split} holds {len(tokens)} bytes, too few for {n_sequences} windows of {seq_len}")
    inputs = tokens[:n_sequences * seq_len].long().view(n_sequences, seq_len)
    targets = tokens[1:needed].long().view(n_sequences, seq_len)
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, n_sequences, batch_size)]


def random_windows(split: str, batch_size: int, seq_len: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows at uniformly random offsets of a split (for training); int64 (B, seq_len) each."""
    tokens = split_tokens(split)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len + 1)
    windows = tokens[index].long()
    return windows[:, :-1], windows[:, 1:]
