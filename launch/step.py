"""The one training step: what ``hcml train`` runs, and what ``hcml bench train`` and ``hcml bench model`` time.

A step is: learning rate set, batch to the device in the model's memory format, forward under autocast, the
phase's loss (classification and/or the weighted contrastive terms), a finite-loss check, backward through the
GradScaler, gradient clipping when configured, optimizer step, scaler update. ``stage(name)`` wraps each part
(``data``, ``forward``, ``backward``, ``optimizer``): the benchmarks time and synchronise there, the loop does not.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from hcml.errors import NonFiniteLoss
from hcml.launch import components
from hcml.model import phase_loss


@dataclass
class StepParts:
    """The parts a step touches, built by :mod:`hcml.launch.components` from one config."""

    cfg: object  # hcml.launch.config.Config
    model: nn.Module  # the bare model (clipping reads its parameters)
    net: nn.Module  # what is called: the model wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    prec: components.Precision
    device: torch.device


def _no_stage(name: str):
    return nullcontext()


def train_step(p: StepParts, clips: torch.Tensor, labels: torch.Tensor, lr: float, stage=_no_stage
               ) -> dict[str, float]:
    """One optimizer step; returns the loss terms as floats. A non-finite term raises NonFiniteLoss naming it
    (before any weight changes)."""
    cfg = p.cfg
    for g in p.optimizer.param_groups:
        g["lr"] = lr
    with stage("data"):
        x, y = p.prec.to_input(clips, p.device), labels.to(p.device, non_blocking=True)
    with stage("forward"):
        with p.prec.autocast_ctx(p.device):
            out = p.net(x, **components.forward_flags(cfg))
        loss, terms = phase_loss(out, y, cfg.train.phase, cfg.model.nce_weights, cfg.model.nce_lambda)
        values = {"total": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss("non-finite loss: " + ", ".join(f"{k}={values[k]}" for k in bad))
    with stage("backward"):
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()
    with stage("optimizer"):
        if cfg.train.grad_clip > 0:
            p.scaler.unscale_(p.optimizer)
            nn.utils.clip_grad_norm_(p.model.parameters(), cfg.train.grad_clip)
        p.scaler.step(p.optimizer)
        p.scaler.update()
    return values


def build_parts(cfg, num_classes: int, info, log=lambda *_: None) -> StepParts:
    """Model, optimizer, scaler and precision for a single process, exactly as ``hcml train`` builds them (the
    benchmarks' entry; the loop adds DDP and resume on top)."""
    prec = components.precision(cfg, info.device)
    model = components.prepare_model(components.model_from_config(cfg, num_classes, log), cfg, info, prec, log)
    net = torch.compile(model, mode=cfg.train.compile_mode) if prec.compile else model
    return StepParts(cfg, model, net, components.build_optimizer(model, cfg, info, log),
                     torch.amp.GradScaler(info.device.type, enabled=prec.autocast == torch.float16), prec,
                     info.device)
