"""Atomic, rotating checkpoints that load safely (``weights_only=True``) and skip truncated files."""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from hcml.errors import CheckpointError

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``ckpt_<step>.pt`` via temp file + fsync + rename, then keep only the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt_{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated and cannot be loaded ({type(e).__name__}: "
                              f"{str(e)[:200]})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an hcml checkpoint (no 'model' entry)")
    return state


def latest_valid(directory: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None
