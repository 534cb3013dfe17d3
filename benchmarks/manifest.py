"""The committed benchmark checkpoints and their manifest (``benchmarks/checkpoints/MANIFEST.json``).

Why: the benchmark numbers are only evidence if the weights behind them are the committed ones. The manifest
records, for each committed file, its size, SHA-256, the command that trained it, its seed, the torch version and
the metrics stored in it. The loaders call :func:`verify_checkpoint` before reading a file: a file that differs
from the manifest raises :class:`CheckpointMismatchError` (naming the file and its training command), and a missing
one raises :class:`CheckpointMissingError`, a ``FileNotFoundError`` whose message is one line a benchmark can log as
its skip reason.

Only files in the committed folder are checked; a checkpoint written elsewhere (``--out``, ``--checkpoint``) is
loaded as it is. Set ``EXFX_UNVERIFIED_CHECKPOINTS=1`` to load a retrained file in place of a committed one
(mismatches are then logged as warnings).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT_DIR", "MANIFEST", "UNVERIFIED_ENV", "CheckpointMismatchError", "CheckpointMissingError",
           "ManifestEntry", "load_manifest", "sha256_file", "training_command", "verify_checkpoint"]

logger = logging.getLogger("benchmarks.manifest")

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "MANIFEST.json"
UNVERIFIED_ENV = "EXFX_UNVERIFIED_CHECKPOINTS"


@dataclass(frozen=True)
class ManifestEntry:
    """One committed file: its size, SHA-256, training command, seed, torch version and stored metrics."""

    name: str
    bytes: int
    sha256: str
    command: str
    seed: int | None = None
    torch: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _shown(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it, for commands in messages."""
    try:
        return path.resolve().relative_to(CHECKPOINT_DIR.parent.parent).as_posix()
    except ValueError:
        return str(path)


class CheckpointMissingError(FileNotFoundError):
    """A checkpoint file is missing; ``str(err)`` is one line naming the file and the command that trains it."""

    def __init__(self, path: Path, command: str) -> None:
        super().__init__(f"{_shown(path)} is missing; train it with `{command}`")
        self.path, self.command = path, command


class CheckpointMismatchError(RuntimeError):
    """A checkpoint file's size or SHA-256 differs from the manifest."""

    def __init__(self, path: Path, entry: ManifestEntry, actual_sha256: str, actual_bytes: int) -> None:
        super().__init__(
            f"{_shown(path)} does not match {MANIFEST.name}: SHA-256 {actual_sha256} ({actual_bytes} bytes), expected "
            f"{entry.sha256} ({entry.bytes} bytes); restore the committed file (`git checkout -- {_shown(path)}`) or "
            f"retrain it with `{entry.command}` and set {UNVERIFIED_ENV}=1 to load your own")
        self.path, self.entry = path, entry


@functools.lru_cache(maxsize=None)
def load_manifest(path: Path = MANIFEST) -> dict[str, ManifestEntry]:
    """File name -> its :class:`ManifestEntry` (empty when the manifest itself is absent)."""
    if not path.exists():
        logger.warning("no checkpoint manifest at %s; checkpoints are not verified", path)
        return {}
    raw: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return {name: ManifestEntry(name=name, bytes=int(e["bytes"]), sha256=e["sha256"], command=e["command"],
                                seed=e.get("seed"), torch=e.get("torch"), metrics=dict(e.get("metrics", {})))
            for name, e in raw.items()}


def training_command(name: str, default: str) -> str:
    """The manifest's training command for the committed file ``name``, else ``default``."""
    entry = load_manifest().get(name)
    return entry.command if entry else default


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _entry_for(path: Path, manifest: Path) -> ManifestEntry | None:
    """The manifest entry of ``path`` when it lies in the manifest's folder, else None."""
    if path.resolve().parent != manifest.resolve().parent:
        return None
    return load_manifest(manifest).get(path.name)


def verify_checkpoint(path: Path, command: str = "", manifest: Path = MANIFEST) -> Path:
    """Check ``path`` against the manifest before it is loaded, and return it.

    Raises :class:`CheckpointMissingError` when the file does not exist (its message names the manifest's training
    command, else ``command``), and :class:`CheckpointMismatchError` when a file listed in the manifest has another
    size or SHA-256. Files the manifest does not list are returned unchecked.
    """
    entry = _entry_for(path, manifest)
    if not path.exists():
        raise CheckpointMissingError(path, entry.command if entry else command or "its training command")
    if entry is None:
        logger.debug("%s is not in the checkpoint manifest; loaded unverified", path)
        return path
    size = path.stat().st_size
    digest = sha256_file(path)
    if size != entry.bytes or digest != entry.sha256:
        error = CheckpointMismatchError(path, entry, digest, size)
        if os.environ.get(UNVERIFIED_ENV) == "1":
            logger.warning("%s (loading it anyway: %s=1)", error, UNVERIFIED_ENV)
            return path
        raise error
    logger.debug("%s matches the manifest (sha256 %s)", path, digest)
    return path
