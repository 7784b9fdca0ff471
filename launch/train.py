"""The training loop, run once per process under torchrun. Read it top to bottom:

:func:`train` sets up a :class:`Run` (parts built by :mod:`hcml.launch.components`), then runs epochs
(:func:`run_epoch`) of steps (:func:`train_step`: forward under autocast → phase loss → backward → optimizer
step), checkpointing (:func:`save`) every ``checkpoint.every_steps``, at each epoch end and on SIGTERM/SIGUSR1,
and finally evaluates (:func:`finish`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from hcml.errors import CheckpointError, NonFiniteLoss
from hcml.files import atomic_write_text
from hcml.host import threads_per_process
from hcml.launch import components, config as C, rundir
from hcml.launch.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, step_of
from hcml.launch.distributed import (DistInfo, all_gather_objects, all_reduce_max, barrier, broadcast_buffers, cleanup,
                                     init_distributed)
from hcml.launch.evaluate import evaluate
from hcml.launch.metrics import JsonlLog, PrometheusExporter, gpu_memory, plot_run
from hcml.launch.step import StepParts, train_step as one_step
from hcml.launch.watchdog import Watchdog
from hcml.pipeline.loader import TrainLoader
from hcml.pipeline.prepared import PreparedDataset


@dataclass
class Run:
    """Everything one process's loop needs, built once by :func:`setup`; the loop changes only the counters."""

    cfg: C.Config
    info: DistInfo
    ds: PreparedDataset
    model: nn.Module  # the bare model: state_dict, evaluation
    net: nn.Module  # what a step calls: the model, wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TrainLoader
    sched: components.Schedule
    prec: components.Precision
    metrics: JsonlLog
    exporter: PrometheusExporter | None = None
    step: int = 0
    epoch: int = 0
    data_state: dict | None = None  # this rank's loader position when resuming mid-epoch
    resumed_from: str | None = None
    stopped_by: int | None = None  # the signal that ended the run
    samples_skipped: int = 0  # training slots whose video could not be read or decoded (replaced), this process
    named_skips: set = field(default_factory=set)  # their paths, each logged once
    watchdog: Watchdog | None = None
    lock: rundir.RunLock | None = None  # rank 0 holds the run dir while it trains
    setup_seconds: float = 0.0  # from train() to the first step: model, loader, resume

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def max_steps(self) -> int:
        return min(self.cfg.train.max_steps or self.sched.total, self.sched.total)

    def log(self, msg: str) -> None:
        if self.info.main:
            print(msg, flush=True)

    def skipped(self, epoch: int, count: int, paths: list[str]) -> None:
        """The loader's report of a training video it replaced (it could not be read or decoded): counted by the
        rank that met it (each rank reads only its shard), each path named once per process."""
        self.samples_skipped += count
        if self.exporter:
            self.exporter.observe_skipped(count)
        new = [p for p in paths if p not in self.named_skips]
        self.named_skips.update(new)
        if new:
            print(f"[data] rank {self.info.rank} epoch {epoch}: replaced by the next video of its shard, and from "
                  f"now on left out: {', '.join(new)}", flush=True)


# ------------------------------------------------------------------ the run
def train(cfg: C.Config, resume: str | None = None, overwrite: bool = False, stop: "_StopSignal | None" = None
          ) -> dict:
    """Train (and finally evaluate) per ``cfg``; returns the final summary (rank 0 has the full one).
    ``resume``: None (fresh, or ``auto`` when torchrun restarts this job), ``auto`` or a checkpoint path."""
    t0 = time.time()
    stop = stop or _StopSignal()
    run = setup(cfg, resume, overwrite)
    run.setup_seconds = time.time() - t0
    from tqdm import tqdm

    bar = tqdm(total=run.max_steps, initial=run.step, desc=str(cfg.train.phase), unit="step", dynamic_ncols=True,
               disable=not (run.info.main and cfg.train.progress))
    try:
        while run.epoch < cfg.optim.epochs and run.step < run.max_steps and run.stopped_by is None:
            run_epoch(run, stop, bar)
    finally:
        bar.close()
    return finish(run, t0)


def setup(cfg: C.Config, resume: str | None, overwrite: bool = False) -> Run:
    """Process group, run-dir lock, seeds, parts, resume state, wrapping (DDP, compile) and telemetry."""
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    lock = None
    if info.main:
        rundir.check_writable(run_dir)
        lock = rundir.RunLock(run_dir).acquire()
    barrier(info)
    if info.device.type == "cpu":
        torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", info.world))))
    torch.manual_seed(cfg.train.seed * 100 + info.rank)
    np.random.seed(cfg.train.seed + info.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    log = print if info.main else (lambda *_: None)
    ds = components.check_runnable(cfg, info.world)
    prec = components.precision(cfg, info.device)
    model = components.prepare_model(components.model_from_config(cfg, components.num_classes(cfg, ds), log), cfg, info,
                                     prec, log)
    optimizer = components.build_optimizer(model, cfg, info, log)
    loader = components.train_loader(cfg, ds, info)
    run = Run(cfg, info, ds, model, model, optimizer,
              torch.amp.GradScaler(info.device.type, enabled=prec.autocast == torch.float16), loader,
              components.schedule(cfg, loader.steps_per_epoch, info), prec,
              JsonlLog(run_dir / "metrics.jsonl", enabled=info.main,
                       tensorboard=run_dir / "tensorboard" if cfg.metrics.tensorboard else None), lock=lock)
    loader.on_skip = run.skipped
    restore(run, resume, overwrite)
    if info.main:
        C.dump_config(cfg, run_dir / "config.yaml")
        rundir.write_owner(run_dir, run.resumed_from)
    if info.distributed:
        run.net = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank]
                                                      if info.device.type == "cuda" else None)
    if prec.compile:
        run.net = torch.compile(run.net, mode=cfg.train.compile_mode)
    if cfg.metrics.port:
        run.exporter = PrometheusExporter(cfg.metrics.port + info.local_rank, info.rank, cfg.metrics.next_free_port,
                                          log=print)
    run.watchdog = Watchdog(cfg.train.stall_timeout_s, info.rank, info.world,
                            on_tick=run.exporter.idle if run.exporter else None)
    run.watchdog.beat(run.step, "start")
    run.watchdog.start()
    run.log(f"[train] {cfg.model.arch} motion={cfg.model.motion} phase={cfg.train.phase} world={info.world} "
            f"device={info.device} data={loader.device} amp={prec.autocast} compile={prec.compile} "
            f"channels_last={prec.channels_last} steps/epoch={loader.steps_per_epoch} lr={run.sched.base_lr:g}"
            + (f" labelled videos={len(loader.samples)} of {len(ds.train)} (data.label_fraction="
               f"{cfg.data.label_fraction})" if cfg.data.label_fraction < 1 else ""))
    return run


def restore(run: Run, resume: str | None, overwrite: bool = False) -> None:
    """Decide, identically on every rank, where this run starts, then restore it.

    ``resume`` None: a fresh start, unless torchrun restarted this very job (rank 0's run.json names its run id):
    then ``auto``. A fresh start over another run's checkpoints is refused (``overwrite`` deletes them).
    ``auto``: the newest checkpoint that *every* rank sees and loads (all ranks report what they see; a checkpoint
    visible to some ranks only is an error naming them). A path: that checkpoint. Afterwards all ranks must hold
    the same step (one collective check). The metrics log keeps the records up to the restored step."""
    info = run.info
    views = all_gather_objects({"steps": [step_of(p) for p in list_checkpoints(run.ckpt_dir)],
                                "job": rundir.read_owner(run.run_dir).get("job")}, info)
    job = rundir.current_job()
    mode = resume or ("auto" if job is not None and views[0]["job"] == job else None)
    if mode is None:
        if any(v["steps"] for v in views):
            if not overwrite:
                raise rundir.refuse_fresh_start(run.run_dir, [s for v in views for s in v["steps"]])
            if info.main:
                rundir.clear_run(run.run_dir)
            barrier(info)
        run.metrics.reset()
        return
    if mode == "auto":
        found = _newest_common(run, views)
        if found is None:
            run.log(f"[resume] no checkpoint in {run.ckpt_dir}: starting fresh")
            run.metrics.reset()
            return
        path, ck = found
    else:
        path, ck = Path(mode), load_checkpoint(mode)
    components.check_compatible(ck, run.model, path, run.cfg)
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.epoch = ck["step"], ck["epoch"]
    per_rank = ck.get("per_rank", [])
    if info.rank < len(per_rank):
        _set_rng_state(per_rank[info.rank]["rng"])
        run.data_state = per_rank[info.rank]["data"]
    steps = all_gather_objects(run.step, info)
    if len(set(steps)) > 1:
        raise CheckpointError("ranks restored different steps: " + ", ".join(f"rank {r}: {s}" for r, s in
                                                                          enumerate(steps)))
    run.resumed_from = str(path)
    run.metrics.keep_until(run.step)
    run.log(f"[resume] {path}: epoch {run.epoch}, step {run.step}")


def _newest_common(run: Run, views: list[dict]) -> tuple[Path, dict] | None:
    """The newest checkpoint every rank sees and loads, or None when no rank sees any."""
    seen = [set(v["steps"]) for v in views]
    if not any(seen):
        return None
    candidates = sorted(set.intersection(*seen), reverse=True)
    for step in candidates:
        path = run.ckpt_dir / f"ckpt_{step:08d}.pt"
        try:
            found, err = (path, load_checkpoint(path)), ""
        except CheckpointError as e:
            found, err = None, str(e)
        errors = all_gather_objects(err, run.info)
        if not any(errors):
            return found
        run.log(f"[resume] skipping step {step}: " + "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e))
    raise CheckpointError(f"no checkpoint in {run.ckpt_dir} that every rank can load: " + ", ".join(
        f"rank {r} sees {('steps ' + ', '.join(map(str, sorted(s)))) if s else 'none'}" for r, s in enumerate(seen))
        + " (the run dir must be on storage all nodes share)")


def run_epoch(run: Run, stop: "_StopSignal", bar) -> None:
    """The rest of the current epoch (all of it unless resuming mid-epoch), then its checkpoint and eval."""
    cfg = run.cfg
    t_last = time.perf_counter()
    run.watchdog.beat(run.step, "data")
    for clips, labels in run.loader.epoch(run.epoch, run.data_state):
        run.watchdog.beat(run.step, "step")
        wait = time.perf_counter() - t_last
        lr = run.sched.lr(run.step)
        values = train_step(run, clips, labels, lr)
        if run.info.device.type == "cuda" and run.step % cfg.train.log_every == 0:
            torch.cuda.synchronize()  # so that the logged step time is the real one
        t_end = time.perf_counter()
        log_step(run, values, lr, clips.shape[0], step_s=t_end - t_last, wait_s=wait)
        t_last = t_end
        bar.set_postfix(loss=f"{values['total']:.3f}", refresh=False)
        bar.update(1)
        if cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0:
            save(run)
        run.stopped_by = stop.agreed(run.info)
        if run.stopped_by is not None:
            break
        if run.step >= run.max_steps:
            break
        run.watchdog.beat(run.step, "data")
    run.data_state = None
    if run.loader.finished:
        run.epoch += 1
    save(run)
    if run.stopped_by is not None:
        run.log(f"[train] signal {run.stopped_by}: checkpoint written at step {run.step}, exiting")
    elif (cfg.train.eval_every and run.epoch % cfg.train.eval_every == 0 and run.step < run.max_steps
          and cfg.train.phase.classifies):
        evaluate_and_log(run)


def train_step(run: Run, clips: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, float]:
    """One optimizer step (:func:`hcml.launch.step.train_step`, the step the benchmarks time); a non-finite term
    stops the run naming the step, the term and the last good checkpoint."""
    try:
        values = one_step(StepParts(run.cfg, run.model, run.net, run.optimizer, run.scaler, run.prec,
                                    run.info.device), clips, labels, lr)
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{str(e).replace('non-finite loss', f'non-finite loss at step {run.step}')}; the last "
                            f"good checkpoint is in {run.ckpt_dir}") from None
    run.step += 1
    return values


def log_step(run: Run, values: dict[str, float], lr: float, clips: int, step_s: float, wait_s: float) -> None:
    """Prometheus every step; the JSON-lines log every ``train.log_every`` steps (and step 1)."""
    if run.exporter:
        run.exporter.observe_step(step=run.step, epoch=run.epoch, step_s=step_s, wait_s=wait_s, clips=clips,
                                  frames_per_clip=run.cfg.data.frames, world=run.info.world, lr=lr, losses=values)
    if run.step % run.cfg.train.log_every == 0 or run.step == 1:
        run.metrics.write(kind="train", step=run.step, epoch=run.epoch, lr=lr, clips_per_s=clips / step_s,
                          data_wait_s=wait_s, step_s=step_s, data_wait_ratio=wait_s / max(step_s, 1e-9),
                          samples_skipped=skipped_total(run), **gpu_memory(run.info.device),
                          **{f"loss_{k}" if k != "total" else "loss": v for k, v in values.items()})


def skipped_total(run: Run) -> int:
    """Training videos replaced so far, summed over the ranks (each meets only its own shard's); a collective."""
    return sum(all_gather_objects(run.samples_skipped, run.info))


def save(run: Run) -> None:
    """Checkpoint (rank 0 writes; every rank contributes its RNG and loader position)."""
    if run.watchdog:
        run.watchdog.beat(run.step, "checkpoint")
    t0 = time.perf_counter()
    per_rank = all_gather_objects({"rng": _rng_state(), "data": run.loader.state()}, run.info)
    if run.info.main:
        save_checkpoint(run.ckpt_dir, run.step, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "step": run.step, "epoch": run.epoch, "per_rank": per_rank,
            "config": C.to_dict(run.cfg),  # the schedule is a function of the config and the step
            "classes": run.ds.classes,  # inference (hcml predict, export) needs no dataset
        }, keep=run.cfg.checkpoint.keep)
    barrier(run.info)
    if run.exporter:
        run.exporter.observe_checkpoint(time.perf_counter() - t0)


def evaluate_and_log(run: Run) -> dict:
    cfg = run.cfg
    broadcast_buffers(run.model, run.info)  # evaluate the model the checkpoint holds, on every rank
    samples = run.ds.split(cfg.data.eval_split)
    loader = components.eval_loader(cfg, run.ds, samples, run.info)
    res = evaluate(run.model, loader, samples, components.num_classes(cfg, run.ds), run.info, run.prec,
                   cfg.train.progress, on_batch=lambda: run.watchdog.beat(run.step, "eval"))
    res["split"] = cfg.data.eval_split
    run.metrics.write(kind="eval", step=run.step, epoch=run.epoch, top1=res["top1"], top5=res["top5"],
                      split=cfg.data.eval_split)
    run.log(f"[eval {cfg.data.eval_split}] epoch {run.epoch} step {run.step}: top-1 {res['top1']:.1f}%  "
            f"top-5 {res['top5']:.1f}% "
            f"({res['videos']} videos × {cfg.data.eval_clips} clips × {cfg.data.eval_crops} crops)")
    return res


def finish(run: Run, t0: float) -> dict:
    """Final evaluation (unless stopped by a signal, or self-supervised: its classifier is untrained), curves,
    summary.json (with the wall seconds since ``t0``); releases the run dir (the process group stays: the entry
    point ends it, after the last run of a plan)."""
    summary = {"step": run.step, "epoch": run.epoch, "resumed_from": run.resumed_from,
               "stopped_by_signal": run.stopped_by, "samples_skipped": skipped_total(run),
               "job": rundir.current_job(), "config_sha256": C.fingerprint(run.cfg),
               "setup_seconds": run.setup_seconds}
    if run.stopped_by is None and run.ds.val and run.cfg.train.phase.classifies:
        t_eval = time.time()
        summary["eval"] = evaluate_and_log(run)
        summary["eval_seconds"] = time.time() - t_eval
    summary["seconds"] = time.time() - t0
    if run.info.main:
        plot_run(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        atomic_write_text(run.run_dir / rundir.SUMMARY, json.dumps(summary, indent=1))
    run.metrics.close()
    if run.exporter:
        run.exporter.close()
    run.watchdog.stop()
    barrier(run.info)
    if run.lock:
        run.lock.release()
    return summary


# ------------------------------------------------------------------ signals and RNG
class _StopSignal:
    """SIGTERM/SIGINT/SIGUSR1 (scheduler stop, Ctrl-C, Slurm preemption) → checkpoint at the next step boundary,
    then exit 0. Installed before anything else in a worker, so a signal during start-up is not lost."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signal_seen: int | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal_seen = signum

    def agreed(self, info: DistInfo) -> int | None:
        """A signal may reach one rank only: all ranks agree (all-reduce MAX), so every rank stops at one step.
        Returns the agreed signal (or None). ``signal_seen`` is only ever written by the handler: a signal that
        lands while the all-reduce runs is kept for the next step, not overwritten."""
        flag = torch.tensor([self.signal_seen or 0], device=info.device)
        return int(all_reduce_max(flag, info).item()) or None


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def main_from_args(config_path: str | None, overrides: list[str], resume: str | None, overwrite: bool = False
                   ) -> int:
    """A worker's entry: exit 0 (also after a stop signal's checkpoint), 2 on bad input, 3 on NaN, 4 on a stall.
    Workers that torchrun restarts resume by themselves (see :func:`restore`)."""
    stop = _StopSignal()
    return _run_in_order(stop, [("", lambda: C.load_config(config_path, overrides), resume, overwrite)])


def main_from_plan(plan_path: str, resume: str | None = None) -> int:
    """A worker's entry for ``hcml train --plan`` (:mod:`hcml.launch.plan`): the entries in order in this one
    process group; ``resume`` None or ``auto`` (every entry continues from its own newest checkpoint). Exit codes
    as for one run."""
    from hcml.launch.plan import load_plan

    stop = _StopSignal()
    runs = [(e.name, lambda e=e: C.load_config(C.resolve_recipe(e.config), e.resolved_overrides()), resume,
             e.overwrite) for e in load_plan(plan_path)]
    return _run_in_order(stop, runs)


def _finished_before(cfg: C.Config, resume: str | None) -> bool:
    """Whether the run in ``cfg.run_dir`` already finished with exactly this config (its summary: no stop signal,
    the same fingerprint), so that it is skipped rather than resumed at its last step and evaluated again (a
    Kinetics evaluation is many minutes): after a torchrun restart of the job that finished it, or under
    ``--resume auto`` (a resubmitted plan); never for ``--resume PATH``. Rank 0 decides for all ranks."""
    job = rundir.current_job()
    if resume not in (None, "auto") or (resume is None and job is None):
        return False
    info = init_distributed()
    done = False
    if info.main:
        summary = rundir.read_json(Path(cfg.run_dir) / rundir.SUMMARY)
        done = rundir.finished_with(summary, C.fingerprint(cfg)) and (resume == "auto" or summary.get("job") == job)
    return bool(all_gather_objects(done, info)[0])


def _run_in_order(stop: _StopSignal, runs: list[tuple[str, Callable[[], C.Config], str | None, bool]]) -> int:
    """Each (name, config maker, resume, overwrite) in turn; stops after a run a signal ended (its checkpoint
    written). The process group ends after the last run (not on an error: a rank that raised leaves, and its
    peers' collectives fail or the watchdog ends them)."""
    main = os.environ.get("RANK", "0") == "0"
    try:
        for i, (name, make_cfg, resume, overwrite) in enumerate(runs):
            cfg = make_cfg()  # an entry's config is read when it starts (init_from_run exists by then)
            if _finished_before(cfg, resume):
                if main:
                    print(f"{f'[plan] {i + 1}/{len(runs)} {name}' if name else '[train]'}: finished earlier with "
                          f"this config ({Path(cfg.run_dir) / rundir.SUMMARY}): not run again", flush=True)
                continue
            if name and main:
                print(f"[plan] {i + 1}/{len(runs)} {name}: run_dir={cfg.run_dir}", flush=True)
            summary = train(cfg, resume, overwrite, stop)
            if summary["stopped_by_signal"] is not None:
                if i + 1 < len(runs) and main:
                    print(f"[plan] stopped by signal {summary['stopped_by_signal']} in {name}: "
                          f"{len(runs) - i - 1} run(s) not started", flush=True)
                break
    except NonFiniteLoss as e:
        print(f"[train] ERROR: {e}", file=sys.stderr, flush=True)
        return 3
    cleanup()
    return 0
