"""One run per run directory.

- A lock (``.hcml-lock``, a POSIX record lock, which NFS supports) is held by rank 0 while it trains: a second
  run into a run dir in use is refused, and a crashed run leaves nothing stuck (the kernel drops the lock with the
  process).
- ``run.json`` names the job that owns the run dir (torchrun's run id): a torchrun restart of the same job resumes
  by itself, while a *new* job that starts fresh where another run left checkpoints is refused (``--resume auto``
  continues that run, ``--overwrite`` deletes it) instead of overwriting its history.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from hcml.errors import ConfigError
from hcml.files import FolderInUse, FolderLock, atomic_write_text, remove_own, remove_stale_temps

OWNER = "run.json"
SUMMARY = "summary.json"  # written by a run that ended (finished, or stopped by a signal)
RUN_FILES = ("checkpoints", "metrics.jsonl", SUMMARY, "curves.png", OWNER)


def current_job() -> str | None:
    """The job this process belongs to: torchrun's run id (the same on every node and across restarts), or None
    for a process started without torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable ({e.strerror}); choose another --run-dir") from None


class RunLock(FolderLock):
    """The run dir's ``FolderLock``, refused with the run dir's wording."""

    def acquire(self) -> "RunLock":
        try:
            return super().acquire()
        except FolderInUse as e:
            raise ConfigError(f"run_dir {e.folder} is in use by another run ({e.holder}); wait for it to end or "
                              f"choose another --run-dir") from None


def read_json(path: Path) -> dict:
    """A run file's JSON object, or {} where it is missing or unreadable."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def finished_with(summary: dict, config_sha256: str) -> bool:
    """Whether a run's summary says it ended without a stop signal under exactly this config (its fingerprint):
    a finished run that a restarted job, a resubmitted plan or a rerun study need not train again."""
    return summary.get("stopped_by_signal", 0) is None and summary.get("config_sha256") == config_sha256


def read_owner(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / OWNER)


def write_owner(run_dir: Path, resumed_from: str | None) -> None:
    atomic_write_text(Path(run_dir) / OWNER, json.dumps({
        "job": current_job(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "resumed_from": resumed_from}, indent=1))


def refuse_fresh_start(run_dir: Path, steps: list[int]) -> ConfigError:
    return ConfigError(f"run_dir {run_dir} holds another run's checkpoints (up to step {max(steps)}): pass "
                       f"--resume auto to continue it, --overwrite to delete it and start fresh, or choose another "
                       f"--run-dir")


def clear_run(run_dir: Path) -> None:
    """``--overwrite``: remove what a run writes (its config.yaml is rewritten anyway)."""
    remove_own(run_dir, RUN_FILES)


def preflight(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """What ``hcml train`` checks before starting any worker: writable, not in use, and no fresh start over
    another run's checkpoints; and it removes what a killed writer left half-written."""
    from hcml.launch.checkpoint import list_checkpoints, step_of

    check_writable(run_dir)
    RunLock(run_dir).acquire().release()
    remove_stale_temps(run_dir)  # e.g. a metrics-log trim or summary write cut short by kill -9
    steps = [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")]
    if resume is None and steps and not overwrite:
        raise refuse_fresh_start(run_dir, steps)
