"""Every subcommand and the mistakes users make with it: exit 2, one line on stderr naming the file, key or value
(and the fix), no traceback, nothing partial left behind. Tracebacks stay for bugs. Plus the contract that makes a
team's files shareable: everything hcml writes honours the umask, read back by a second user."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PY, run_env
from tests.helpers import SMALL


@pytest.fixture(scope="module")
def world(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """A trained tiny checkpoint on the 4-class tiny set, a 3-class set it does not fit, H.264 clips, a raw folder."""
    from hcml.pipeline import synth

    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    res = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset),
                          "--run-dir", str(run), *SMALL, "train.max_steps=1"], env=run_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    three = synth.generate(root / "three", classes=["move_left", "move_right", "move_up"], per_class=2,
                           val_per_class=1, size=48, frames=16, workers=1, progress=False)
    h264 = synth.generate(root / "h264", classes=["move_left"], per_class=1, val_per_class=1, size=48, frames=16,
                          codec="h264", workers=1, progress=False)
    raw = root / "raw"
    shutil.copytree(tiny_dataset / "train", raw)
    return {"data": tiny_dataset, "ckpt": next((run / "checkpoints").glob("ckpt_*.pt")), "run": run, "three": three,
            "h264_clip": next(h264.rglob("*.mp4")), "h264": h264, "raw": raw, "root": root}


# (name, argv with {placeholders}, regex the one stderr line must match, a path that must not exist afterwards)
CASES = [
    ("synth unknown class", "synth --out {tmp}/s --classes move_left,foo", r"unknown synthetic class\(es\) foo", "{tmp}/s/train.txt"),
    ("synth into another synth", "synth --out {data} --per-class 2", r"--out \S+ holds a synth with other settings.*--overwrite", None),
    ("synth into a folder of other files", "synth --out {raw}", r"--out \S+raw is not empty", None),
    ("synth zero per class", "synth --out {tmp}/s --per-class 0", r"--per-class: must be >= 1, got 0", "{tmp}/s"),
    ("prepare missing root", "prepare ucf101 --root {tmp}/nope --out {tmp}/o", r"--root \S+nope is not a directory", "{tmp}/o"),
    ("prepare unknown dataset", "prepare kinetics --root {tmp} --out {tmp}/o", r"argument dataset: invalid choice: 'kinetics'", "{tmp}/o"),
    ("prepare short side without re-encode", "prepare ucf101 --root {tmp} --out {tmp}/o --short-side 48", r"--short-side 48 needs --reencode", "{tmp}/o"),
    ("prepare lists without lists", "prepare lists --root {tmp} --out {tmp}/o", r"needs --train-list and --val-list", "{tmp}/o"),
    ("train raw video folder", "train --config demo --data {raw} --run-dir {tmp}/r", r"\S+raw is not a prepared dataset \(classes.txt missing\).*hcml prepare", "{tmp}/r"),
    ("train unknown recipe", "train --config nope", r"no config file 'nope' and no shipped recipe", None),
    ("train options before the command", "--config demo train", r"options go after the command: hcml train --config demo", None),
    ("train unknown key", "train --config demo --data {data} --run-dir {tmp}/r optim.lrr=1", r"unknown key 'optim.lrr'", "{tmp}/r"),
    ("train negative lr", "train --config demo --data {data} --run-dir {tmp}/r optim.lr_per_gpu=-0.1", r"optim.lr_per_gpu must be > 0, got -0.1", "{tmp}/r"),
    ("train h264 on the CPU reader", "train --config demo --data {h264} --run-dir {tmp}/r data.device=cpu data.batch_size=1", r"h264 videos cannot be decoded by DALI's CPU decoder.*--reencode vp9", "{tmp}/r"),
    ("train keyframe starts without a GOP", "train --config demo --data {data} --run-dir {tmp}/r data.keyframe_starts=true", r"data.keyframe_starts=true needs a fixed keyframe interval.*records none \(gop\).*--gop N", "{tmp}/r"),
    ("prepare GOP of zero", "prepare ucf101 --root {tmp} --out {tmp}/o --reencode h264 --gop 0", r"--gop: must be >= 1, got 0", "{tmp}/o"),
    ("train recipe with a blank", "train --config ucf101_r2d50_finetune --data {data} --run-dir {tmp}/r", r"model.init_from must be set", "{tmp}/r"),
    ("train resume another architecture", "train --config demo --data {data} --run-dir {tmp}/r --resume {ckpt} model.arch=r2d50 data.device=cpu", r"does not fit this model \(arch='tiny' here 'r2d50'\)", None),
    ("train over another run", "train --config demo --data {data} --run-dir {run}", r"holds another run's checkpoints.*--resume auto.*--overwrite", None),
    ("train restarts without torchrun", "train --config demo --data {data} --run-dir {tmp}/r --max-restarts 2", r"--max-restarts: only under torchrun; add --nproc-per-node N", "{tmp}/r"),
    ("train nodes without a rendezvous", "train --config demo --data {data} --run-dir {tmp}/r --nproc-per-node 1 --nnodes 2", r"--nnodes 2 needs --rdzv-endpoint HOST:PORT", "{tmp}/r"),
    ("train rendezvous without a job id", "train --config demo --data {data} --run-dir {tmp}/r --nproc-per-node 1 --nnodes 1:2 --rdzv-endpoint 127.0.0.1:29400", r"--rdzv-endpoint needs --rdzv-id ID: .*new for each job", "{tmp}/r"),
    ("eval a directory", "eval --checkpoint {run}/checkpoints", r"is a directory, not a checkpoint file; its newest checkpoint is \S+ckpt_", None),
    ("eval missing checkpoint", "eval --checkpoint {tmp}/nope.pt", r"checkpoint not found: \S+nope.pt", None),
    ("eval weights of other classes", "eval --checkpoint {ckpt} --data {three} --out {tmp}/e", r"does not fit this model.*fc.weight \(4, \d+\) vs \(3, \d+\)", "{tmp}/e"),
    ("eval a recipe of another model", "eval --checkpoint {ckpt} --config k400_r2d50_joint --data {data} --out {tmp}/e", r"does not fit this model \(arch='tiny' here 'r2d50'", "{tmp}/e"),
    ("eval sharded with a bad value", "eval --checkpoint {ckpt} --nproc-per-node 2 --out {tmp}/e data.eval_split=train", r"key 'data.eval_split' must be one of \('val', 'test'\), got 'train'", "{tmp}/e"),
    ("knn k zero", "knn --checkpoint {ckpt} --k 0", r"--k: must be >= 1, got 0", None),
    ("knn k above the training set", "knn --checkpoint {ckpt} --k 1000 --out {tmp}/k", r"--k 1000: needs 1 <= k <= the 24 training videos", "{tmp}/k"),
    ("gradcam missing video", "gradcam --checkpoint {ckpt} --videos {tmp}/nope.mp4 --out {tmp}/g", r"--videos \S+nope.mp4: missing", "{tmp}/g"),
    ("info zero frames", "info --frames 0", r"--frames: must be >= 1, got 0", None),
    ("bench op bad shape", "bench op --shape 1,3,5", r"--shape: expected B,C,H,W \(four positive integers\), got '1,3,5'", None),
    ("bench op d not a multiple of s", "bench op --d 5 --s 2", r"--d 5 must be a multiple of --s 2", None),
    ("bench op stride zero", "bench op --d 0 --s 0", r"--s: must be >= 1, got 0", None),
    ("bench model too few frames", "bench model --frames 4", r"--frames 4: a training step with the motion module needs >= 8", None),
    ("bench train zero steps", "bench train --data {data} --steps 0", r"--steps: must be >= 1, got 0", None),
    ("bench pipeline missing data", "bench pipeline --data {tmp}/nope", r"dataset directory not found: \S+nope", None),
    ("demo zero processes", "demo --nproc 0 --out {tmp}/d", r"--nproc: must be >= 1, got 0", "{tmp}/d"),
]


@pytest.mark.parametrize("name,argv,expect,absent", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(world, tmp_path, capfd, name, argv, expect, absent):
    """In process (the CLI's main, as the console script calls it; stderr read at the file descriptor)."""
    from hcml.launch.cli import main

    values = {**{k: str(v) for k, v in world.items()}, "tmp": str(tmp_path)}
    try:
        rc = main(argv.format(**values).split())
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert re.match(r"hcml( [a-z]+)*: error: ", lines[0]), lines[0]
    assert re.search(expect, lines[0]), lines[0]
    if absent:
        assert not Path(absent.format(**values)).exists()


def test_the_installed_entry_point_prints_one_line_too(world, tmp_path):
    """The same contract through a fresh interpreter (the console entry point), for one case per error source."""
    for argv in (["synth", "--out", str(tmp_path / "s"), "--per-class", "0"],
                 ["eval", "--checkpoint", str(world["run"] / "checkpoints")]):
        res = subprocess.run([PY, "-m", "hcml", *argv], env=run_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]


def test_version_and_bare_command_print_usage():
    from hcml import __version__

    for argv, out in ((["--version"], f"hcml {__version__}"), ([], "usage: hcml"), (["bench"], None)):
        res = subprocess.run([PY, "-m", "hcml", *argv], capture_output=True, text=True, timeout=60)
        if out is None:  # a command group without its target: one line naming the choices
            assert res.returncode == 2
            assert "required: what" in res.stderr
            assert len(res.stderr.splitlines()) == 1
        else:
            assert res.returncode == 0, res
            assert out in res.stdout, res


def test_a_quick_demo_says_it_is_a_smoke_test():
    from hcml.launch.demo import verdict

    assert verdict({"smoke_test": True})[0].startswith("SMOKE TEST (--quick)")


def test_gradcam_names_are_unique_for_clips_of_the_same_name():
    from hcml.launch.analysis import unique_stems

    names = unique_stems(["/d/train/a/x.webm", "/d/val/a/x.webm", "/d/val/b/y.webm"])
    assert names == {"/d/train/a/x.webm": "train_a_x", "/d/val/a/x.webm": "val_a_x", "/d/val/b/y.webm": "y"}
    names = unique_stems(["/d/cam.mp4", "/d/cam.webm", "/d/frames/12345", "/e/cam.mp4"])
    assert names == {"/d/cam.mp4": "d_cam.mp4", "/d/cam.webm": "cam.webm", "/d/frames/12345": "12345",
                     "/e/cam.mp4": "e_cam"}


def test_files_honour_the_umask_and_a_second_user_reads_them(tiny_dataset):
    """Under umask 022 every file hcml writes (dataset lists, dataset.yaml, videos, prepare's report, checkpoints,
    predictions, exported programs, the atomic temp-and-rename ones included) is 0644 and a different user can read it."""
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to read the files as a second user")
    shared = Path(tempfile.mkdtemp(prefix="hcml-shared-"))
    try:
        shared.chmod(0o755)
        env = run_env()
        umask = "umask 022 && "
        cmds = [f"{PY} -m hcml.launch.cli synth --out {shared}/synth --classes move_left,move_right --per-class 2 "
                f"--val-per-class 1 --size 48 --frames 16 --workers 1",
                f"{PY} -m hcml.launch.cli train --config demo --data {shared}/synth --run-dir {shared}/run "
                + " ".join(SMALL) + " data.batch_size=1 train.max_steps=1",
                f"ls {shared}/synth/train/*/*.webm | sed 's|{shared}/synth/||; s|$| 0|' > {shared}/list.txt && "
                f"{PY} -m hcml.launch.cli prepare lists --root {shared}/synth --train-list {shared}/list.txt "
                f"--val-list {shared}/list.txt --reencode vp9 --frames 4 --out {shared}/prepared",
                f"{PY} -m hcml.launch.cli predict --checkpoint {shared}/run/checkpoints/ckpt_00000001.pt "
                f"--dir {shared}/synth/val --out {shared}/predictions.csv",
                f"{PY} -m hcml.launch.cli export --checkpoint {shared}/run/checkpoints/ckpt_00000001.pt "
                f"--out {shared}/model.pt2"]
        for cmd in cmds:
            res = subprocess.run(["bash", "-c", umask + cmd], env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
        from hcml.files import atomic_write_text

        old = os.umask(0o022)
        try:
            atomic_write_text(shared / "report.txt", "x")
        finally:
            os.umask(old)
        files = [p for p in shared.rglob("*") if p.is_file() and not p.name.startswith(".hcml-lock")]
        assert any(p.suffix == ".pt" for p in files)
        assert any(p.name == "train.txt" for p in files)
        assert (shared / "prepared/report.json").is_file()
        assert (shared / "predictions.csv").is_file() and (shared / "model.pt2").is_file()
        assert list((shared / "prepared/videos").rglob("*.webm"))
        dirs = {str(p): oct(p.stat().st_mode & 0o777) for p in shared.rglob("*") if p.is_dir()
                and p.stat().st_mode & 0o777 != 0o755}
        assert not dirs, dirs
        wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o644}
        assert not wrong, wrong
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                              *map(str, files)], capture_output=True)
        assert res.returncode == 0, res.stderr.decode()[-1000:]
    finally:
        shutil.rmtree(shared)
