"""What clusters do to a run, done to `hcml train` the way schedulers do it, on CPU with gloo: stop signals to the
process the user started, a stopped worker, a worker killed under two torchrun agents (two "nodes", c10d on
127.0.0.1), checkpoints visible to one node only, and a second run into a run dir in use.

These runs use per-process BN (train.bn=local, in SMALL); global BN on CPU: tests/test_global_bn.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hcml.launch.checkpoint import list_checkpoints, step_of
from tests.conftest import PY, run_env
from tests.helpers import SMALL, kill_all, losses, processes_of, wait_for_step

pytestmark = pytest.mark.slow


def hcml_train(data: Path, run: Path, *extra: str) -> list[str]:
    return [PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(data), "--run-dir", str(run),
            *SMALL, *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, env=run_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def worker_of_rank(run: Path, rank: int) -> int:
    for pid in processes_of(run):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            return pid  # a worker: torchrun set its rank
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_to_hcml_train_checkpoints_and_every_process_exits_0(tiny_dataset, tmp_path, sig):
    """SIGTERM (scheduler), SIGINT (Ctrl-C), SIGUSR1 (Slurm's preemption warning) to `hcml train
    --nproc-per-node 2`: a checkpoint at the step the signal arrived (or the next), no process of the run left,
    exit 0; --resume auto continues from there with every step logged once."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(hcml_train(tiny_dataset, run, "--nproc-per-node", "2", "optim.epochs=50"), log)
    wait_for_step(run, 3, proc, log)
    at = max(losses(run))
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    newest = step_of(list_checkpoints(run / "checkpoints")[-1])
    assert at <= newest <= at + 2, (at, newest)
    assert f"signal {int(sig)}: checkpoint written at step {newest}" in log.read_text()
    time.sleep(0.5)
    assert processes_of(run) == []
    if sig == signal.SIGUSR1:
        res = subprocess.run(hcml_train(tiny_dataset, run, "--nproc-per-node", "2", "--resume", "auto",
                                        f"train.max_steps={newest + 2}"), env=run_env(), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(ln)["kind"] == "train"]
        assert steps == list(range(1, newest + 3)), steps


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    res = subprocess.run(hcml_train(tiny_dataset, run, "train.max_steps=1"), env=run_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return list_checkpoints(run / "checkpoints")[-1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_a_sharded_eval_in_one_line_with_no_process_left(tiny_dataset, tiny_checkpoint, tmp_path,
                                                                             sig):
    """`hcml eval --nproc-per-node 2` stopped mid-way (a scheduler's SIGTERM, Ctrl-C): the job ends 128 + signal
    with one line, not torchrun's failure report of every worker; no report is written and no process is left."""
    out = tmp_path / "eval"
    cmd = [PY, "-m", "hcml.launch.cli", "eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset),
           "--nproc-per-node", "2", "--out", str(out), *SMALL, "data.eval_clips=30", "data.eval_crops=3",
           "train.progress=true"]  # 1080 views: ~20 s on 2 cores; the progress bar says when the loop began
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        err = b""
        while b"eval:" not in err:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, err.decode()[-3000:]
            err += chunk
        os.kill(proc.pid, sig)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        kill_all(out)
    err = (err + rest).decode()
    assert proc.returncode == 128 + sig, err[-3000:]
    lines = [ln for ln in err.splitlines() if "hcml eval" in ln or "Traceback" in ln or "Error" in ln]
    assert lines == [f"hcml eval: stopped by signal {int(sig)}; no report written"], err[-3000:]
    assert not (out / "eval.json").exists() and b"top-1" not in stdout
    time.sleep(0.5)
    assert processes_of(out) == []


def test_a_second_run_into_a_run_dir_in_use_is_refused(tiny_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(hcml_train(tiny_dataset, run, "optim.epochs=50"), log)
    try:
        wait_for_step(run, 1, proc, log)
        res = subprocess.run(hcml_train(tiny_dataset, run, "--resume", "auto"), env=run_env(), capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert (re.match(rf"hcml train: error: run_dir {re.escape(str(run))} is in use by another "
                                            rf"run \(pid {proc.pid} on .+ since .+\); wait for it", lines[0])), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert json.loads((run / "summary.json").read_text())["stopped_by_signal"] == signal.SIGTERM


def test_a_stopped_worker_ends_the_job_naming_it_within_the_stall_timeout(tiny_dataset, tmp_path):
    """SIGSTOP to rank 1 (a frozen process): rank 0 names rank 1 and the last step, and the job ends non-zero
    (torchrun could restart it) instead of waiting 30 minutes in the all-reduce."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(hcml_train(tiny_dataset, run, "--nproc-per-node", "2", "optim.epochs=50",
                            "train.stall_timeout_s=6"), log)
    wait_for_step(run, 2, proc, log)
    victim = worker_of_rank(run, 1)
    os.kill(victim, signal.SIGSTOP)
    t0 = time.time()
    try:
        rc = proc.wait(timeout=120)
    finally:
        kill_all(run)
    assert rc != 0
    assert time.time() - t0 < 90
    m = re.search(r"hcml train \(rank 0\): error: stalled: no step for \d+ s \(train.stall_timeout_s=6\) after step "
                  r"(\d+) at [\d:]+; rank\(s\) 1 stopped answering", log.read_text())
    assert m, log.read_text()[-3000:]


def test_a_frozen_job_is_not_a_stall_and_finishes(tiny_dataset, tmp_path):
    """Every process of `hcml train --nproc-per-node 2` stopped at once for 15 s (a paused or snapshotted VM, as
    killed a demo on the development VM; 2.5x train.stall_timeout_s=6), then continued: no rank calls it a stall,
    each says it was frozen, the run finishes every step and exits 0 — the pause costs no step."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(hcml_train(tiny_dataset, run, "--nproc-per-node", "2", "optim.epochs=4",
                            "train.stall_timeout_s=6"), log)
    wait_for_step(run, 2, proc, log)
    frozen = [proc.pid, *processes_of(run)]
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(15)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    try:
        rc = proc.wait(timeout=180)
    finally:
        kill_all(run)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "stalled" not in text
    assert len(re.findall(r"rank [01]\): warning: this process was frozen for 1\d s", text)) >= 2, text[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] is None and summary["step"] == 24, summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(data: Path, runs: tuple[Path, Path], tmp: Path, *extra: str) -> list[tuple[subprocess.Popen, Path]]:
    """Two torchrun agents of one job (c10d rendezvous on 127.0.0.1), one worker each."""
    port = free_port()
    out = []
    for i, run in enumerate(runs):
        log = tmp / f"node{i}.log"
        cmd = hcml_train(data, run, "--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint",
                         f"127.0.0.1:{port}", "--rdzv-id", "job-7", *extra)
        out.append((start(cmd, log), log))
    return out


def test_checkpoints_visible_to_one_node_only_stop_the_job_naming_the_ranks(tiny_dataset, tmp_path):
    """No shared storage: node A's run dir has checkpoints up to step 3, node B's none. --resume auto must not let
    one rank resume and the other start fresh (a hang): the job ends, naming what each rank sees."""
    a, b = tmp_path / "nodeA", tmp_path / "nodeB"
    res = subprocess.run(hcml_train(tiny_dataset, a, "train.max_steps=3"), env=run_env(), capture_output=True,
                         timeout=300)
    assert res.returncode == 0
    nodes = two_nodes(tiny_dataset, (a, b), tmp_path, "--resume", "auto")
    for proc, log in nodes:
        assert proc.wait(timeout=180) != 0, log.read_text()[-2000:]
    text = "".join(log.read_text() for _, log in nodes)
    assert re.search(r"error: no checkpoint in \S+ that every rank can load: rank 0 sees (steps 3|none), rank 1 sees "
                     r"(none|steps 3) \(the run dir must be on storage all nodes share\)", text), text[-3000:]


def test_a_worker_killed_under_two_agents_restarts_and_both_resume(tiny_dataset, tmp_path):
    """kill -9 of one node's worker with --max-restarts: both agents restart their workers (the healthy node's
    restart is a membership change), both resume from the newest checkpoint of the job without --resume, and the
    run ends with every step logged once and nothing started fresh."""
    run = tmp_path / "run"
    nodes = two_nodes(tiny_dataset, (run, run), tmp_path, "--max-restarts", "2", "checkpoint.every_steps=2",
                      "train.max_steps=9")
    try:
        wait_for_step(run, 5, *nodes[0])
        os.kill(worker_of_rank(run, 1), signal.SIGKILL)
        for proc, log in nodes:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_all(run)
    text = "".join(log.read_text() for _, log in nodes)
    assert re.search(r"\[resume\] \S+ckpt_0000000[46]\.pt", text), text[-3000:]
    assert "starting fresh" not in text, text[-3000:]
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 10)), steps


def test_a_plan_restarted_by_torchrun_goes_on_with_the_entry_that_failed(tiny_dataset, tmp_path):
    """`hcml train --plan` with --max-restarts: kill -9 of a worker in the second entry. The restarted workers
    do not re-enter the finished first entry (no second training pass, no second evaluation: its summary and
    metrics stay as they were), and the second entry resumes from its checkpoint, every step logged once."""
    from hcml.launch.plan import PlanEntry, write_plan

    first, second = tmp_path / "first", tmp_path / "second"
    common = [f"data.root={tiny_dataset}", *SMALL, "checkpoint.every_steps=2"]
    plan = write_plan(tmp_path / "plan.json", [
        PlanEntry("first", "demo", [*common, f"run_dir={first}", "train.max_steps=3"]),
        PlanEntry("second", "demo", [*common, f"run_dir={second}", "train.max_steps=9"], init_from_run=str(first))])
    log = tmp_path / "log"
    proc = start([PY, "-m", "hcml.launch.cli", "train", "--plan", str(plan), "--nproc-per-node", "2",
                  "--max-restarts", "1"], log)
    try:
        wait_for_step(second, 5, proc, log)
        before = {f: (first / f).read_text() for f in ("summary.json", "metrics.jsonl")}
        os.kill(worker_of_rank(plan, 1), signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_all(plan)
    text = log.read_text()
    assert f"[plan] 1/2 first: finished earlier with this config ({first / 'summary.json'}): not run again" \
        in text, text[-3000:]
    assert text.count("[plan] 1/2 first: run_dir=") == 1, text[-3000:]
    assert re.search(rf"\[resume\] {re.escape(str(second))}\S+ckpt_0000000[46]\.pt", text), text[-3000:]
    assert {f: (first / f).read_text() for f in before} == before  # not re-evaluated, not rewritten
    assert [json.loads(ln)["kind"] for ln in before["metrics.jsonl"].splitlines()].count("eval") == 1
    steps = [json.loads(ln)["step"] for ln in (second / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 10)), steps
    assert json.loads((second / "summary.json").read_text())["step"] == 9


def test_a_resubmitted_plan_with_resume_auto_skips_finished_entries_and_resumes_the_stopped_one(tiny_dataset,
                                                                                                    tmp_path):
    """A plan stopped by the scheduler (SIGTERM: the second entry checkpoints and the job ends 0), then submitted
    again as a new job: without --resume it is refused in one line (the entries' checkpoints would be started
    over); with --resume auto the finished entry is skipped (same config: not trained, not evaluated again) and the
    stopped one resumes from its checkpoint, every step logged once."""
    from hcml.launch.plan import PlanEntry, write_plan

    first, second = tmp_path / "first", tmp_path / "second"
    common = [f"data.root={tiny_dataset}", *SMALL, "checkpoint.every_steps=2"]
    plan = write_plan(tmp_path / "plan.json", [
        PlanEntry("first", "demo", [*common, f"run_dir={first}", "train.max_steps=3"]),
        PlanEntry("second", "demo", [*common, f"run_dir={second}", "train.max_steps=9"], init_from_run=str(first))])
    cmd = [PY, "-m", "hcml.launch.cli", "train", "--plan", str(plan), "--nproc-per-node", "2"]
    log = tmp_path / "log"
    proc = start(cmd, log)
    try:
        wait_for_step(second, 4, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        kill_all(plan)
    stopped = json.loads((second / "summary.json").read_text())
    assert stopped["stopped_by_signal"] == signal.SIGTERM and stopped["step"] < 9, stopped
    kept = {f: (first / f).read_text() for f in ("summary.json", "metrics.jsonl")}

    again = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2, again.stderr[-2000:]
    assert again.stderr.strip().splitlines() == [
        f"hcml train: error: run_dir {first} holds another run's checkpoints (up to step 3): pass --resume auto to "
        "continue it, --overwrite to delete it and start fresh, or choose another --run-dir"]

    resumed = subprocess.run([*cmd, "--resume", "auto"], env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert f"[plan] 1/2 first: finished earlier with this config ({first / 'summary.json'}): not run again" in out, \
        out[-3000:]
    assert re.search(rf"\[resume\] {re.escape(str(second))}\S+ckpt_0000000{stopped['step']}\.pt", out), out[-3000:]
    assert {f: (first / f).read_text() for f in kept} == kept
    steps = [json.loads(ln)["step"] for ln in (second / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 10)), steps
    done = json.loads((second / "summary.json").read_text())
    assert done["step"] == 9 and done["stopped_by_signal"] is None and "eval" in done


def test_a_run_dir_on_a_read_only_filesystem_is_one_line_before_any_worker(tiny_dataset, tmpfs):
    ro = tmpfs("ro", "ro,size=1m")
    res = subprocess.run(hcml_train(tiny_dataset, ro / "run", "--nproc-per-node", "2"), env=run_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert (res.stderr.strip().splitlines() == [
        f"hcml train: error: run_dir {ro / 'run'} is not writable (Read-only file system); choose another --run-dir"])


def test_a_full_disk_during_a_save_stops_naming_it_and_keeps_the_earlier_checkpoints(tiny_dataset, tmpfs):
    """The run dir fills up (a tiny checkpoint is 2.4 MB; the filesystem holds two): the third save fails as one
    line, exit 2, and the two earlier checkpoints still load."""
    from hcml.launch.checkpoint import load_checkpoint

    disk = tmpfs("full", "size=6m")
    res = subprocess.run(hcml_train(tiny_dataset, disk / "run", "checkpoint.every_steps=1", "train.max_steps=6"),
                         env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert (re.match(r"hcml train: error: checkpoint at step 3 not saved: cannot write \S+"
                                        r"ckpt_00000003.pt: No space left on device; what was there before is "
                                        r"intact", lines[0])), lines
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(disk / "run/checkpoints")] == [1, 2]
    assert not list((disk / "run/checkpoints").glob(".tmp-*"))
