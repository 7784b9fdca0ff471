"""``hcml export``: a checkpoint's inference network as a ``torch.export`` program (``.pt2``) for serving.

The graph is clips (B, 3, T, S, S) float → logits (B, classes); the cost volume stays one node,
``hcml::cost_volume`` (a ``torch.library`` custom op whose fake implementation makes it traceable). Loading needs
torch and ``import hcml.ops`` (which registers the op; nothing else of hcml), then ``torch.export.load(path)``. The
file carries ``hcml.json`` (class names, T, S, normalisation, eval views) so a server can prepare its input the way
``hcml eval`` does. ``--aoti`` also compiles an AOTInductor package: on this torch the custom op is then called
back through Python, so that package too needs a Python process with ``hcml.ops`` imported (a C++-only server
would need the op registered with ``TORCH_LIBRARY``, which hcml does not ship); a CUDA package must be compiled on
a machine with the GPU and nvcc.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hcml.errors import HCMLError
from hcml.files import atomic_write, temp_prefix
from hcml.launch import components
from hcml.model import Classifier

# The exported program runs the same ATen kernels as the eager model: on CPU its logits are measured identical
# (0.0 apart) in float32, and the AOTInductor package's (generated C++ kernels) 2e-8 apart. The check allows:
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # max |exported - eager| / max(1, max |eager|)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
META = "hcml.json"


def metadata(trained: components.Trained, frames: int, crop: int, dtype: str, dynamic: bool) -> dict:
    d, m = trained.cfg.data, trained.cfg.model
    return {"format": "hcml-export-1", "arch": m.arch, "motion": m.motion, "classes": trained.classes,
            "classes_from": trained.classes_from, "input": {"shape": ["B" if dynamic else 1, 3, frames, crop, crop],
                                                            "layout": "NCTHW", "dtype": dtype, "range": "RGB / 255"},
            "normalize": {"mean": list(d.mean), "std": list(d.std)}, "frames": frames, "stride": d.stride,
            "crop": crop, "eval_short_side": d.eval_short_side, "views": f"{d.eval_clips}x{d.eval_crops}",
            "output": "logits (softmax for probabilities; hcml eval averages the softmax over the views)"}


def check_close(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    err = float((got.float() - ref.float()).abs().max() / max(1.0, float(ref.float().abs().max())))
    if err > TOLERANCE[dtype]:
        raise HCMLError(f"{what}: logits {err:.3g} apart from the eager model's (tolerance {TOLERANCE[dtype]:g} "
                        f"for {dtype}); not written")
    return err


def run_export(checkpoint: str, out: str, frames: int | None = None, crop: int | None = None,
               dynamic_batch: bool = False, dtype: str = "float32", aoti: str | None = None,
               classes: str | None = None, device: str = "cpu") -> int:
    if Path(out).suffix != ".pt2":
        raise HCMLError(f"--out {out}: expected a .pt2 file (torch.export's format)")
    if aoti and Path(aoti).suffix != ".pt2":
        raise HCMLError(f"--aoti {aoti}: expected a .pt2 file (an AOTInductor package)")
    if device not in ("cpu", "cuda"):
        raise HCMLError(f"--device {device}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise HCMLError("--device cuda: no CUDA device is visible (a CUDA program is exported on the GPU)")
    if dtype not in DTYPES:
        raise HCMLError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and device == "cpu":
        raise HCMLError("--dtype bfloat16 needs --device cuda: torch's CPU kernels lack bfloat16 for avg_pool3d "
                        "(torch 2.13), so a CPU bfloat16 program could not run")
    trained = components.load_for_inference(checkpoint, classes)
    T, S = frames or trained.cfg.data.frames, crop or trained.cfg.data.crop
    m = trained.cfg.model
    if m.motion and T // 4 < 1:
        raise HCMLError(f"--frames {T}: the high motion level runs at T/4 frames; use --frames >= 4")
    if S < 8:
        raise HCMLError(f"--crop {S}: must be >= 8")
    dt = DTYPES[dtype]
    net = Classifier(trained.model).eval().to(device=device, dtype=dt)
    # batch 2: a batch of 1 would be specialised into the graph
    example = torch.randn(2, 3, T, S, S, dtype=dt, device=device)
    dynamic = {"clips": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    t0 = time.time()
    try:
        with torch.no_grad():
            ep = torch.export.export(net, (example if dynamic_batch else example[:1],), dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - a graph break is a bug of ours, but say what was being exported
        raise RuntimeError(f"torch.export of {checkpoint} (T={T}, S={S}, {dtype}) failed: {e}") from e
    meta = {**metadata(trained, T, S, dtype, dynamic_batch), "device": device}
    atomic_write(out, lambda f: torch.export.save(ep, f, extra_files={META: json.dumps(meta, indent=1)}),
                 binary=True)
    loaded = torch.export.load(out).module()  # what a server will load, checked before saying it is done
    batches = (1, 3) if dynamic_batch else (1,)
    errs = []
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 3, T, S, S, dtype=dt, device=device)
            errs.append(check_close(net(x), loaded(x), dt, f"the exported program at batch {b}"))
    print(f"[export] {out}: {m.arch} (motion={m.motion}) clips ({'B' if dynamic_batch else 1}, 3, {T}, {S}, {S}) "
          f"{dtype} → logits ({len(trained.classes)} classes, names from {trained.classes_from}); max |exported - "
          f"eager| {max(errs):.2g} (relative, batch {', '.join(map(str, batches))}); {time.time() - t0:.1f}s. "
          f"Load: import hcml.ops; torch.export.load({out!r}).module()(clips)", flush=True)
    if aoti:
        from torch._inductor import aoti_compile_and_package, aoti_load_package

        t1 = time.time()
        # the project's temp name (a killed run's is removed as stale); AOTInductor insists on the suffix
        tmp = Path(aoti).with_name(temp_prefix(aoti) + ".pt2")
        try:
            aoti_compile_and_package(ep, package_path=str(tmp))
            tmp.replace(aoti)
        finally:
            tmp.unlink(missing_ok=True)
        runner = aoti_load_package(aoti)
        with torch.no_grad():
            x = torch.randn(batches[-1], 3, T, S, S, dtype=dt, device=device)
            err = check_close(net(x), runner(x), dt, f"the AOTInductor package {aoti}")
        print(f"[export] {aoti}: AOTInductor package for {device}, max |package - eager| {err:.2g}; "
              f"{time.time() - t1:.0f}s to compile. Load: import hcml.ops; "
              f"torch._inductor.aoti_load_package({aoti!r})(clips)", flush=True)
    return 0
