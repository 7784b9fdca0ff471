"""``hcml export``: the inference network as a torch.export program that a fresh process loads with only
``hcml.ops`` imported, with the eager model's logits; the AOTInductor package likewise; bad arguments are one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, run_env

# A process that imports nothing of hcml but the op (asserted), loads the program and scores the saved inputs.
LOAD = """
import sys, torch
import hcml.ops
assert not [m for m in sys.modules if m.startswith(("hcml.model", "hcml.launch", "hcml.pipeline"))]
x = torch.load(sys.argv[2])
if sys.argv[3] == "aoti":
    from torch._inductor import aoti_load_package
    run = aoti_load_package(sys.argv[1])
else:
    extra = {"hcml.json": ""}
    run = torch.export.load(sys.argv[1], extra_files=extra).module()
    print(extra["hcml.json"])
torch.save({k: run(v) for k, v in x.items()}, sys.argv[4])
"""


def hcml(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hcml.launch.cli", *args], capture_output=True, text=True, env=run_env(),
                          timeout=timeout)


def eager_and_loaded(ckpt: Path, program: Path, tmp_path: Path, kind: str, batches, dtype=torch.float32):
    from hcml.launch.components import load_for_inference
    from hcml.model import Classifier

    tr = load_for_inference(str(ckpt))
    net = Classifier(tr.model).eval().to(dtype)
    T, S = tr.cfg.data.frames, tr.cfg.data.crop
    torch.manual_seed(0)
    xs = {f"b{b}": torch.randn(b, 3, T, S, S, dtype=dtype) for b in batches}
    torch.save(xs, tmp_path / "x.pt")
    r = subprocess.run([PY, "-c", LOAD, str(program), str(tmp_path / "x.pt"), kind, str(tmp_path / "y.pt")],
                       capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with torch.no_grad():
        ref = {k: net(v) for k, v in xs.items()}
    return ref, torch.load(tmp_path / "y.pt"), r.stdout, tr


def test_export_loads_in_a_fresh_process_with_the_eager_logits(trained_checkpoint, tmp_path):
    """float32, --dynamic-batch: batches 1 and 5 in a process with only hcml.ops imported give the eager model's
    logits (measured identical; tolerance 1e-4 relative); the file carries the class names and the input rule."""
    out = tmp_path / "model.pt2"
    r = hcml("export", "--checkpoint", str(trained_checkpoint), "--out", str(out), "--dynamic-batch")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max |exported - eager| 0" in r.stdout, r.stdout
    ref, got, meta, tr = eager_and_loaded(trained_checkpoint, out, tmp_path, "export", (1, 5))
    for k in ref:
        assert got[k].shape == ref[k].shape == (int(k[1:]), 4)
        assert torch.allclose(got[k], ref[k], atol=1e-4 * max(1.0, float(ref[k].abs().max())), rtol=0), k
    info = json.loads(meta)
    assert info["classes"] == tr.classes == ["move_left", "move_right", "appear", "disappear"]
    assert info["input"]["shape"] == ["B", 3, tr.cfg.data.frames, tr.cfg.data.crop, tr.cfg.data.crop]
    assert info["normalize"]["mean"] == list(tr.cfg.data.mean)
    graph = str(torch.export.load(out).graph)
    assert "hcml.cost_volume" in graph  # one custom-op node, not a trace of its implementation


def test_export_static_batch(trained_checkpoint, tmp_path):
    """Without --dynamic-batch the program takes batch 1 only (a batch of 2 is refused by its shape guard), at the
    --frames and --crop asked for."""
    out = tmp_path / "b1.pt2"
    r = hcml("export", "--checkpoint", str(trained_checkpoint), "--out", str(out), "--frames", "8", "--crop", "40")
    assert r.returncode == 0, r.stderr[-3000:]
    prog = torch.export.load(out).module()
    assert prog(torch.randn(1, 3, 8, 40, 40)).shape == (1, 4)
    with pytest.raises(Exception):
        prog(torch.randn(2, 3, 8, 40, 40))


@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process(trained_checkpoint, tmp_path):
    """--aoti compiles an AOTInductor package (CPU, the system C++ compiler); a process with hcml.ops imported runs
    it with the eager logits (measured 2e-8 apart)."""
    out, pkg = tmp_path / "model.pt2", tmp_path / "model_aoti.pt2"
    r = hcml("export", "--checkpoint", str(trained_checkpoint), "--out", str(out), "--aoti", str(pkg),
             "--dynamic-batch", "--frames", "8", "--crop", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert pkg.is_file() and not list(tmp_path.glob(".*tmp*"))
    ref, got, _, _ = eager_and_loaded(trained_checkpoint, pkg, tmp_path, "aoti", (2,))
    assert torch.allclose(got["b2"], ref["b2"], atol=1e-4, rtol=0)


def test_export_mistakes_are_one_line(trained_checkpoint, tmp_path):
    not_ckpt = tmp_path / "x.pt"
    not_ckpt.write_text("no")
    for args, says in ((["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx")], ".pt2 file"),
                       (["--checkpoint", str(not_ckpt), "--out", str(tmp_path / "m.pt2")], "corrupted or truncated"),
                       (["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.pt2")],
                        "checkpoint not found"),
                       (["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m.pt2"), "--frames", "2"],
                        "--frames 2"),
                       (["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m.pt2"), "--dtype",
                         "bfloat16"], "needs --device cuda")):
        r = hcml("export", *args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not list(tmp_path.glob("m.*"))
