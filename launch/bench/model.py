"""``hcml bench model``: clips/s of a full training step (forward with the joint loss, backward, SGD) on random
clips, so that only the model is measured.

``--compare`` runs, in one process on one card, the four variants whose ratios say what each speed switch is worth: HCML eager fp32, HCML eager
bf16 channels_last, HCML compiled bf16 channels_last, and the same backbone without the motion module (compiled
bf16 channels_last), and reports the ratios. ``--profile`` prints the top kernels of the main variant
(torch.profiler: CUDA time on a GPU, CPU time otherwise), so a user sees the bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hcml.launch.bench import device_name, device_of, time_fn
from hcml.model import build_model
from hcml.model.summary import summarize

@dataclass(frozen=True)
class Variant:
    name: str
    motion: bool = True
    compile: bool = False
    dtype: str = "fp32"
    channels_last: bool = False


COMPARE = (Variant("HCML eager fp32"),
           Variant("HCML eager bf16 channels_last", dtype="bf16", channels_last=True),
           Variant("HCML compiled bf16 channels_last", compile=True, dtype="bf16", channels_last=True),
           Variant("backbone only, compiled bf16 channels_last", motion=False, compile=True, dtype="bf16",
                   channels_last=True))


def make_step(v: Variant, arch: str, frames: int, size: int, batch: int, dev: torch.device, backend: str):
    """A closure running one training step of variant ``v``: :func:`hcml.launch.step.train_step`, the step
    ``hcml train`` runs (phase loss with the recipe defaults' weights, GradScaler, the configured optimizer), on
    one random batch."""
    from hcml.launch.config import load_config
    from hcml.launch.distributed import DistInfo
    from hcml.launch.step import build_parts, train_step

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", f"model.motion={str(v.motion).lower()}",
                             f"train.phase={'joint' if v.motion else 'finetune'}", f"data.frames={frames}",
                             f"train.amp={'none' if v.dtype == 'fp32' else v.dtype}", "train.compile=false",
                             f"train.channels_last={str(v.channels_last).lower()}", "train.bn=local"])
    parts = build_parts(cfg, 400, DistInfo(device=dev))
    if v.compile:
        parts.net = torch.compile(parts.model, backend=backend, mode=cfg.train.compile_mode)
    x = torch.randn(batch, 3, frames, size, size, device=dev)
    y = torch.randint(0, 400, (batch,), device=dev)

    def step():
        train_step(parts, x, y, 1e-3)

    return step


def top_kernels(step, dev: torch.device, steps: int = 3, n: int = 15) -> list[dict]:
    """The ``n`` operators/kernels with the most self time over ``steps`` steps (CUDA kernels on a GPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: -getattr(e, key))
    return [{"name": e.key[:90], "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total,
             "calls_per_step": e.count / steps} for e in events[:n]]


def bench_model(arch="r2d50", frames=16, size=224, batch=8, iters=10, device="auto", compare=False,
                variant: Variant = Variant("HCML"), profile=False, backend="inductor") -> dict:
    dev = device_of(device)
    res = {"device": device_name(dev), "arch": arch, "frames": frames, "size": size, "batch": batch,
           "gmacs_per_clip": summarize(build_model(arch, 400), frames, size)["gmacs_per_clip"],
           "compile_backend": backend, "runs": []}
    variants = COMPARE if compare else (variant,)
    main = COMPARE[2] if compare else variant  # the variant --profile looks into
    for v in variants:
        step = make_step(v, arch, frames, size, batch, dev, backend)
        t = time_fn(step, dev, iters, warmup=3 if v.compile else 2)
        res["runs"].append({**v.__dict__, **t, "clips_per_s": batch / t["median_s"]})
        if profile and v == main:
            res["profile"] = {"variant": v.name, "top": top_kernels(step, dev)}
        del step
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if compare:
        rate = {r["name"]: r["clips_per_s"] for r in res["runs"]}
        best = rate[COMPARE[2].name]
        res["ratios"] = {"compiled_bf16_cl_vs_eager_fp32": best / rate[COMPARE[0].name],
                         "compiled_bf16_cl_vs_eager_bf16_cl": best / rate[COMPARE[1].name],
                         "hcml_vs_backbone_only": best / rate[COMPARE[3].name]}
    return res


HELP = "train-step clips/s (random clips) and GMACs per clip"


def add_args(b) -> None:
    from hcml.launch.cli import add_model_args, count

    add_model_args(b)
    b.add_argument("--batch", type=count(1), default=8)
    b.add_argument("--compile", action="store_true")
    b.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; eager/aot_eager for checks)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--compare", action="store_true", help="in one run: HCML eager fp32, eager bf16 channels_last, "
                   "compiled bf16 channels_last, and the backbone alone compiled bf16 channels_last")
    b.add_argument("--profile", action="store_true", help="print the top kernels (torch.profiler)")
    b.add_argument("--iters", type=count(1), default=10)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--json", action="store_true")

def run(args) -> dict:
    v = Variant("HCML" if not args.no_motion else "backbone only", motion=not args.no_motion,
                compile=args.compile, dtype=args.dtype, channels_last=args.channels_last)
    return bench_model(args.arch, args.frames, args.size, args.batch, args.iters, args.device, args.compare, v,
                       args.profile, args.backend)


def show(res: dict) -> str:
    lines = [f"{res['arch']} T={res['frames']} {res['size']}px batch {res['batch']} on {res['device']}: "
             f"{res['gmacs_per_clip']:.1f} GMACs/clip"]
    for r in res["runs"]:
        lines.append(f"  {r['name']:<44} {r['clips_per_s']:8.2f} clips/s (step {r['median_s'] * 1e3:.1f} ms median "
                     f"of {r['iters']})")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"  {k}: {v:.2f}x")
    if "profile" in res:
        lines.append(f"top kernels of '{res['profile']['variant']}' (per step):")
        lines += [f"  {100 * k['share']:5.1f}%  {k['ms_per_step']:8.2f} ms  x{k['calls_per_step']:<5.0f} {k['name']}"
                  for k in res["profile"]["top"]]
    return "\n".join(lines)
