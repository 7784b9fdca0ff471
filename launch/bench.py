"""``hcml bench``: one harness (warm-up, timed iterations, CUDA events on GPU, median/min/max, JSON).

Performance goals live here, never in unit tests. Ratios are always measured within one run.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

# Peak HBM bandwidth by device name fragment (GB/s), for the achieved-bandwidth column.
PEAK_BW = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is visible")
    return torch.device(name)


def summarize_times(times: list[float]) -> dict:
    """The one summary every bench target reports: median/min/max seconds and the count."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": len(times)}


def time_fn(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> dict:
    """Median/min/max seconds per call of ``fn`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return summarize_times(times)


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for k, bw in PEAK_BW.items() if k in name), None)


def _scs_cost_volume(md: int, s: int):
    """spatial-correlation-sampler mapped to our layout: (B, D, D, H, W) sums → (B, D², H, W) means."""
    from spatial_correlation_sampler import spatial_correlation_sample

    D = 2 * (md // s) + 1

    def fn(f1, f2):
        out = spatial_correlation_sample(f1, f2, kernel_size=1, patch_size=D, stride=1, padding=0,
                                         dilation_patch=s)
        B, _, _, H, W = out.shape
        return out.reshape(B, D * D, H, W) / f1.shape[1]

    return fn


def bench_op(shape=(128, 64, 56, 56), dtype: str = "fp32", md: int = 6, s: int = 2, iters: int = 20,
             device: str = "auto") -> dict:
    from hcml.ops import cost_volume, cost_volume_reference

    dev = _device(device)
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    B, C, H, W = shape
    D = 2 * (md // s) + 1
    f1 = torch.randn(B, C, H, W, device=dev, dtype=dt, requires_grad=True)
    f2 = torch.randn(B, C, H, W, device=dev, dtype=dt, requires_grad=True)
    esize = f1.element_size()
    fwd_bytes = (2 * B * C * H * W + B * D * D * H * W) * esize
    bwd_bytes = (B * D * D * H * W + 4 * B * C * H * W) * esize
    impls = {"hcml": lambda a, b: cost_volume(a, b, md, s), "reference": lambda a, b: cost_volume_reference(a, b, md, s)}
    try:
        impls["spatial-correlation-sampler"] = _scs_cost_volume(md, s)
    except ImportError:
        pass
    peak = peak_bandwidth(dev)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "shape": list(shape),
           "dtype": dtype, "max_displacement": md, "stride": s, "peak_GBps": peak, "impls": {}}
    for name, fn in impls.items():
        try:
            g = torch.randn(B, D * D, H, W, device=dev, dtype=dt)
            fwd = time_fn(lambda: fn(f1, f2), dev, iters)

            def fwd_bwd():
                f1.grad = f2.grad = None
                fn(f1, f2).backward(g)

            fb = time_fn(fwd_bwd, dev, iters)
            r = {"forward": fwd, "forward_backward": fb,
                 "forward_GBps": fwd_bytes / fwd["median_s"] / 1e9,
                 "forward_backward_GBps": (fwd_bytes + bwd_bytes) / fb["median_s"] / 1e9}
            if peak:
                r["forward_pct_peak"] = 100 * r["forward_GBps"] / peak
            res["impls"][name] = r
        except Exception as e:  # e.g. the reference out of memory at full size
            res["impls"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ok = res["impls"].get("hcml", {})
    for other in ("reference", "spatial-correlation-sampler"):
        o = res["impls"].get(other, {})
        if "forward_backward" in ok and "forward_backward" in o:
            res[f"speedup_fwd_bwd_vs_{other}"] = o["forward_backward"]["median_s"] / ok["forward_backward"]["median_s"]
    return res


def bench_model(arch="r2d50", frames=16, size=224, batch=8, compile_=False, dtype="fp32", channels_last=False,
                iters=10, device="auto", compare=False) -> dict:
    from hcml.model import build_model, phase_loss
    from hcml.model.summary import summarize

    dev = _device(device)
    macs = summarize(build_model(arch, 400), frames, size)["gmacs_per_clip"]

    def run(compile_, dtype, channels_last):
        torch.manual_seed(0)
        model = build_model(arch, 400).to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        net = torch.compile(model) if compile_ else model
        x = torch.randn(batch, 3, frames, size, size, device=dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = torch.randint(0, 400, (batch,), device=dev)
        adt = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        scaler = torch.amp.GradScaler(dev.type, enabled=adt == torch.float16)

        def step():
            ctx = torch.autocast(dev.type, dtype=adt) if adt else nullcontext()
            with ctx:
                out = net(x)
            loss, _ = phase_loss(out, y, "joint", (0.25, 0.25, 1.0), 15.0)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        t = time_fn(step, dev, iters, warmup=3 if compile_ else 2)
        return {"compile": compile_, "dtype": dtype, "channels_last": channels_last, **t,
                "clips_per_s": batch / t["median_s"]}

    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "arch": arch,
           "frames": frames, "size": size, "batch": batch, "gmacs_per_clip": macs,
           "runs": [run(compile_, dtype, channels_last)]}
    if compare:
        res["runs"].append(run(False, "fp32", False))
        res["speedup_vs_eager_fp32"] = res["runs"][0]["clips_per_s"] / res["runs"][1]["clips_per_s"]
    return res


def _show_op(res: dict) -> None:
    print(f"cost volume {tuple(res['shape'])} {res['dtype']} d={res['max_displacement']} s={res['stride']} on "
          f"{res['device']} (peak {res['peak_GBps'] or 'n/a'} GB/s)")
    for name, r in res["impls"].items():
        if "error" in r:
            print(f"  {name:<30} {r['error']}")
            continue
        pct = f" ({r['forward_pct_peak']:.0f}% of peak)" if "forward_pct_peak" in r else ""
        print(f"  {name:<30} fwd {r['forward']['median_s'] * 1e3:8.2f} ms {r['forward_GBps']:7.1f} GB/s{pct}   "
              f"fwd+bwd {r['forward_backward']['median_s'] * 1e3:8.2f} ms")
    for k, v in res.items():
        if k.startswith("speedup"):
            print(f"  {k}: {v:.2f}x")


def _show_model(res: dict) -> None:
    print(f"{res['arch']} T={res['frames']} {res['size']}px batch {res['batch']} on {res['device']}: "
          f"{res['gmacs_per_clip']:.1f} GMACs/clip")
    for r in res["runs"]:
        print(f"  compile={r['compile']!s:<5} {r['dtype']:<5} channels_last={r['channels_last']!s:<5} "
              f"{r['clips_per_s']:8.2f} clips/s (step {r['median_s'] * 1e3:.1f} ms median)")
    if "speedup_vs_eager_fp32" in res:
        print(f"  speed-up vs eager fp32: {res['speedup_vs_eager_fp32']:.2f}x")


def _show_pipeline(res: dict) -> None:
    print(f"input pipeline on {res['data']} (batch {res['batch']}, T={res['frames']}, {res['threads']} threads/workers)")
    for k, label in (("dali", f"DALI ({res['device']})"), ("pyav", "PyAV CPU loader")):
        r = res[k]
        print(f"  {label:<20} {r['clips_per_s']:8.1f} clips/s {r['frames_per_s']:9.0f} frames/s")
    print(f"  DALI / PyAV: {res['speedup_dali_vs_pyav']:.2f}x")


def _show_train(res: dict) -> None:
    print(f"train step {res['arch']} batch {res['batch']} T={res['frames']} on {res['device']}: "
          f"{res['step_s'] * 1e3:.1f} ms, {res['clips_per_s']:.1f} clips/s")
    for k, v in res["stages_median_s"].items():
        print(f"  {k:<10} {v * 1e3:8.1f} ms  {100 * v / res['step_s']:5.1f}%")
    print(f"  bottleneck: {res['bottleneck']}   data-wait fraction {100 * res['data_wait_fraction']:.1f}%")


def main(args) -> int:
    """``hcml bench TARGET``: run the target, print JSON (``--json``) or a readable summary."""
    targets = {
        "op": (lambda: bench_op(tuple(int(v) for v in args.shape.split(",")), args.dtype, args.d, args.s,
                                args.iters, args.device), _show_op),
        "model": (lambda: bench_model(args.arch, args.frames, args.size, args.batch, args.compile, args.dtype,
                                      args.channels_last, args.iters, args.device, args.compare), _show_model),
        "pipeline": (lambda: bench_pipeline(args.data, args.config, args.device, args.batches, args.threads,
                                            args.overrides), _show_pipeline),
        "train": (lambda: bench_train(args.data, args.config, args.steps, args.overrides, args.trace), _show_train),
    }
    run, show = targets[args.what]
    res = run()
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        show(res)
    return 0


# ---------------------------------------------------------------- input pipeline: DALI vs a PyAV loader
class PyAVClips(torch.utils.data.Dataset):
    """The loader PySlowFast-style code uses: PyAV decode on CPU workers, then the same augmentation
    (random shorter side, one random crop for all frames, flip, normalise) in numpy/torch."""

    def __init__(self, samples, spec, seed: int = 0):
        self.samples, self.spec, self.seed = list(samples), spec, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        import av

        from hcml.pipeline.loader import clip_start

        s, spec = self.samples[i], self.spec
        rng = np.random.default_rng([self.seed, i])
        start = clip_start(self.seed, 0, i, s.num_frames, spec.span)
        want = set(range(start, start + spec.span, spec.stride))
        frames = []
        with av.open(s.path) as c:
            for k, fr in enumerate(c.decode(video=0)):
                if k in want:
                    frames.append(fr.to_ndarray(format="rgb24"))
                if k >= start + spec.span - 1:
                    break
        while len(frames) < spec.frames:
            frames.append(frames[-1])
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # T, C, H, W
        short = int(rng.uniform(*spec.short_side))
        H, W = x.shape[-2:]
        size = (short, round(W * short / H)) if H <= W else (round(H * short / W), short)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y0 = int(rng.integers(0, x.shape[-2] - spec.crop + 1))
        x0 = int(rng.integers(0, x.shape[-1] - spec.crop + 1))
        x = x[..., y0:y0 + spec.crop, x0:x0 + spec.crop]
        if spec.flip != "none" and rng.random() < 0.5:
            x = x.flip(-1)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        return ((x - mean) / std).permute(1, 0, 2, 3), s.label


def bench_pipeline(data: str, config: str | None = None, device: str = "auto", batches: int = 20,
                   threads: int | None = None, overrides: list[str] | None = None) -> dict:
    """Clips/s and decoded frames/s of the DALI pipeline and of the PyAV loader, same data, same cores."""
    import os
    import tempfile

    from hcml.launch.config import load_config
    from hcml.launch.train import augment_spec
    from hcml.pipeline.dataset import load_prepared
    from hcml.pipeline.loader import TrainLoader, dali_device

    cfg = load_config(config, [f"data.root={data}", *(overrides or [])])
    ds = load_prepared(cfg.data.root)
    spec = augment_spec(cfg)
    threads = threads or cfg.data.threads
    ddev = dali_device(device if device != "auto" else cfg.data.device)
    B = cfg.data.batch_size
    res = {"data": str(data), "device": ddev, "threads": threads, "batch": B, "frames": spec.frames}

    def run(iterable, n):
        it = iter(iterable)
        next(it)  # warm-up (pipeline build, worker start)
        t0 = t = time.perf_counter()
        got, per_batch = 0, []
        for _ in range(n):
            try:
                x, _ = next(it)
            except StopIteration:
                break
            if x.is_cuda:
                torch.cuda.synchronize()
            got += x.shape[0]
            now = time.perf_counter()
            per_batch.append(now - t)
            t = now
        dt = time.perf_counter() - t0
        return {"clips_per_s": got / dt, "frames_per_s": got * spec.frames / dt, "clips": got, "seconds": dt,
                "batch": summarize_times(per_batch)}

    with tempfile.TemporaryDirectory() as tmp:
        tl = TrainLoader(ds.train, spec, batch_size=B, work_dir=tmp, device=ddev, device_id=0 if ddev == "gpu" else None,
                         threads=threads)
        n = min(batches, tl.steps_per_epoch - 1)
        res["dali"] = run(tl.epoch(0), n)
    dl = torch.utils.data.DataLoader(PyAVClips(ds.train, spec), batch_size=B, num_workers=threads, shuffle=True,
                                     drop_last=True, persistent_workers=False)
    res["pyav"] = run(dl, n)
    res["speedup_dali_vs_pyav"] = res["dali"]["clips_per_s"] / res["pyav"]["clips_per_s"]
    res["cpu_cores"] = os.cpu_count()
    return res


# ---------------------------------------------------------------- a training step, broken down
def bench_train(data: str, config: str | None = None, steps: int = 10, overrides: list[str] | None = None,
                trace: str | None = None) -> dict:
    """Median seconds per stage of a train step (data-wait, forward, backward, optimizer) and the bottleneck.
    On GPU each stage is closed by a synchronize and wrapped in an NVTX range (visible in Nsight Systems);
    ``trace``: also write a torch.profiler Chrome trace of the timed steps to that file."""
    import tempfile

    from hcml.launch.config import load_config
    from hcml.launch.train import augment_spec, build_net, resolve_speed_switches
    from hcml.model import phase_loss
    from hcml.pipeline.dataset import load_prepared
    from hcml.pipeline.loader import TrainLoader, dali_device

    cfg = load_config(config, [f"data.root={data}", *(overrides or [])])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_prepared(cfg.data.root)
    m = cfg.model
    model = build_net(cfg, m.num_classes or ds.num_classes).to(dev)  # every model.* key, as training builds it
    adt, use_compile, cl = resolve_speed_switches(cfg, dev)
    if cl:
        model = model.to(memory_format=torch.channels_last_3d)
    net = torch.compile(model) if use_compile else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ddev = dali_device(cfg.data.device)
    stages: dict[str, list[float]] = {"data_wait": [], "forward": [], "backward": [], "optimizer": []}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def nvtx(name):
        return torch.cuda.nvtx.range(name) if dev.type == "cuda" else nullcontext()

    profiler = nullcontext()
    if trace:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if dev.type == "cuda" else [])
        profiler = torch.profiler.profile(activities=acts, record_shapes=False)
    with tempfile.TemporaryDirectory() as tmp, profiler as prof:
        tl = TrainLoader(ds.train, augment_spec(cfg), batch_size=cfg.data.batch_size, work_dir=tmp, device=ddev,
                         device_id=0 if ddev == "gpu" else None, threads=cfg.data.threads)
        it = tl.epoch(0)
        for i in range(min(steps + 2, tl.steps_per_epoch)):
            t0 = time.perf_counter()
            with nvtx("data_wait"):
                x, y = next(it)
                x, y = x.to(dev), y.to(dev)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                sync()
            t1 = time.perf_counter()
            with nvtx("forward"), (torch.autocast(dev.type, dtype=adt) if adt else nullcontext()):
                out = net(x)
            loss, _ = phase_loss(out, y, cfg.train.phase, m.nce_weights, m.nce_lambda)
            sync()
            t2 = time.perf_counter()
            with nvtx("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sync()
            t3 = time.perf_counter()
            with nvtx("optimizer"):
                opt.step()
                sync()
            t4 = time.perf_counter()
            if i >= 2:  # skip warm-up / compile steps
                for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    stages[k].append(v)
    if trace:
        prof.export_chrome_trace(trace)
    summary = {k: summarize_times(v) for k, v in stages.items() if v}
    med = {k: v["median_s"] for k, v in summary.items()}
    step = sum(med.values())
    return {"device": str(dev), "arch": m.arch, "batch": cfg.data.batch_size, "frames": cfg.data.frames,
            "stages_median_s": med, "stages": summary, "step_s": step, "clips_per_s": cfg.data.batch_size / step,
            "data_wait_fraction": med["data_wait"] / step, "bottleneck": max(med, key=med.get),
            "communication_s": 0.0, "note": "single process: no gradient communication in this breakdown"}
