"""The committed benchmark checkpoints match benchmarks/checkpoints/MANIFEST.json, and a changed or missing one
fails with a message naming the file and its training command.

The hashes are recomputed here from the JSON alone; the loaders' check (``benchmarks.manifest``) runs in a
subprocess on temporary copies, so this test imports neither torch models nor ``benchmarks``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
MANIFEST = CHECKPOINTS / "MANIFEST.json"
REQUIRED = ("bytes", "sha256", "command", "seed", "torch", "metrics")

#: Runs ``verify_checkpoint(path, manifest=...)`` and prints the outcome's class name and message on one line each.
VERIFY = """
import sys
from pathlib import Path
from benchmarks.manifest import verify_checkpoint
try:
    verify_checkpoint(Path(sys.argv[1]), manifest=Path(sys.argv[2]))
    print("ok")
except Exception as err:
    print(type(err).__name__)
    print(err)
"""


def _manifest() -> dict[str, dict]:
    return json.loads(MANIFEST.read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(path: Path, manifest: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EXFX_UNVERIFIED_CHECKPOINTS", None)
    done = subprocess.run([sys.executable, "-c", VERIFY, str(path), str(manifest)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()


def test_manifest_lists_the_committed_checkpoints() -> None:
    manifest = _manifest()
    assert {"vgg11-w32.pt", "resnet18-w16.pt", "gcn-h300.pt", "opt-lm.pt", "opt-lm-bpe8k.pt",
            "bpe8k.json"} <= set(manifest)
    for name, entry in manifest.items():
        assert all(key in entry for key in REQUIRED), name
        assert entry["command"].startswith("python "), name


@pytest.mark.parametrize("name", sorted(_manifest()))
def test_checkpoint_matches_manifest(name: str) -> None:
    entry, path = _manifest()[name], CHECKPOINTS / name
    assert path.is_file(), f"{path} is missing; train it with `{entry['command']}`"
    assert path.stat().st_size == entry["bytes"], name
    assert _sha256(path) == entry["sha256"], name


@pytest.fixture
def copy_dir(tmp_path: Path) -> tuple[Path, Path, dict]:
    """The manifest and its smallest file, copied to ``tmp_path``: (file, manifest, its entry)."""
    manifest = _manifest()
    name = min(manifest, key=lambda n: manifest[n]["bytes"])
    shutil.copy(MANIFEST, tmp_path / MANIFEST.name)
    shutil.copy(CHECKPOINTS / name, tmp_path / name)
    return tmp_path / name, tmp_path / MANIFEST.name, manifest[name]


def test_verify_accepts_an_intact_copy(copy_dir: tuple[Path, Path, dict]) -> None:
    path, manifest, _ = copy_dir
    assert _verify(path, manifest) == ["ok"]


def test_corrupted_checkpoint_names_file_and_command(copy_dir: tuple[Path, Path, dict]) -> None:
    path, manifest, entry = copy_dir
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    kind, message = _verify(path, manifest)
    assert kind == "CheckpointMismatchError"
    assert path.name in message and entry["command"] in message and entry["sha256"] in message


def test_missing_checkpoint_is_one_line_naming_the_command(copy_dir: tuple[Path, Path, dict]) -> None:
    path, manifest, entry = copy_dir
    path.unlink()
    kind, message = _verify(path, manifest)
    assert kind == "CheckpointMissingError"
    assert path.name in message and entry["command"] in message
