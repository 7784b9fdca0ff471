"""Shared fixtures: a tiny synthetic VP9 dataset (made once per session), a small real filesystem, GPU markers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible on this machine)")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """4 synthetic classes × 6 train / 3 val VP9 clips of 32 frames at 64 px."""
    from hcml.pipeline import synth

    out = tmp_path_factory.mktemp("synth")
    return synth.generate(out, classes=["move_left", "move_right", "appear", "disappear"], per_class=6,
                          val_per_class=3, seed=1, workers=2, progress=False)


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny model trained 4 epochs on the tiny set (its predictions differ per video): predict and export."""
    from tests.helpers import SMALL

    run = tmp_path_factory.mktemp("trained") / "run"
    r = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset),
                        "--run-dir", str(run), *SMALL, "optim.epochs=4"], capture_output=True, text=True,
                       env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]


def run_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["HCML_THREADS"] = "1"
    return env


PY = sys.executable


@pytest.fixture()
def tmpfs(tmp_path):
    """A real small filesystem mounted for the test (read-only or nearly full), unmounted after it."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root with CAP_SYS_ADMIN")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)])
