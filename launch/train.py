"""The training driver: config → components → loop. Run once per process under torchrun.

Reading order: :func:`train` builds everything (``build_*`` helpers below), then runs epochs of
``step()``: wait for data → forward (autocast) → phase loss → backward → SGD step → metrics → maybe checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hcml.launch import config as C
from hcml.launch.checkpoint import latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from hcml.launch.distributed import DistInfo, all_gather_objects, all_reduce_max, barrier, cleanup, init_distributed
from hcml.launch.metrics import JsonlLog, PrometheusExporter, plot_run
from hcml.model import build_model, phase_loss
from hcml.pipeline.dataset import PreparedDataset, load_prepared
from hcml.pipeline.loader import AugmentSpec, EvalLoader, TrainLoader, dali_device


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


# ------------------------------------------------------------------ building blocks
def augment_spec(cfg: C.Config) -> AugmentSpec:
    d = cfg.data
    return AugmentSpec(frames=d.frames, stride=d.stride, crop=d.crop, short_side=tuple(d.short_side),
                       eval_short_side=d.eval_short_side, eval_clips=d.eval_clips, eval_crops=d.eval_crops,
                       flip=d.flip, flip_pairs=d.flip_pairs, mean=d.mean, std=d.std)


def resolve_speed_switches(cfg: C.Config, device: torch.device) -> tuple[torch.dtype | None, bool, bool]:
    """(autocast dtype or None, compile?, channels_last?) with ``auto`` resolved for the device."""
    cuda = device.type == "cuda"
    amp = {"auto": "bf16" if cuda else "none"}.get(cfg.train.amp, cfg.train.amp)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    compile_ = cfg.train.compile if cfg.train.compile is not None else cuda
    cl = cfg.train.channels_last if cfg.train.channels_last is not None else cuda
    return dtype, compile_, cl


def build_net(cfg: C.Config, num_classes: int) -> nn.Module:
    m = cfg.model
    model = build_model(m.arch, num_classes, motion=m.motion, max_displacement=m.max_displacement,
                        cv_stride=m.cv_stride, motion_channels=m.motion_channels, dropout=m.dropout,
                        nce_temperature=m.nce_temperature, nce_samples=m.nce_samples,
                        detach_targets=m.detach_targets)
    if m.init_from:
        state = load_checkpoint(m.init_from)["model"]
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(compatible))
        model.load_state_dict(compatible, strict=False)
        print(f"[init] loaded {len(compatible)} tensors from {m.init_from}; skipped {len(skipped)} "
              f"(shape/name mismatch, e.g. the classifier): {skipped[:4]}")
    return model


def load_trained(checkpoint: str, config_path: str | None = None, overrides: list[str] | None = None
                 ) -> tuple[C.Config, PreparedDataset, nn.Module]:
    """A trained model from a checkpoint: its stored config (or ``config_path``) plus overrides, the dataset it
    names and the network with the checkpoint's weights (on CPU). Used by eval, KNN and Grad-CAM++."""
    ck = load_checkpoint(checkpoint)
    cfg = C.from_dict(ck["config"]) if config_path is None else C.load_config(config_path)
    C.apply_overrides(cfg, overrides or [])
    cfg.model.init_from = ""  # the checkpoint holds all the weights
    ds = load_prepared(cfg.data.root)
    model = build_net(cfg, cfg.model.num_classes or ds.num_classes)
    model.load_state_dict(ck["model"])
    return cfg, ds, model


def freeze_unused(model: nn.Module, phase: str) -> None:
    """Parameters a phase's loss never reaches get no gradient (DDP would wait for them): the classifier in SSL,
    the future predictors in fine-tuning."""
    unused = {"ssl": ["fc"], "finetune": ["predictors"]}.get(phase, [])
    for name in unused:
        if hasattr(model, name):
            for p in getattr(model, name).parameters():
                p.requires_grad_(False)


def sync_bn(model: nn.Module, cfg: C.Config, info: DistInfo, log) -> nn.Module:
    if cfg.train.bn != "global" or not info.distributed:
        return model
    if info.device.type != "cuda":
        log("[bn] bn=global requested but SyncBatchNorm runs only on CUDA: using per-process BN statistics")
        return model
    try:  # NGC images ship apex; its SyncBN is the faster one there
        from apex.parallel import convert_syncbn_model

        log("[bn] global BN via apex.parallel.SyncBatchNorm")
        return convert_syncbn_model(model)
    except ImportError:
        log("[bn] global BN via torch.nn.SyncBatchNorm")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_optimizer(model: nn.Module, cfg: C.Config, info: DistInfo, log) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.lr_per_gpu * info.world  # linear scaling rule
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay,
                                 **({"fused": True} if info.device.type == "cuda" else {"foreach": True}))
    if info.device.type == "cuda":
        try:
            from apex.optimizers import FusedSGD

            log("[optim] apex FusedSGD")
            return FusedSGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
        except ImportError:
            pass
    fused = o.fused if o.fused is not None else info.device.type == "cuda"
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov, **kw)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Per-iteration linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: EvalLoader, ds_samples, num_classes: int, info: DistInfo,
             autocast_dtype, channels_last: bool, progress: bool = False) -> dict:
    """Multi-view testing: softmax averaged over K clips × crops per video, every video exactly once."""
    model.eval()
    rows, scores = [], []
    from tqdm import tqdm

    for clips, r in tqdm(loader, desc="eval", disable=not (progress and info.main), leave=False):
        B, V = clips.shape[:2]
        x = clips.reshape(B * V, *clips.shape[2:]).to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        ctx = torch.autocast(info.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            logits = model(x, with_nce=False)["logits"]
        p = logits.float().softmax(-1).view(B, V, -1).mean(1)
        rows.append(r.cpu())
        scores.append(p.cpu())
    local = (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
             torch.cat(scores) if scores else torch.zeros(0, num_classes))
    gathered = all_gather_objects(local, info)
    K = loader.spec.eval_clips
    n_videos = len(ds_samples)
    video_scores = torch.zeros(n_videos, num_classes)
    seen = torch.zeros(n_videos * K, dtype=torch.long)
    for r, s in gathered:
        seen.index_add_(0, r, torch.ones_like(r))
        video_scores.index_add_(0, r // K, s)
    if not torch.all(seen == 1):
        raise RuntimeError(f"eval sharding error: views seen {seen.min()}..{seen.max()} times (expected once)")
    labels = torch.tensor([s.label for s in ds_samples])
    top5 = video_scores.topk(min(5, num_classes), dim=1).indices
    pred = top5[:, 0]
    per_class = [float((pred[labels == c] == c).float().mean() * 100) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    model.train()
    return {"top1": float((pred == labels).float().mean() * 100),
            "top5": float((top5 == labels[:, None]).any(1).float().mean() * 100),
            "per_class": per_class, "confusion": confusion.tolist(), "videos": n_videos,
            "predictions": pred.tolist()}


# ------------------------------------------------------------------ the run
@dataclass
class RunState:
    step: int = 0
    epoch: int = 0


class _Stop:
    """SIGTERM/SIGUSR1 (Slurm preemption) → checkpoint at the next step boundary, then exit cleanly."""

    def __init__(self):
        self.signal: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def train(cfg: C.Config, resume: str | None = None) -> dict:
    """Train (and finally evaluate) per ``cfg``; returns the final summary (rank 0 has the full one)."""
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    def log(msg: str) -> None:
        if info.main:
            print(msg, flush=True)

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

    ds: PreparedDataset = load_prepared(cfg.data.root)
    num_classes = cfg.model.num_classes or ds.num_classes
    autocast_dtype, use_compile, channels_last = resolve_speed_switches(cfg, info.device)
    model = sync_bn(build_net(cfg, num_classes), cfg, info, log).to(info.device)
    freeze_unused(model, cfg.train.phase)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model, cfg, info, log)
    scaler = torch.amp.GradScaler(info.device.type, enabled=autocast_dtype == torch.float16)

    spec = augment_spec(cfg)
    ddev = dali_device(cfg.data.device)
    device_id = info.local_rank if ddev == "gpu" else None
    work = run_dir / "lists"
    loader = TrainLoader(ds.train, spec, batch_size=cfg.data.batch_size, work_dir=work, device=ddev,
                         device_id=device_id, rank=info.rank, world=info.world, threads=cfg.data.threads,
                         seed=cfg.train.seed)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = cfg.optim.warmup_epochs * steps_per_epoch
    base_lr = cfg.optim.lr_per_gpu * info.world

    st = RunState()
    data_state = None
    resumed = None
    if resume:
        found = latest_valid(ckpt_dir) if resume == "auto" else (Path(resume), load_checkpoint(resume))
        if found:
            path, ck = found
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            st = RunState(ck["step"], ck["epoch"])
            per_rank = ck.get("per_rank", [])
            if info.rank < len(per_rank):
                _set_rng_state(per_rank[info.rank]["rng"])
                data_state = per_rank[info.rank]["data"]
            resumed = str(path)
            log(f"[resume] {path}: epoch {st.epoch}, step {st.step}")
        else:
            log(f"[resume] no valid checkpoint in {ckpt_dir}: starting fresh")
    elif list_checkpoints(ckpt_dir):
        log(f"[train] WARNING: {ckpt_dir} already has checkpoints; starting fresh and overwriting them as steps "
            f"come around (pass --resume auto to continue instead)")

    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda"
                                                  else None)
    if use_compile:
        net = torch.compile(net, mode=cfg.train.compile_mode)

    metrics_log = JsonlLog(run_dir / "metrics.jsonl", enabled=info.main)
    exporter = PrometheusExporter(cfg.metrics.port + info.local_rank, info.rank, cfg.metrics.next_free_port,
                                  log=print) if cfg.metrics.port else None
    stopper = _Stop()
    frames_per_clip = cfg.data.frames

    def checkpoint() -> None:
        t0 = time.perf_counter()
        per_rank = all_gather_objects({"rng": _rng_state(), "data": loader.state()}, info)
        if info.main:
            save_checkpoint(ckpt_dir, st.step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": st.step, "epoch": st.epoch, "per_rank": per_rank, "config": C.to_dict(cfg),
                "scheduler": {"total": total_steps, "warmup": warmup_steps, "base_lr": base_lr},
            }, keep=cfg.checkpoint.keep)
        barrier(info)
        if exporter:
            exporter.ckpt_time.labels(exporter.rank).observe(time.perf_counter() - t0)

    from tqdm import tqdm

    max_steps = cfg.train.max_steps or total_steps
    bar = tqdm(total=min(max_steps, total_steps), initial=st.step, desc=f"{cfg.train.phase}", unit="step",
               disable=not (info.main and cfg.train.progress), dynamic_ncols=True)
    log(f"[train] {cfg.model.arch} motion={cfg.model.motion} phase={cfg.train.phase} world={info.world} "
        f"device={info.device} data={ddev} amp={autocast_dtype} compile={use_compile} channels_last={channels_last} "
        f"steps/epoch={steps_per_epoch} lr={base_lr:g}")
    stopped_by = None
    model.train()
    try:
        while st.epoch < cfg.optim.epochs and st.step < max_steps and stopped_by is None:
            t_last = time.perf_counter()
            for clips, labels in loader.epoch(st.epoch, data_state):
                t_data = time.perf_counter()
                wait = t_data - t_last
                lr = lr_at(st.step, total_steps, warmup_steps, base_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x = clips.to(info.device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                y = labels.to(info.device, non_blocking=True)
                ctx = torch.autocast(info.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
                with ctx:
                    out = net(x, with_nce=cfg.train.phase != "finetune")
                loss, terms = phase_loss(out, y, cfg.train.phase, cfg.model.nce_weights, cfg.model.nce_lambda)
                values = {"total": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLoss(f"non-finite loss at step {st.step}: " +
                                        ", ".join(f"{k}={values[k]}" for k in bad) +
                                        f"; the last good checkpoint is in {ckpt_dir}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.train.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                st.step += 1
                if info.device.type == "cuda" and (st.step % cfg.train.log_every == 0):
                    torch.cuda.synchronize()
                t_end = time.perf_counter()
                step_s = t_end - t_last
                t_last = t_end
                rate = clips.shape[0] / step_s
                if exporter:
                    exporter.observe_step(step=st.step, epoch=st.epoch, step_s=step_s, wait_s=wait,
                                          clips=clips.shape[0], frames_per_clip=frames_per_clip, world=info.world,
                                          lr=lr, losses=values)
                if st.step % cfg.train.log_every == 0 or st.step == 1:
                    metrics_log.write(kind="train", step=st.step, epoch=st.epoch, lr=lr, clips_per_s=rate,
                                      data_wait_s=wait, step_s=step_s,
                                      **{f"loss_{k}" if k != "total" else "loss": v for k, v in values.items()})
                bar.set_postfix(loss=f"{values['total']:.3f}", clips_s=f"{rate * info.world:.1f}", refresh=False)
                bar.update(1)
                if cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0:
                    checkpoint()
                # a signal may reach one rank only: agree on it, so that every rank stops at the same step
                flag = torch.tensor([stopper.signal or 0], device=info.device)
                stop_sig = int(all_reduce_max(flag, info).item())
                if stop_sig:
                    stopped_by = stop_sig
                    break
                if st.step >= max_steps:
                    break
            data_state = None
            if loader.finished:
                st.epoch += 1
            checkpoint()
            if stopped_by is not None:
                log(f"[train] signal {stopped_by}: checkpoint written at step {st.step}, exiting")
                break
            if (cfg.train.eval_every and st.epoch % cfg.train.eval_every == 0 and st.epoch < cfg.optim.epochs
                    and st.step < max_steps):
                _eval_and_log(model, cfg, ds, num_classes, info, autocast_dtype, channels_last, ddev, device_id,
                              work, metrics_log, st, log)
    finally:
        bar.close()
    summary = {"step": st.step, "epoch": st.epoch, "resumed_from": resumed, "stopped_by_signal": stopped_by}
    if stopped_by is None and ds.val:
        summary["eval"] = _eval_and_log(model, cfg, ds, num_classes, info, autocast_dtype, channels_last, ddev,
                                        device_id, work, metrics_log, st, log)
    if info.main:
        plot_run(run_dir / "metrics.jsonl", run_dir / "curves.png")
        import json

        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if exporter:
        exporter.close()
    cleanup()
    return summary


def _eval_and_log(model, cfg, ds, num_classes, info, autocast_dtype, channels_last, ddev, device_id, work,
                  metrics_log, st, log) -> dict:
    loader = EvalLoader(ds.val, augment_spec(cfg), batch_size=max(1, cfg.data.batch_size // 2), work_dir=work,
                        device=ddev, device_id=device_id, rank=info.rank, world=info.world, threads=cfg.data.threads)
    res = evaluate(model, loader, ds.val, num_classes, info, autocast_dtype, channels_last, cfg.train.progress)
    metrics_log.write(kind="eval", step=st.step, epoch=st.epoch, top1=res["top1"], top5=res["top5"])
    log(f"[eval] epoch {st.epoch} step {st.step}: top-1 {res['top1']:.1f}%  top-5 {res['top5']:.1f}% "
        f"({res['videos']} videos × {cfg.data.eval_clips} clips × {cfg.data.eval_crops} crops)")
    return res


def main_from_args(config_path: str | None, overrides: list[str], resume: str | None) -> int:
    cfg = C.load_config(config_path, overrides)
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # torchrun restarted the workers after a failure: continue from the newest checkpoint
    try:
        train(cfg, resume)
    except NonFiniteLoss as e:
        print(f"[train] ERROR: {e}", file=sys.stderr, flush=True)
        return 3
    return 0
