"""The training loop, run once per process under torchrun. Read it top to bottom:

:func:`train` sets up a :class:`Run` (parts built by :mod:`hcml.launch.components`), then runs epochs
(:func:`run_epoch`) of steps (:func:`train_step`: forward under autocast → phase loss → backward → optimizer
step), checkpointing (:func:`save`) every ``checkpoint.every_steps``, at each epoch end and on SIGTERM/SIGUSR1,
and finally evaluates (:func:`finish`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hcml.launch import components, config as C
from hcml.launch.checkpoint import latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from hcml.launch.distributed import DistInfo, all_gather_objects, all_reduce_max, barrier, cleanup, init_distributed
from hcml.launch.evaluate import evaluate
from hcml.launch.metrics import JsonlLog, PrometheusExporter, plot_run
from hcml.model import phase_loss
from hcml.pipeline.loader import TrainLoader
from hcml.pipeline.prepared import PreparedDataset


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


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


# ------------------------------------------------------------------ the run
def train(cfg: C.Config, resume: str | None = None) -> dict:
    """Train (and finally evaluate) per ``cfg``; returns the final summary (rank 0 has the full one)."""
    run = setup(cfg, resume)
    stop = _StopSignal()
    from tqdm import tqdm

    bar = tqdm(total=run.max_steps, initial=run.step, desc=cfg.train.phase, unit="step", dynamic_ncols=True,
               disable=not (run.info.main and cfg.train.progress))
    try:
        while run.epoch < cfg.optim.epochs and run.step < run.max_steps and run.stopped_by is None:
            run_epoch(run, stop, bar)
    finally:
        bar.close()
    return finish(run)


def setup(cfg: C.Config, resume: str | None) -> Run:
    """Process group, seeds, parts, resume state, wrapping (DDP, compile) and telemetry."""
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        C.dump_config(cfg, run_dir / "config.yaml")
    barrier(info)
    if info.device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("HCML_THREADS", (os.cpu_count() or 1) // info.world))))
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
    model = components.prepare_model(components.build_model(cfg, components.num_classes(cfg, ds), log), cfg, info,
                                     prec, log)
    optimizer = components.build_optimizer(model, cfg, info, log)
    loader = components.train_loader(cfg, ds, info, run_dir / "lists")
    run = Run(cfg, info, ds, model, model, optimizer,
              torch.amp.GradScaler(info.device.type, enabled=prec.autocast == torch.float16), loader,
              components.schedule(cfg, loader.steps_per_epoch, info), prec,
              JsonlLog(run_dir / "metrics.jsonl", enabled=info.main))
    restore(run, resume)
    if info.distributed:
        run.net = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank]
                                                      if info.device.type == "cuda" else None)
    if prec.compile:
        run.net = torch.compile(run.net, mode=cfg.train.compile_mode)
    if cfg.metrics.port:
        run.exporter = PrometheusExporter(cfg.metrics.port + info.local_rank, info.rank, cfg.metrics.next_free_port,
                                          log=print)
    run.log(f"[train] {cfg.model.arch} motion={cfg.model.motion} phase={cfg.train.phase} world={info.world} "
            f"device={info.device} data={loader.device} amp={prec.autocast} compile={prec.compile} "
            f"channels_last={prec.channels_last} steps/epoch={loader.steps_per_epoch} lr={run.sched.base_lr:g}")
    return run


def restore(run: Run, resume: str | None) -> None:
    """``resume``: ``auto`` (the newest checkpoint of the run dir that loads) or a path. Restores weights,
    optimizer, scaler, counters and this rank's RNG and loader position; the metrics log keeps only the records
    up to the restored step (the steps after it are re-run and re-logged). A fresh start empties the log."""
    if resume:
        found = latest_valid(run.ckpt_dir) if resume == "auto" else (Path(resume), load_checkpoint(resume))
        if found:
            path, ck = found
            run.model.load_state_dict(ck["model"])
            run.optimizer.load_state_dict(ck["optimizer"])
            if ck.get("scaler"):
                run.scaler.load_state_dict(ck["scaler"])
            run.step, run.epoch = ck["step"], ck["epoch"]
            per_rank = ck.get("per_rank", [])
            if run.info.rank < len(per_rank):
                _set_rng_state(per_rank[run.info.rank]["rng"])
                run.data_state = per_rank[run.info.rank]["data"]
            run.resumed_from = str(path)
            run.metrics.keep_until(run.step)
            run.log(f"[resume] {path}: epoch {run.epoch}, step {run.step}")
            return
        run.log(f"[resume] no valid checkpoint in {run.ckpt_dir}: starting fresh")
    elif list_checkpoints(run.ckpt_dir):
        run.log(f"[train] WARNING: {run.ckpt_dir} already has checkpoints; starting fresh and overwriting them as "
                f"steps come around (pass --resume auto to continue instead)")
    run.metrics.reset()


def run_epoch(run: Run, stop: "_StopSignal", bar) -> None:
    """The rest of the current epoch (all of it unless resuming mid-epoch), then its checkpoint and eval."""
    cfg = run.cfg
    t_last = time.perf_counter()
    for clips, labels in run.loader.epoch(run.epoch, run.data_state):
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
    run.data_state = None
    if run.loader.finished:
        run.epoch += 1
    save(run)
    if run.stopped_by is not None:
        run.log(f"[train] signal {run.stopped_by}: checkpoint written at step {run.step}, exiting")
    elif (cfg.train.eval_every and run.epoch % cfg.train.eval_every == 0 and run.step < run.max_steps
          and cfg.train.phase != "ssl"):
        evaluate_and_log(run)


def train_step(run: Run, clips: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, float]:
    """One optimizer step; returns the loss terms as floats. A non-finite term stops the run (NonFiniteLoss)."""
    cfg, dev = run.cfg, run.info.device
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    x, y = run.prec.to_input(clips, dev), labels.to(dev, non_blocking=True)
    with run.prec.autocast_ctx(dev):
        out = run.net(x, **components.forward_flags(cfg))
    loss, terms = phase_loss(out, y, cfg.train.phase, cfg.model.nce_weights, cfg.model.nce_lambda)
    values = {"total": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {run.step}: " + ", ".join(f"{k}={values[k]}" for k in bad)
                            + f"; the last good checkpoint is in {run.ckpt_dir}")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.train.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
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
                          **{f"loss_{k}" if k != "total" else "loss": v for k, v in values.items()})


def save(run: Run) -> None:
    """Checkpoint (rank 0 writes; every rank contributes its RNG and loader position)."""
    t0 = time.perf_counter()
    per_rank = all_gather_objects({"rng": _rng_state(), "data": run.loader.state()}, run.info)
    if run.info.main:
        save_checkpoint(run.ckpt_dir, run.step, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "step": run.step, "epoch": run.epoch, "per_rank": per_rank,
            "config": C.to_dict(run.cfg),
            "scheduler": {"total": run.sched.total, "warmup": run.sched.warmup, "base_lr": run.sched.base_lr},
        }, keep=run.cfg.checkpoint.keep)
    barrier(run.info)
    if run.exporter:
        run.exporter.ckpt_time.labels(run.exporter.rank).observe(time.perf_counter() - t0)


def evaluate_and_log(run: Run) -> dict:
    cfg = run.cfg
    loader = components.eval_loader(cfg, run.ds, run.ds.val, run.info, run.run_dir / "lists")
    res = evaluate(run.model, loader, run.ds.val, components.num_classes(cfg, run.ds), run.info, run.prec,
                   cfg.train.progress)
    run.metrics.write(kind="eval", step=run.step, epoch=run.epoch, top1=res["top1"], top5=res["top5"])
    run.log(f"[eval] epoch {run.epoch} step {run.step}: top-1 {res['top1']:.1f}%  top-5 {res['top5']:.1f}% "
            f"({res['videos']} videos × {cfg.data.eval_clips} clips × {cfg.data.eval_crops} crops)")
    return res


def finish(run: Run) -> dict:
    """Final evaluation (unless stopped by a signal, or self-supervised: its classifier is untrained), curves,
    summary.json; releases the process group."""
    summary = {"step": run.step, "epoch": run.epoch, "resumed_from": run.resumed_from,
               "stopped_by_signal": run.stopped_by}
    if run.stopped_by is None and run.ds.val and run.cfg.train.phase != "ssl":
        summary["eval"] = evaluate_and_log(run)
    if run.info.main:
        plot_run(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if run.exporter:
        run.exporter.close()
    cleanup()
    return summary


# ------------------------------------------------------------------ signals and RNG
class _StopSignal:
    """SIGTERM/SIGUSR1 (Slurm preemption) → checkpoint at the next step boundary, then exit cleanly."""

    def __init__(self):
        self.signal_seen: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
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


def main_from_args(config_path: str | None, overrides: list[str], resume: str | None) -> int:
    """A worker's entry: restarted workers (torchrun ``--max-restarts``) resume by themselves; exit 3 on NaN."""
    cfg = C.load_config(config_path, overrides)
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"
    try:
        train(cfg, resume)
    except NonFiniteLoss as e:
        print(f"[train] ERROR: {e}", file=sys.stderr, flush=True)
        return 3
    return 0
