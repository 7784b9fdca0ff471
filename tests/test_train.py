"""The driver end to end on CPU: torchrun (gloo, 2 processes), checkpoints, resume, signals, NaN guard.

These CPU/gloo runs use per-process BN (train.bn=local) unless a test says otherwise; the SyncBN path
is exercised by the GPU check script.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hcml import files
from hcml.errors import CheckpointError
from hcml.launch.checkpoint import latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from hcml.launch.rundir import preflight
from tests.conftest import PY, run_env
from tests.helpers import SMALL, kill_all, losses, wait_for_step


def train_cmd(data: Path, run_dir: Path, *extra: str, nproc: int = 2, resume: bool = False) -> list[str]:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "hcml.launch.cli",
           "train", "--config", "demo", "--data", str(data), "--run-dir", str(run_dir), *SMALL, *extra]
    if resume:
        cmd += ["--resume", "auto"]
    return cmd


@pytest.mark.slow
def test_two_process_run_writes_the_run_directory(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(train_cmd(tiny_dataset, run, "train.max_steps=4", "checkpoint.every_steps=2"),
                         capture_output=True, text=True, env=run_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "config.yaml").is_file()
    assert (run / "metrics.jsonl").is_file()
    assert (run / "curves.png").is_file()
    ck = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ck] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    state = load_checkpoint(ck[-1])
    assert state["step"] == 4
    assert len(state["per_rank"]) == 2
    assert state["config"]["model"]["arch"] == "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["videos"] == 12
    assert 0 <= summary["eval"]["top1"] <= 100
    assert "world=2" in res.stdout
    # the reported evaluation is the checkpoint's: `hcml eval` of it, sharded the same way, gives the same
    # predictions (with per-process BN, rank 1 would otherwise score its own running statistics, not the saved ones)
    ev = subprocess.run([PY, "-m", "hcml.launch.cli", "eval", "--checkpoint", str(ck[-1]), "--nproc-per-node", "2",
                         "--out", str(tmp_path / "eval")], capture_output=True, text=True, env=run_env(), timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["predictions"] == summary["eval"]["predictions"]
    assert report["top1"] == summary["eval"]["top1"]


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_reproduces_the_uninterrupted_losses(tiny_dataset, tmp_path):
    """Deterministic CPU mode: 2-process run killed with SIGKILL after a mid-epoch checkpoint, resumed with
    --resume auto; the loss at every later step equals the uninterrupted run's."""
    det = ["train.deterministic=true", "checkpoint.every_steps=3", "train.max_steps=9"]
    ref = tmp_path / "ref"
    r = subprocess.run(train_cmd(tiny_dataset, ref, *det), capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_losses = losses(ref)
    assert len(ref_losses) == 9  # 12 samples / 2 ranks / batch 2 = 3 steps per epoch → epochs end at 3, 6, 9

    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_dataset, run, *det), env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # kill every process of the run (workers included) after the step-4 line is logged, i.e. mid-epoch 1, with the
    # step-3 checkpoint on disk
    wait_for_step(run, 4, proc)
    kill_all(run)
    proc.wait()
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] in ("ckpt_00000003.pt", "ckpt_00000006.pt")
    assert not (run / "summary.json").exists()  # the run did not finish
    r = subprocess.run(train_cmd(tiny_dataset, run, *det, resume=True), capture_output=True, text=True,
                       env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resume]" in r.stdout
    resumed = losses(run)
    for step in range(4, 10):
        assert resumed[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-6), step


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset),
                             "--run-dir", str(run), *SMALL, "optim.epochs=50"], env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "signal 15: checkpoint written" in out
    found = latest_valid(run / "checkpoints")
    assert found is not None
    assert found[1]["step"] >= 2
    assert not json.loads((run / "summary.json").read_text()).get("eval")


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_term(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    res = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset),
                          "--run-dir", str(run), *SMALL, "optim.lr_per_gpu=1e30", "optim.warmup_epochs=0",
                          "optim.name=sgd"], capture_output=True, text=True, env=run_env(), timeout=600)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite loss at step" in res.stderr
    assert "last good checkpoint" in res.stderr


def test_checkpoints_are_atomic_rotating_and_validated(tmp_path):
    d = tmp_path / "ck"
    for step in (1, 2, 3, 4):
        save_checkpoint(d, step, {"model": {"w": torch.ones(2) * step}, "step": step}, keep=2)
    assert [p.name for p in list_checkpoints(d)] == ["ckpt_00000003.pt", "ckpt_00000004.pt"]
    assert [p.name for p in d.iterdir() if not p.name.startswith("ckpt_")] == []  # no temp file left behind
    newest = list_checkpoints(d)[-1]
    newest.write_bytes(newest.read_bytes()[:40])  # truncate the newest
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        path, state = latest_valid(d)
    assert path.name == "ckpt_00000003.pt"
    assert state["step"] == 3
    (d / "ckpt_00000009.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt_00000009.pt"):
        load_checkpoint(d / "ckpt_00000009.pt")


def test_a_save_removes_the_temp_file_of_a_killed_save_and_only_that(tmp_path):
    """A kill -9 mid-save leaves a checkpoint-sized temp file; the next save removes it, but never the temp file of a
    writer that still runs (this process) or that runs on another host (unknowable from here)."""
    d = tmp_path / "ck"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files.temp_prefix("x").split("-")[1]
    killed = d / f".tmp-{host}-{dead.pid}-ckpt_00000002.pt.k2x9"
    kept = [d / f".tmp-{host}-{os.getpid()}-ckpt_00000002.pt.a1b2", d / f".tmp-otherhost-{dead.pid}-ckpt_00000002.pt.z",
            d / "notes.txt"]
    for p in (killed, *kept):
        p.write_bytes(b"x" * 100)
    save_checkpoint(d, 3, {"model": {}, "step": 3})
    assert not killed.exists()
    assert all(p.exists() for p in kept)
    top = tmp_path / f".tmp-{host}-{dead.pid}-metrics.jsonl.q1"  # the run dir's own files: swept before a start
    top.write_text("x")
    preflight(tmp_path, "auto", False)
    assert not top.exists()
    assert files.temp_prefix(d / "ckpt_00000003.pt") == f".tmp-{host}-{os.getpid()}-ckpt_00000003.pt"


def test_a_file_system_without_locks_warns_and_goes_on_while_a_held_lock_refuses(tmp_path, monkeypatch):
    """Lustre mounted without flock or a FUSE mount answers lockf with ENOSYS/ENOLCK: that is not "in use" (which
    would refuse every run there); only EAGAIN/EACCES, a lock held by another process, refuses."""
    import errno
    import fcntl

    def lockf(err):
        def f(fd, op):
            raise OSError(err, os.strerror(err))
        return f

    for err in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
        monkeypatch.setattr(fcntl, "lockf", lockf(err))
        with pytest.warns(UserWarning, match="does not support locks"):
            files.FolderLock(tmp_path).acquire().release()
    for err in (errno.EAGAIN, errno.EACCES):
        monkeypatch.setattr(fcntl, "lockf", lockf(err))
        with pytest.raises(files.FolderInUse):
            files.FolderLock(tmp_path).acquire()


def test_eval_cli_rejects_a_corrupted_checkpoint(tmp_path):
    bad = tmp_path / "ckpt_00000001.pt"
    bad.write_bytes(b"\x80\x02garbage")
    res = subprocess.run([PY, "-m", "hcml.launch.cli", "eval", "--checkpoint", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert "corrupted or truncated" in res.stderr


def test_lr_schedule_warmup_then_cosine():
    from hcml.launch.components import lr_at

    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tiny_dataset, tmp_path):
    """Preemption may signal one worker only: the ranks agree (all-reduce) and checkpoint together."""
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_dataset, run, "optim.epochs=50"), env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 2, proc)
    # the workers, by command line (torchrun may have other children, e.g. multiprocessing's resource tracker)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "hcml.launch.cli"], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "checkpoint written" in out
    found = latest_valid(run / "checkpoints")
    assert found is not None
    assert len(found[1]["per_rank"]) == 2


@pytest.mark.slow
def test_a_restart_of_the_same_job_resumes_and_a_new_job_never_overwrites_the_run(tiny_dataset, tmp_path):
    """Workers that torchrun restarts (same job: TORCHELASTIC_RUN_ID as recorded in run.json; the restart count may
    be 0 on a node whose workers restart because another node rejoined) continue from the newest checkpoint without
    --resume. A new job starting fresh in that run dir is refused, one line, leaving every file as it was;
    --overwrite replaces the run."""
    run = tmp_path / "run"
    cmd = [PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset), "--run-dir",
           str(run), *SMALL, "checkpoint.every_steps=3"]

    def train(max_steps, job, *extra, rc=0):
        env = {**run_env(), "TORCHELASTIC_RUN_ID": job, "LOCAL_RANK": "0"}  # as torchrun sets them
        res = subprocess.run([*cmd, f"train.max_steps={max_steps}", *extra], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == rc, res.stderr[-2000:]
        return res

    train(3, "job-1")
    assert json.loads((run / "run.json").read_text())["job"] == "job-1"
    out = train(6, "job-1").stdout  # the same job again: a restart
    assert re.search(r"\[resume\] \S+ckpt_00000003\.pt: epoch \d+, step 3", out), out[-2000:]
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    def files():  # the run's files (the lock file says who holds the lock: not the run's)
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".hcml-lock"}

    before = files()
    res = train(7, "job-2", rc=2)  # a new job, fresh: refused before anything is written
    assert res.stderr.strip().splitlines() == [
        f"hcml train: error: run_dir {run} holds another run's checkpoints (up to step 6): pass --resume auto to "
        "continue it, --overwrite to delete it and start fresh, or choose another --run-dir"]
    assert before == files()
    fresh = train(2, "job-2", "--overwrite").stdout
    assert "[resume]" not in fresh
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt_00000002.pt"]


@pytest.mark.slow
def test_bad_settings_are_one_line_and_exit_2_before_and_under_torchrun(tiny_dataset, tmp_path):
    """A batch larger than the data is caught by `hcml train --nproc-per-node` before torchrun starts; inside
    workers of a user's own torchrun (here: a GPU reader asked for on a CPU machine) every worker prints one line
    and exits 2, with no traceback from hcml's code."""
    from tests.conftest import REPO

    base = [PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset), "--run-dir",
            str(tmp_path / "run"), *SMALL]
    r = subprocess.run([*base, "--nproc-per-node", "2", "data.batch_size=64"], capture_output=True, text=True,
                       env=run_env(), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"hcml train: error: 24 training videos in {tiny_dataset} cannot fill one batch of data.batch_size=64 on "
        "each of 2 process(es); lower data.batch_size to at most 12"]
    r = subprocess.run(train_cmd(tiny_dataset, tmp_path / "run2", "data.device=gpu"), capture_output=True, text=True,
                       env=run_env(), timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hcml train")]
    assert sorted(lines) == ["hcml train (rank 1): error: data.device=gpu but no CUDA device is visible; use "
                             "data.device=cpu (VP9/VP8 data)",
                             "hcml train: error: data.device=gpu but no CUDA device is visible; use data.device=cpu "
                             "(VP9/VP8 data)"]
    assert "exitcode  : 2" in r.stderr
    assert not re.search(rf'File "{re.escape(str(REPO))}/(launch|pipeline|model|ops)/', r.stderr), r.stderr[-3000:]


@pytest.mark.slow
def test_metrics_log_belongs_to_one_run(tiny_dataset, tmp_path):
    """A second fresh run into the same directory starts an empty metrics.jsonl (no appended first run); a resumed
    run keeps the records up to its checkpoint and re-logs the steps after it (each step once)."""
    run = tmp_path / "run"
    cmd = [PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset), "--run-dir",
           str(run), *SMALL, "checkpoint.every_steps=2", "data.eval_clips=1"]
    for extra in ([], ["--overwrite"]):
        r = subprocess.run([*cmd, "train.max_steps=5", *extra], capture_output=True, text=True, env=run_env(),
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 5], steps  # 5 train records + the final eval
    (run / "checkpoints" / "ckpt_00000005.pt").unlink()  # the newest left is step 4
    r = subprocess.run([*cmd, "train.max_steps=6", "--resume", "auto"], capture_output=True, text=True,
                       env=run_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [6]


def test_a_signal_that_lands_during_the_agreement_is_kept(monkeypatch):
    """The handler may run while the all-reduce of the stop flags blocks; that signal must stop the next step,
    not be overwritten by the (older) agreed value."""
    from hcml.launch import train as T
    from hcml.launch.distributed import DistInfo

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = T._StopSignal()

        def all_reduce_while_signalled(t, info):
            stop._handle(signal.SIGTERM, None)
            return t

        monkeypatch.setattr(T, "all_reduce_max", all_reduce_while_signalled)
        assert stop.agreed(DistInfo()) is None  # this step's flag was read before the signal came
        assert stop.agreed(DistInfo()) == signal.SIGTERM  # so the next step stops
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_a_video_that_broke_after_prepare_costs_its_clip_not_the_run(tiny_dataset, tmp_path):
    """One training video overwritten with garbage after prepare: the 2-process run runs every step of both epochs
    (the video is replaced in its batch, the batch stays full), names the file once, and counts the replacements
    over both ranks in metrics.jsonl and summary.json (and the Prometheus counter, test_metrics)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    broken = data / (data / "train.txt").read_text().split()[0]
    broken.write_bytes(b"not a video" * 100)
    run = tmp_path / "run"
    res = subprocess.run(train_cmd(data, run, "train.max_steps=8"), capture_output=True, text=True, env=run_env(),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    named = [ln for ln in res.stdout.splitlines() if "replaced by the next video of its shard" in ln]
    assert 1 <= len(named) <= 2 and len({ln.split()[2] for ln in named}) == len(named)  # once per rank that met it
    assert all(ln.count(broken.name) == 1 and "cannot be decoded" in ln for ln in named)
    summary = json.loads((run / "summary.json").read_text())
    # 24 videos / 2 ranks / batch 2 → 6 full steps in epoch 0 whatever breaks, then 2 of epoch 1 up to step 8
    assert summary["step"] == 8
    assert summary["epoch"] == 1
    assert summary["samples_skipped"] in (1, 2)  # once in epoch 0; in epoch 1 if its slot came up (or was planned)
    logged = [r["samples_skipped"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(logged) == 8 and logged == sorted(logged) and logged[5] >= 1 and logged[-1] <= summary["samples_skipped"]


@pytest.mark.slow
def test_global_bn_trains_on_cpu_with_two_processes(tiny_dataset, tmp_path):
    """train.bn=global on gloo: the model's BatchNorms become GlobalBatchNorm and the run trains (equality with one
    process holding the whole batch: tests/test_global_bn.py); with metrics.tensorboard=true its curves are
    metrics.jsonl's."""
    run = tmp_path / "run"
    res = subprocess.run(train_cmd(tiny_dataset, run, "train.max_steps=3", "train.bn=global",
                                   "metrics.tensorboard=true"), capture_output=True, text=True, env=run_env(),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[bn] global BN via hcml's GlobalBatchNorm" in res.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    # metrics.tensorboard=true: rank 0's curves, with the steps and values of metrics.jsonl
    from tests.test_metrics import _events

    ev = _events(run / "tensorboard")
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [(s, round(v, 4)) for s, v in ev["train/loss"]] == [(r["step"], round(r["loss"], 4)) for r in train]
    assert {"train/lr", "train/clips_per_s", "train/data_wait_ratio", "train/samples_skipped", "eval/top1",
            "eval/top5"} <= set(ev)


@pytest.mark.slow
def test_a_plan_runs_each_training_exactly_as_hcml_train_alone(tiny_dataset, tmp_path):
    """`hcml train --plan` (SSL, then joint from its newest checkpoint, in one process group) gives the joint run
    the same losses and evaluation, bit for bit, as `hcml train` run alone from that checkpoint: sharing the
    process group changes no seed, no data order, no step."""
    from hcml.launch.plan import PlanEntry, write_plan

    common = [f"data.root={tiny_dataset}", *SMALL, "train.max_steps=3"]
    ssl, joint = tmp_path / "plan" / "ssl", tmp_path / "plan" / "joint"
    plan = write_plan(tmp_path / "plan.json", [
        PlanEntry("ssl", "demo", [*common, f"run_dir={ssl}", "train.phase=ssl"]),
        PlanEntry("joint", "demo", [*common, f"run_dir={joint}"], init_from_run=str(ssl))])
    r = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--plan", str(plan), "--nproc-per-node", "2"],
                       capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[plan] 1/2 ssl" in r.stdout and "[plan] 2/2 joint" in r.stdout
    init = list_checkpoints(ssl / "checkpoints")[-1]
    assert "[init] loaded" in r.stdout and str(init) in r.stdout  # the joint run started from the SSL weights
    alone = tmp_path / "alone"
    a = subprocess.run(train_cmd(tiny_dataset, alone, "train.max_steps=3", f"model.init_from={init}"),
                       capture_output=True, text=True, env=run_env(), timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]
    assert len(losses(joint)) == 3
    assert losses(joint) == losses(alone)
    planned, single = (json.loads((d / "summary.json").read_text()) for d in (joint, alone))
    assert planned["eval"]["predictions"] == single["eval"]["predictions"]
    assert planned["seconds"] > 0


def test_a_malformed_plan_is_one_clear_error(tmp_path):
    from hcml.errors import ConfigError
    from hcml.launch.plan import load_plan

    def err(doc) -> str:
        p = tmp_path / "plan.json"
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(ConfigError) as e:
            load_plan(p)
        return str(e.value)

    one = {"name": "a", "config": "demo", "overrides": [f"run_dir={tmp_path / 'a'}"]}
    assert "not valid JSON" in err("{runs: [")
    assert "at least one entry" in err({"runs": []})
    assert "unknown key(s) ['resume']" in err({"runs": [{**one, "resume": "auto"}]})
    assert "entry 0: missing ['config']" in err({"runs": [{"name": "a"}]})
    assert "list of key=value strings" in err({"runs": [{**one, "overrides": "x=1"}]})
    assert "entry 1 (b): init_from_run" in err({"runs": [one, {**one, "name": "b", "init_from_run": str(tmp_path / "c"),
                                                                 "overrides": [f"run_dir={tmp_path / 'b'}"]}]})
    assert "is an earlier entry's too" in err({"runs": [one, {**one, "name": "b"}]})
    with pytest.raises(ConfigError, match="plan not found"):
        load_plan(tmp_path / "missing.json")


def test_plan_and_config_flags_do_not_mix(tmp_path):
    r = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--plan", str(tmp_path / "p.json"), "--config", "demo"],
                       capture_output=True, text=True, env=run_env(), timeout=120)
    assert r.returncode == 2
    assert "drop --config" in r.stderr
    r = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--plan", str(tmp_path / "p.json"), "--resume",
                        str(tmp_path / "ckpt.pt")], capture_output=True, text=True, env=run_env(), timeout=120)
    assert r.returncode == 2
    assert "--plan takes --resume auto" in r.stderr
    r = subprocess.run([PY, "-m", "hcml.launch.cli", "train"], capture_output=True, text=True, env=run_env(),
                       timeout=120)
    assert r.returncode == 2
    assert "needs --config RECIPE" in r.stderr
