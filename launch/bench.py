"""``hcml bench``: one harness (warm-up, timed iterations, CUDA events on GPU, median/min/max, JSON).

Performance goals live here, never in unit tests. Ratios are always measured within one run.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch

# Peak HBM bandwidth by device name fragment (GB/s), for the achieved-bandwidth column.
PEAK_BW = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is visible")
    return torch.device(name)


def time_fn(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> dict:
    """Median/min/max seconds per call of ``fn``."""
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
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": iters}


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


def main(args) -> int:
    if args.what == "op":
        res = bench_op(tuple(int(v) for v in args.shape.split(",")), args.dtype, args.d, args.s, args.iters,
                       args.device)
        if args.json:
            print(json.dumps(res, indent=1))
            return 0
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
        return 0
    if args.what == "model":
        res = bench_model(args.arch, args.frames, args.size, args.batch, args.compile, args.dtype, args.channels_last,
                          args.iters, args.device, args.compare)
        if args.json:
            print(json.dumps(res, indent=1))
            return 0
        print(f"{res['arch']} T={res['frames']} {res['size']}px batch {res['batch']} on {res['device']}: "
              f"{res['gmacs_per_clip']:.1f} GMACs/clip")
        for r in res["runs"]:
            print(f"  compile={r['compile']!s:<5} {r['dtype']:<5} channels_last={r['channels_last']!s:<5} "
                  f"{r['clips_per_s']:8.2f} clips/s (step {r['median_s'] * 1e3:.1f} ms median)")
        if "speedup_vs_eager_fp32" in res:
            print(f"  speed-up vs eager fp32: {res['speedup_vs_eager_fp32']:.2f}x")
        return 0
    raise SystemExit(f"unknown bench target {args.what}")
