"""Train the language benchmark: a byte-level OPT decoder on the Python 3.11 documentation sources.

Run:
    python -m benchmarks.train_lm                  # 1,100 steps; about 22 minutes on one CPU thread
    python -m benchmarks.train_lm --steps 200      # a quick, weaker model
    python -m benchmarks.train_lm --tokenizer bpe8k --steps 3000 --batch-size 8   # 8k BPE vocabulary: the
                                                   # committed opt-lm-bpe8k.pt (test perplexity 77.4)

The model is ``transformers``' ``OPTForCausalLM`` with ReLU feed-forward layers (the architecture ExPrune
prunes), small enough to train on one CPU thread: tokens are bytes (see ``benchmarks.text_data``), so there is no
tokenizer download. Training samples random windows of the train split (AdamW, linear warmup then cosine decay,
seeded); validation and test are the first ``EVAL_SEQUENCES`` non-overlapping windows of their splits.

With ``--tokenizer bpe8k`` the tokens are an 8,192-entry byte-level BPE trained on the train split
(``benchmarks.bpe_data``), windows are 128 BPE tokens, and the checkpoint is ``opt-lm-bpe8k.pt``; its larger head
is the workload of dominance prediction (``benchmarks.dominance_head``).

The checkpoint goes to ``benchmarks/checkpoints/opt-lm.pt``; ``load_trained()`` returns the eval-mode
``LogitsOnly`` wrapper that exfx compiles. Both checkpoints are committed, with their training commands and
SHA-256 in ``benchmarks/checkpoints/MANIFEST.json``, which ``load_trained()`` checks them against. Training is
seeded; on CPU, thread scheduling can still change the last bits.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.manifest import verify_checkpoint
from benchmarks.text_data import VOCAB_SIZE, split_files, split_tokens

__all__ = ["BPE_CHECKPOINT", "CHECKPOINT", "EVAL_SEQUENCES", "TOKENIZERS", "LogitsOnly", "TrainSettings",
           "build_model", "evaluate", "load_trained", "main", "model_config", "next_token_accuracy", "perplexity",
           "train"]

logger = logging.getLogger("benchmarks.train_lm")

CHECKPOINT = Path(__file__).parent / "checkpoints" / "opt-lm.pt"
BPE_CHECKPOINT = Path(__file__).parent / "checkpoints" / "opt-lm-bpe8k.pt"
TOKENIZERS = ("byte", "bpe8k")
TRAIN_COMMAND = "python -m benchmarks.train_lm"
SEQ_LEN = 128
EVAL_SEQUENCES = 256  # per split: 256 windows x 128 bytes = 32,768 predicted bytes
EVAL_BATCH = 64


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; the defaults produce the committed benchmark numbers."""

    steps: int = 1100
    batch_size: int = 16
    seq_len: int = SEQ_LEN
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 200
    seed: int = 0
    tokenizer: str = "byte"


def _data_module(tokenizer: str) -> Any:
    """The module serving ``lm_batches``/``random_windows``/``VOCAB_SIZE`` for a tokenizer name."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if tokenizer == "bpe8k":
        from benchmarks import bpe_data

        return bpe_data
    from benchmarks import text_data

    return text_data


class LogitsOnly(nn.Module):
    """Calls a causal LM on ``input_ids`` alone and returns its logits (B, T, V), so exfx sees one plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def model_config(hidden: int = 256, layers: int = 6, heads: int = 4, seq_len: int = SEQ_LEN,
                 vocab_size: int = VOCAB_SIZE) -> Any:
    """An ``OPTConfig`` over ``vocab_size`` tokens (bytes by default), ReLU feed-forward layers ``4 * hidden`` wide.

    The special ids are control bytes (NUL, STX, ETX) that never occur in the reST sources; no input uses them
    (in the BPE vocabulary they are ``<pad>``, ``<s>``, ``</s>``, equally unused).
    """
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                     num_attention_heads=heads, max_position_embeddings=seq_len, word_embed_proj_dim=hidden,
                     activation_function="relu", dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                     pad_token_id=0, bos_token_id=2, eos_token_id=3)


def build_model(config: Any) -> nn.Module:
    """A freshly initialised ``OPTForCausalLM`` (i.i.d. initialisation, as ExPrune assumes)."""
    from transformers import OPTForCausalLM

    return OPTForCausalLM(config)


def next_token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of the next-token predictions over all positions."""
    return (logits.argmax(-1) == targets).float().mean().item()


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy over all positions."""
    return math.exp(F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten()).item())


def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(accuracy, perplexity) of ``model`` (input_ids -> logits) over all positions of all batches."""
    correct, loss, count = 0.0, 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            logits = model(inputs)
            n = targets.numel()
            correct += next_token_accuracy(logits, targets) * n
            loss += math.log(perplexity(logits, targets)) * n
            count += n
    return correct / count, math.exp(loss / count)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup over ``settings.warmup`` steps, then cosine decay to 10% of the peak."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def _optimiser(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or position embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_positions" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed_positions" in n]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def _step(wrapper: LogitsOnly, optimiser: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
          clip: float) -> float:
    """One optimisation step on a batch; returns the training loss."""
    loss = F.cross_entropy(wrapper(inputs).flatten(0, 1), targets.flatten())
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(wrapper.parameters(), clip)
    optimiser.step()
    return loss.item()


def train(wrapper: LogitsOnly, settings: TrainSettings) -> dict[str, float]:
    """Train in place on random train windows, logging validation metrics every ``eval_every`` steps."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimiser = _optimiser(wrapper, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, settings))
    data = _data_module(settings.tokenizer)
    val = data.lm_batches("val", EVAL_SEQUENCES, settings.seq_len, EVAL_BATCH)
    started, running = time.perf_counter(), 0.0
    for step in range(settings.steps):
        wrapper.train()
        inputs, targets = data.random_windows("train", settings.batch_size, settings.seq_len, generator)
        loss = _step(wrapper, optimiser, inputs, targets, settings.clip)
        schedule.step()
        running = loss if step == 0 else 0.98 * running + 0.02 * loss
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            wrapper.eval()
            accuracy, ppl = evaluate(wrapper, val)
            elapsed = time.perf_counter() - started
            logger.info("step %d/%d: train loss %.3f, val accuracy %.4f, val perplexity %.3f (%.0f s, %.2f s/step)",
                        done, settings.steps, running, accuracy, ppl, elapsed, elapsed / done)
    wrapper.eval()
    return {"train_seconds": time.perf_counter() - started}


def _final_metrics(wrapper: LogitsOnly, seq_len: int, tokenizer: str = "byte") -> dict[str, float]:
    """Validation and test accuracy and perplexity, and how long one validation pass takes."""
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        batches = _data_module(tokenizer).lm_batches(split, EVAL_SEQUENCES, seq_len, EVAL_BATCH)
        started = time.perf_counter()
        metrics[f"{split}_accuracy"], metrics[f"{split}_perplexity"] = evaluate(wrapper, batches)
        metrics[f"{split}_eval_seconds"] = time.perf_counter() - started
    return metrics


def load_trained(path: Path = CHECKPOINT) -> LogitsOnly:
    """The trained model as an eval-mode ``LogitsOnly`` wrapper (input_ids (B, T) int64 -> logits (B, T, V)).

    V is 256 for the byte-level checkpoint and 8,192 for ``BPE_CHECKPOINT``. A missing file raises a
    FileNotFoundError naming the training command, a changed committed one ``CheckpointMismatchError``
    (``benchmarks.manifest``).
    """
    verify_checkpoint(path, TRAIN_COMMAND + (" --tokenizer bpe8k" if path == BPE_CHECKPOINT else ""))
    from transformers import OPTConfig

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(OPTConfig.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return LogitsOnly(model).eval()


def _log_data() -> None:
    for split, files in split_files().items():
        logger.info("%s: %d files, %d bytes", split, len(files), len(split_tokens(split)))


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="byte",
                        help="byte (256 tokens, the default) or bpe8k (benchmarks.bpe_data)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint path (default: per tokenizer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _log_data()
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             warmup=min(defaults.warmup, max(1, args.steps // 10)), tokenizer=args.tokenizer)
    out = args.out or (BPE_CHECKPOINT if args.tokenizer == "bpe8k" else CHECKPOINT)
    config = model_config(args.hidden, args.layers, args.heads, vocab_size=_data_module(args.tokenizer).VOCAB_SIZE)
    wrapper = LogitsOnly(build_model(config))
    logger.info("OPT %d layers x %d wide, %d heads: %d parameters; %s", args.layers, args.hidden, args.heads,
                sum(p.numel() for p in wrapper.parameters()), settings)
    timing = train(wrapper, settings)
    metrics = _final_metrics(wrapper, settings.seq_len, settings.tokenizer)
    logger.info("trained in %.0f s; %s", timing["train_seconds"], {k: round(v, 4) for k, v in metrics.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.to_dict(), "state_dict": wrapper.model.state_dict(), "steps": settings.steps,
                "seed": settings.seed, "tokenizer": settings.tokenizer,
                **{k: v for k, v in metrics.items() if not k.endswith("_seconds")}}, out)
    logger.info("saved %s", out)


if __name__ == "__main__":
    main()
