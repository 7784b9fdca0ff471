"""``hcml bench op``: the cost volume (this project's op vs the unfold reference vs spatial-correlation-sampler),
forward and forward+backward, achieved GB/s against the op's memory-traffic model and the card's HBM peak.

``--sweep`` times every cost-volume shape the paper's models run, read off the models themselves (a hook on the
prime motion block of R2D-50 and R(2+1)D-101 built from their K400 recipes), not typed in by hand.
"""

from __future__ import annotations

import torch

from hcml.errors import ConfigError

from hcml.launch.bench import device_name, device_of, time_fn
from hcml.ops import _cuda, cost_volume, cost_volume_reference, num_displacements

# Peak HBM bandwidth by device name fragment (GB/s), for the achieved-bandwidth column.
PEAK_BW = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}
# The default shape fits the device: on a GPU R2D-50's res2 cost volume at batch 128; on a CPU a smaller one (the
# GPU shape takes minutes and ~16 GB of memory on 2 CPU cores).
DEFAULT_SHAPE = {"cuda": (128, 64, 56, 56), "cpu": (8, 64, 28, 28)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWEEP_RECIPES = ("k400_r2d50_joint", "k400_r21d101_joint")


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for k, bw in PEAK_BW.items() if k in name), None)


def traffic_bytes(shape, D: int, esize: int) -> tuple[int, int]:
    """(forward, backward) bytes of an ideal kernel: read f1, f2, write the volume; read grad, f1, f2, write
    both input grads."""
    B, C, H, W = shape
    return (2 * B * C * H * W + B * D * D * H * W) * esize, (B * D * D * H * W + 4 * B * C * H * W) * esize


def _scs_cost_volume(md: int, s: int):
    """spatial-correlation-sampler mapped to our layout: (B, D, D, H, W) sums → (B, D², H, W) means."""
    from spatial_correlation_sampler import spatial_correlation_sample

    D = num_displacements(md, s)

    def fn(f1, f2):
        out = spatial_correlation_sample(f1, f2, kernel_size=1, patch_size=D, stride=1, padding=0,
                                         dilation_patch=s)
        B, _, _, H, W = out.shape
        return out.reshape(B, D * D, H, W) / f1.shape[1]

    return fn


def model_shapes(recipes=SWEEP_RECIPES) -> list[dict]:
    """The (B·T, C, H, W) cost-volume input of each recipe's model at its per-GPU batch, from a meta-device
    forward pass with a hook on the prime motion block (no memory, no compute)."""
    import dataclasses

    from hcml.launch.config import load_config, resolve_recipe
    from hcml.model import HCML

    out = []
    for name in recipes:
        cfg = load_config(resolve_recipe(name))
        d = cfg.data
        model = HCML(dataclasses.replace(cfg.model, num_classes=400)).to("meta")
        seen = {}
        h = model.prime.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].shape))
        with torch.no_grad():
            model(torch.empty(d.batch_size, 3, d.frames, d.crop, d.crop, device="meta"), with_nce=False)
        h.remove()
        B, C, T, H, W = seen["x"]
        out.append({"recipe": name, "arch": cfg.model.arch, "shape": [B * T, C, H, W],
                    "max_displacement": cfg.model.max_displacement, "stride": cfg.model.cv_stride})
    return out


def bench_op(shape=None, dtype: str = "fp32", md: int = 6, s: int = 2, iters: int = 20, device: str = "auto",
             channels_last: bool = False, impls: tuple[str, ...] = ("hcml", "reference", "scs")) -> dict:
    dev = device_of(device)
    shape = tuple(shape or DEFAULT_SHAPE[dev.type])
    dt = DTYPES[dtype]
    B, C, H, W = shape
    D = num_displacements(md, s)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f1 = torch.randn(B, C, H, W, device=dev, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
    f2 = torch.randn(B, C, H, W, device=dev, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
    fwd_bytes, bwd_bytes = traffic_bytes(shape, D, f1.element_size())
    fns = {}
    if "hcml" in impls:
        fns["hcml"] = lambda a, b: cost_volume(a, b, md, s)
        if dev.type == "cuda" and _cuda.kernel_for(md, s, dt, dev) == "tensor_core":
            fns[CUDA_CORES] = fns["hcml"]  # the same op with the tensor-core kernels switched off
    if "reference" in impls:
        fns["reference"] = lambda a, b: cost_volume_reference(a, b, md, s)
    if "scs" in impls:
        try:
            fns["spatial-correlation-sampler"] = _scs_cost_volume(md, s)
        except ImportError:
            pass
    peak = peak_bandwidth(dev)
    card = next((k for k in PEAKS if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)), None)
    floors = roofline(shape, D, f1.element_size(), backward=True)["cards"].get(card) if card else None
    res = {"device": device_name(dev), "shape": list(shape), "dtype": dtype, "channels_last": channels_last,
           "max_displacement": md, "stride": s, "peak_GBps": peak, "roofline_us": floors, "impls": {}}
    g = torch.randn(B, D * D, H, W, device=dev, dtype=dt).contiguous(memory_format=fmt)
    if dev.type == "cuda":
        _cuda.reset_dispatch_counts()
    # several calls per event pair (launch overhead amortised) with a warm L2, and one call after an L2 flush
    calls = 10 if dev.type == "cuda" else 1
    for name, fn in fns.items():
        try:
            with _cuda.tensor_cores(name != CUDA_CORES):
                res["impls"][name] = _time_impl(fn, f1, f2, g, dev, iters, calls, fwd_bytes, bwd_bytes, peak, floors,
                                                unit=_cuda.kernel_for(md, s, dt, dev) if name in ("hcml", CUDA_CORES)
                                                else "fast")
        except Exception as e:  # e.g. the reference out of memory at full size
            res["impls"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if dev.type == "cuda":
        res["dispatch"] = _cuda.dispatch_counts()
    ok = res["impls"].get("hcml", {})
    for other in ("reference", "spatial-correlation-sampler", CUDA_CORES):
        o = res["impls"].get(other, {})
        if "forward_backward" in ok and "forward_backward" in o:
            res[f"speedup_fwd_bwd_vs_{other}"] = o["forward_backward"]["median_s"] / ok["forward_backward"]["median_s"]
    return res


CUDA_CORES = "hcml (CUDA cores)"


def _time_impl(fn, f1, f2, g, dev, iters: int, calls: int, fwd_bytes: int, bwd_bytes: int, peak, floors,
               unit: str) -> dict:
    """Forward and forward+backward times of one implementation (warm L2, N calls per event pair; on a GPU also
    after an L2 flush), GB/s, and % of the roofline of the unit it computes on (``tensor_core`` or CUDA cores)."""
    fwd = time_fn(lambda: fn(f1, f2), dev, iters, calls=calls)

    def fwd_bwd():
        f1.grad = f2.grad = None
        fn(f1, f2).backward(g)

    fb = time_fn(fwd_bwd, dev, iters, calls=calls)
    r = {"forward": fwd, "forward_backward": fb,
         "forward_GBps": fwd_bytes / fwd["median_s"] / 1e9,
         "forward_backward_GBps": (fwd_bytes + bwd_bytes) / fb["median_s"] / 1e9}
    if dev.type == "cuda":
        r["forward_cold_l2"] = time_fn(lambda: fn(f1, f2), dev, iters, cold_l2=True)
        r["forward_backward_cold_l2"] = time_fn(fwd_bwd, dev, iters, cold_l2=True)
    if peak:
        r["forward_pct_peak"] = 100 * r["forward_GBps"] / peak
    if floors:  # the floor of the unit these kernels use (tensor or CUDA cores) or memory, whichever binds
        tc = unit == "tensor_core"
        fwd_floor = floors["floor_tensor_core_us" if tc else "floor_cuda_core_us"]
        bwd_floor = floors["backward_floor_tensor_core_us" if tc else "backward_floor_us"]
        r["roofline_unit"] = "tensor cores" if tc else "CUDA cores"
        r["forward_pct_roofline"] = 100 * fwd_floor / 1e6 / fwd["median_s"]
        r["forward_backward_pct_roofline"] = 100 * (fwd_floor + bwd_floor) / 1e6 / fb["median_s"]
    return r


HELP = "cost volume: CUDA kernel vs reference vs spatial-correlation-sampler"


def add_args(b) -> None:
    from hcml.launch.cli import count

    b.add_argument("--shape", type=shape_arg, default=None, help="B,C,H,W (default: 128,64,56,56 on a GPU, "
                   "8,64,28,28 on a CPU)")
    b.add_argument("--sweep", action="store_true", help="every cost-volume shape the R2D-50/R(2+1)D-101 recipes run")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    b.add_argument("--channels-last", action="store_true", help="NHWC inputs (the layout the model runs in)")
    b.add_argument("--d", type=count(0), default=6, help="max displacement (a multiple of --s)")
    b.add_argument("--s", type=count(1), default=2, help="displacement stride")
    b.add_argument("--iters", type=count(1), default=20)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--static", action="store_true", help="no GPU needed: registers, spills, shared memory, "
                   "resident blocks and the SASS mix of every kernel (nvcc, sm_80 and sm_90), beside the roofline "
                   "floor of the models' shapes")
    b.add_argument("--json", action="store_true")


def shape_arg(text: str) -> tuple[int, ...]:
    import argparse

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,C,H,W (four positive integers), got {text!r}")
    return shape

# Vendor peak figures (SXM parts; not measurements): HBM GB/s, CUDA-core FP32 TFLOP/s (an FMA is 2 flops),
# dense bf16 tensor-core TFLOP/s.
PEAKS = {"H100": {"hbm_GBps": 3350.0, "fp32_TFLOPs": 67.0, "bf16_tc_TFLOPs": 989.0},
         "H200": {"hbm_GBps": 4800.0, "fp32_TFLOPs": 67.0, "bf16_tc_TFLOPs": 989.0}}


def roofline(shape, d: int, bytes_per_elem: int, backward: bool = False) -> dict:
    """The forward's floor per card: it reads f1 and f2 (2·N·C) and writes D²·N values (N = B·H·W pixels) and does
    2·D²·N·C flops; the floor is the larger of bytes / bandwidth and flops / peak of the unit doing them.
    ``backward``: also the fused backward's CUDA-core floor (reads g, f1, f2, writes g1, g2; twice the flops)."""
    B, C, H, W = shape
    n = B * H * W
    moved, flops = (2 * n * C + d * d * n) * bytes_per_elem, 2 * d * d * n * C
    out = {}
    for card, p in PEAKS.items():
        mem = moved / (p["hbm_GBps"] * 1e9)
        out[card] = {"memory_us": 1e6 * mem, "cuda_core_us": 1e6 * flops / (p["fp32_TFLOPs"] * 1e12),
                     "tensor_core_us": 1e6 * flops / (p["bf16_tc_TFLOPs"] * 1e12)}
        out[card]["floor_cuda_core_us"] = max(out[card]["memory_us"], out[card]["cuda_core_us"])
        out[card]["floor_tensor_core_us"] = max(out[card]["memory_us"], out[card]["tensor_core_us"])
        if backward:
            bwd_mem = (d * d * n + 4 * n * C) * bytes_per_elem / (p["hbm_GBps"] * 1e9)
            out[card]["backward_floor_us"] = 1e6 * max(bwd_mem, 2 * flops / (p["fp32_TFLOPs"] * 1e12))
            out[card]["backward_floor_tensor_core_us"] = 1e6 * max(bwd_mem, 2 * flops / (p["bf16_tc_TFLOPs"] * 1e12))
    return {"shape": list(shape), "D": d, "bytes": moved, "flops": flops, "cards": out}


def static_report() -> dict:
    from hcml.ops.static import BUDGET, kernel_report, over_budget

    rows = kernel_report()
    for r in rows:
        r["over_budget"] = over_budget(r)
        r["within_budget"] = not r["over_budget"]
    shapes = [(m["shape"], num_displacements(m["max_displacement"], m["stride"])) for m in model_shapes()]
    return {"kernels": rows, "budget": BUDGET,
            "roofline": [roofline(tuple(sh), d, 2) for sh, d in [((128, 64, 56, 56), 7), *shapes]]}


def run(args) -> dict:
    if args.static:
        return static_report()
    try:
        num_displacements(args.d, args.s)
    except ValueError:
        raise ConfigError(f"--d {args.d} must be a multiple of --s {args.s} (displacements -d, -d+s, ..., d)") from None
    shape = args.shape
    if not args.sweep:
        return bench_op(shape, args.dtype, args.d, args.s, args.iters, args.device, args.channels_last)
    rows = []
    for m in model_shapes():
        r = bench_op(m["shape"], args.dtype, m["max_displacement"], m["stride"], args.iters, args.device,
                     args.channels_last, impls=("hcml",))
        rows.append({**m, **r})
    return {"sweep": rows}


def _line(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name:<30} {r['error']}"
    pct = f" ({r['forward_pct_peak']:.0f}% of HBM peak)" if "forward_pct_peak" in r else ""
    roof = (f", {r['forward_pct_roofline']:.0f}% / {r['forward_backward_pct_roofline']:.0f}% of the "
            f"{r['roofline_unit']} roofline" if "forward_pct_roofline" in r else "")
    cold = (f"  [L2 flushed: fwd {r['forward_cold_l2']['median_s'] * 1e3:.3f} ms, fwd+bwd "
            f"{r['forward_backward_cold_l2']['median_s'] * 1e3:.3f} ms]" if "forward_cold_l2" in r else "")
    return (f"  {name:<30} fwd {r['forward']['median_s'] * 1e3:8.3f} ms {r['forward_GBps']:7.1f} GB/s{pct}   "
            f"fwd+bwd {r['forward_backward']['median_s'] * 1e3:8.3f} ms{roof}{cold}")


def show(res: dict) -> str:
    if "kernels" in res:
        lines = [f"{'arch':<6}{'regs':>5}{'spill B':>8}{'smem B':>7}{'blk/SM':>7}{'warps':>6}{'FFMA':>6}{'HMMA':>6}"
                 f"{'LDS':>6}{'LDSM':>6}{'LDG.128':>8}{'LDGSTS':>7}{'STG.128':>8}{'STG':>5}  budget  kernel"]
        for r in res["kernels"]:
            m = r["sass"] or {}
            lines.append(f"{r['arch']:<6}{r['registers']:>5}{r['spill_bytes']:>8}{r['smem_bytes']:>7}"
                         f"{r['blocks_per_sm']:>7}{r['warps_per_sm']:>6}{m.get('FFMA', '-'):>6}{m.get('HMMA', '-'):>6}"
                         f"{m.get('LDS', '-'):>6}{m.get('LDSM', '-'):>6}"
                         f"{m.get('LDG.E.128', '-'):>8}{m.get('LDGSTS.E.128', '-'):>7}{m.get('STG.E.128', '-'):>8}"
                         f"{m.get('STG', '-'):>5}  "
                         f"{'ok    ' if r['within_budget'] else 'OVER  '}  {r['name'].split('(')[0][5:70]}"
                         + (f"  ({', '.join(r['over_budget'])})" if r["over_budget"] else ""))
        over = sum(not r["within_budget"] for r in res["kernels"])
        lines.append(f"{over} of {len(res['kernels'])} kernel builds over the budget (no spills, >= "
                     f"{res['budget']['min_blocks_per_sm']} blocks/SM with their shared memory, 16-byte global "
                     "loads (cp.async in the tensor-core kernels) and stores in the compile-time kernels, HMMA and "
                     "LDSM in the tensor-core ones)")
        for r in res["roofline"]:
            c = r["cards"]
            lines.append(f"roofline bf16 forward {tuple(r['shape'])} D={r['D']}: " + "; ".join(
                f"{k} floor {v['floor_cuda_core_us']:.0f} us CUDA cores / {v['floor_tensor_core_us']:.0f} us tensor "
                f"cores (memory {v['memory_us']:.0f} us)" for k, v in c.items()))
        return "\n".join(lines)
    if "sweep" in res:
        lines = ["cost-volume shapes the models run (per-GPU batch of each recipe):"]
        for r in res["sweep"]:
            lines.append(f"{r['recipe']} ({r['arch']}): {tuple(r['shape'])} {r['dtype']} "
                         f"channels_last={r['channels_last']} on {r['device']}")
            lines += [_line(name, impl) for name, impl in r["impls"].items()]
        return "\n".join(lines)
    lines = [f"cost volume {tuple(res['shape'])} {res['dtype']} channels_last={res['channels_last']} "
             f"d={res['max_displacement']} s={res['stride']} on {res['device']} (peak {res['peak_GBps'] or 'n/a'} GB/s)"]
    lines += [_line(name, r) for name, r in res["impls"].items()]
    lines += [f"  {k}: {v:.2f}x" for k, v in res.items() if k.startswith("speedup")]
    if "dispatch" in res:
        lines.append(f"  kernels that served the calls: {res['dispatch']}")
    return "\n".join(lines)
