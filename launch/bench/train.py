"""``hcml bench train``: a training step on real data, built exactly as ``hcml train`` builds it.

By default it measures the overlapped steady state, as a run sees it: no synchronisation between stages, so the
GPU computes while DALI prepares the next batch; the data-wait share is the time the loop blocks on the loader
(the figure ``hcml train`` exports as ``hcml_data_wait_ratio``). ``--breakdown`` synchronises after each stage
(data wait, forward, backward, optimizer) for a per-stage split with NVTX ranges for Nsight Systems; that split
serialises the pipeline, so its data-wait share is an upper bound. ``--trace`` writes a torch.profiler Chrome
trace of the timed steps.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

from hcml.launch.bench import summarize_times


def bench_train(data: str, config: str | None = None, steps: int = 20, overrides: list[str] | None = None,
                trace: str | None = None, breakdown: bool = False, warmup: int = 3) -> dict:
    from hcml.launch import components
    from hcml.launch.config import load_config
    from hcml.launch.distributed import DistInfo
    from hcml.launch.step import build_parts, train_step

    cfg = load_config(config, [f"data.root={data}", *(overrides or [])])
    info = DistInfo.local()
    dev = info.device
    ds = components.check_runnable(cfg)
    parts = build_parts(cfg, components.num_classes(cfg, ds), info)
    videos = len(components.train_videos(cfg, ds))
    sched = components.schedule(cfg, components.data_spec(cfg, ds, dev).steps_per_epoch(videos, 1), info)
    m = cfg.model

    profiler = nullcontext()
    if trace:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if dev.type == "cuda" else [])
        profiler = torch.profiler.profile(activities=acts, record_shapes=False)
    stages: dict[str, list[float]] = {"data_wait": [], "forward": [], "backward": [], "optimizer": []}
    step_times = []
    timed = {"on": False}

    @contextmanager
    def stage(name: str):
        """Around each part of the step: an NVTX range; with --breakdown a sync and the part's time."""
        t = time.perf_counter()
        with torch.cuda.nvtx.range(name) if dev.type == "cuda" else nullcontext():
            yield
            if breakdown and dev.type == "cuda":
                torch.cuda.synchronize()
        if timed["on"]:
            key = "data_wait" if name == "data" else name
            stages[key][-1] += time.perf_counter() - t

    with profiler as prof:
        it = components.train_loader(cfg, ds, info).cycle()
        t_start = None
        for i in range(steps + warmup):
            if i == warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t_start = time.perf_counter()
            timed["on"] = i >= warmup
            if timed["on"]:
                for v in stages.values():
                    v.append(0.0)
            t0 = time.perf_counter()
            x, y = next(it)  # the wait for the loader belongs to the data stage
            if timed["on"]:
                stages["data_wait"][-1] += time.perf_counter() - t0
            train_step(parts, x, y, sched.lr(i), stage)
            if timed["on"]:
                step_times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t_start
    if trace:
        prof.export_chrome_trace(trace)
    B = cfg.data.batch_size
    res = {"device": str(dev), "arch": m.arch, "batch": B, "frames": cfg.data.frames, "steps": steps,
           "mode": "breakdown (synchronised stages)" if breakdown else "overlapped steady state",
           "wall_s": wall, "step_s": wall / steps, "clips_per_s": B * steps / wall,
           "data_wait_s": sum(stages["data_wait"]), "data_wait_fraction": sum(stages["data_wait"]) / wall,
           "step": summarize_times(step_times),
           "communication_s": 0.0, "note": "single process: no gradient communication in this figure"}
    if breakdown:
        summary = {k: summarize_times(v) for k, v in stages.items()}
        med = {k: v["median_s"] for k, v in summary.items()}
        res.update(stages=summary, stages_median_s=med, bottleneck=max(med, key=med.get))
    return res


HELP = "a real training step: overlapped steady state (or --breakdown per stage)"


def add_args(b) -> None:
    from hcml.launch.cli import count

    b.add_argument("--data", required=True)
    b.add_argument("--config", default=None)
    b.add_argument("--steps", type=count(1), default=20)
    b.add_argument("--breakdown", action="store_true", help="synchronise after each stage: data-wait / forward / "
                   "backward / optimizer (serialises the pipeline)")
    b.add_argument("--trace", default=None, help="write a torch.profiler Chrome trace (JSON) of the timed steps")
    b.add_argument("--json", action="store_true")
    b.add_argument("overrides", nargs="*")


def run(args) -> dict:
    return bench_train(args.data, args.config, args.steps, args.overrides, args.trace, args.breakdown)


def show(res: dict) -> str:
    lines = [f"train step {res['arch']} batch {res['batch']} T={res['frames']} on {res['device']}, {res['mode']}: "
             f"{res['step_s'] * 1e3:.1f} ms/step, {res['clips_per_s']:.1f} clips/s over {res['steps']} steps; "
             f"data wait {100 * res['data_wait_fraction']:.1f}% of the time"]
    for k, v in res.get("stages_median_s", {}).items():
        lines.append(f"  {k:<10} {v * 1e3:8.1f} ms median")
    if "bottleneck" in res:
        lines.append(f"  bottleneck: {res['bottleneck']}")
    return "\n".join(lines)
