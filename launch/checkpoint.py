"""Atomic, rotating checkpoints that load safely (``weights_only=True``) and skip truncated files."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from hcml.errors import CheckpointError, HCMLError
from hcml.files import atomic_write, remove_stale_temps

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``ckpt_<step>.pt`` via temp file + fsync + rename, then keep only the newest ``keep`` (and remove the
    temp file of a write that a kill -9 cut short: it is as large as a checkpoint)."""
    directory = Path(directory)
    path = directory / f"ckpt_{step:08d}.pt"
    try:
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
    except HCMLError as e:  # a full disk or a read-only mount: the earlier checkpoints are intact
        raise CheckpointError(f"checkpoint at step {step} not saved: {e}") from None
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)
    remove_stale_temps(directory)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def step_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        hint = f"; its newest checkpoint is {found[-1]}" if found else " with no ckpt_*.pt in it"
        raise CheckpointError(f"{path} is a directory, not a checkpoint file{hint}")
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
