"""What several test files share: the tiny training recipe, the loss log of a run, waiting for a step, finding,
freezing or killing a run's processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

# The data part of the tiny recipe (tiny network, 8 frames of 32 px, CPU DALI): enough for benches and loaders.
SMALL_DATA = ["model.arch=tiny", "data.frames=8", "data.stride=2", "data.crop=32", "data.short_side=[36,40]",
              "data.batch_size=2", "data.threads=1", "data.device=cpu"]
# The whole tiny training recipe on top of configs/demo.yaml: seconds per run on 2 CPU cores.
SMALL = [*SMALL_DATA, "data.eval_short_side=36", "data.eval_clips=1", "data.eval_crops=1", "data.flip=plain",
         "optim.epochs=2", "optim.warmup_epochs=1", "optim.lr_per_gpu=0.01", "train.bn=local", "train.log_every=1",
         "train.progress=false", "model.nce_samples=4", "checkpoint.keep=3"]


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of every logged training step of a run."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def wait_for_step(run: Path, step: int, proc: subprocess.Popen | None = None, log: Path | None = None,
                  timeout: float = 300) -> None:
    """Until the run has logged ``step``; fails at once if ``proc`` ends first (its log's tail in the message)."""
    deadline = time.time() + timeout
    while not ((run / "metrics.jsonl").is_file() and max(losses(run), default=0) >= step):
        if proc is not None:
            assert proc.poll() is None, log.read_text()[-3000:] if log else f"exited {proc.returncode}"
        assert time.time() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.05)


def freeze(pid: int, timeout: float = 10) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped. kill() returns while a thread running on
    another core still runs until the signal reaches it (CI saw a prepare rename its temp file after the signal
    was sent), so what a test looks at after this is what the frozen process left."""
    import signal

    os.kill(pid, signal.SIGSTOP)
    deadline = time.time() + timeout
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                states.append(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:  # the thread ended meanwhile
                continue
        if all(s in "TtZX" for s in states):
            return
        assert time.time() < deadline, f"process {pid} did not stop in {timeout} s (thread states {states})"
        time.sleep(0.001)


def processes_of(run: Path) -> list[int]:
    """Every live process whose command line names this run dir (launcher, torchrun, workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and str(run).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_all(run: Path) -> None:
    """SIGKILL every process naming ``run`` (torchrun starts workers in sessions of their own: a process group
    kill leaves them running)."""
    import signal

    for pid in processes_of(run):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended meanwhile
            pass
