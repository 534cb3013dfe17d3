"""BPE language-modelling data: the Python documentation split of ``benchmarks.text_data``, in an 8k BPE vocabulary.

Why: the byte-level LM's head has 256 classes, too few for dominance prediction (``exfx.DominanceParams``) to have
work to do. This module trains a byte-level BPE tokenizer of ``VOCAB_SIZE`` tokens with the ``tokenizers`` library
on the *train* split only (same files as ``text_data.split_files``), keeps its JSON in
``benchmarks/checkpoints/bpe8k.json`` (committed with the model trained on it, and checked against
``benchmarks/checkpoints/MANIFEST.json`` when loaded), and serves the same window batches as ``text_data`` but over
token ids.

Special tokens take ids 0..3 (``<pad>``, ``<unk>``, ``<s>``, ``</s>``) so the OPT config's pad/bos/eos ids keep the
values of the byte-level model; no input uses them. Byte-level pre-tokenisation makes every text encodable, so
decode(encode(text)) == text. Rebuilding is repeatable in one environment, but ``tokenizers`` 0.23.3 rebuilds a
file that differs from the committed one (tied merges in another order from the 92nd merge on), so restore
``bpe8k.json`` from git rather than rebuilding it: ``opt-lm-bpe8k.pt`` was trained on the committed ids.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.manifest import verify_checkpoint
from benchmarks.text_data import DATA_DIR, SPLITS, split_files

__all__ = ["SPECIAL_TOKENS", "TOKENIZER_PATH", "VOCAB_SIZE", "load_tokenizer", "lm_batches", "random_windows",
           "split_tokens", "train_tokenizer"]

logger = logging.getLogger("benchmarks.bpe_data")

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
TOKENIZER_PATH = Path(__file__).parent / "checkpoints" / "bpe8k.json"


def _split_text(split: str, root: Path = DATA_DIR) -> str:
    """The split's files concatenated in sorted path order, decoded as UTF-8 (the reST sources are UTF-8)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return b"".join(path.read_bytes() for path in split_files(root)[split]).decode("utf-8", errors="replace")


def train_tokenizer(path: Path = TOKENIZER_PATH, vocab_size: int = VOCAB_SIZE) -> Any:
    """Train a byte-level BPE tokenizer on the train split's files and save its JSON to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = [str(file) for file in split_files()["train"]]
    tokenizer.train(files, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    logger.info("trained a %d-token BPE on %d train files; saved %s", tokenizer.get_vocab_size(), len(files), path)
    return tokenizer


@functools.lru_cache(maxsize=None)
def load_tokenizer(path: Path = TOKENIZER_PATH) -> Any:
    """The cached tokenizer, trained first if ``path`` does not exist (an existing committed one is verified)."""
    from tokenizers import Tokenizer

    if not path.exists():
        tokenizer = train_tokenizer(path)
        verify_checkpoint(path)  # a rebuilt committed tokenizer must match the manifest (see above)
        return tokenizer
    return Tokenizer.from_file(str(verify_checkpoint(path)))


@functools.lru_cache(maxsize=None)
def split_tokens(split: str) -> torch.Tensor:
    """One split's text encoded as one stream of token ids (int64)."""
    ids = load_tokenizer().encode(_split_text(split)).ids
    return torch.tensor(ids, dtype=torch.long)


def lm_batches(split: str, n_sequences: int, seq_len: int = 128,
               batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_sequences`` non-overlapping windows of a split, batched (as ``text_data.lm_batches``)."""
    tokens = split_tokens(split)
    needed = n_sequences * seq_len + 1
    if n_sequences < 1 or needed > len(tokens):
        raise ValueError(f"{split} holds {len(tokens)} tokens, too few for {n_sequences} windows of {seq_len}")
    inputs = tokens[:n_sequences * seq_len].view(n_sequences, seq_len)
    targets = tokens[1:needed].view(n_sequences, seq_len)
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, n_sequences, batch_size)]


def random_windows(split: str, batch_size: int, seq_len: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows at uniformly random offsets of a split (as ``text_data.random_windows``)."""
    tokens = split_tokens(split)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]
