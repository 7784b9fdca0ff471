"""The C cost-volume kernels for the CPU (``csrc/cost_volume_cpu.c``), built on first use with the system C
compiler into ``$HCML_EXT_DIR`` (default ``~/.cache/hcml/ext``, keyed by a hash of source and flags) and called
through ctypes, which releases the GIL: images are split over ``torch.get_num_threads()`` threads.

Why not a torch C++ extension: that needs torch's headers, ninja and ~30 s of compiling on first use; this needs
only ``cc`` and compiles in about a second. Without a compiler (or with ``HCML_CPU_COST_VOLUME=torch``) the op
uses its pure-torch path, which computes the same thing more slowly.

Flags: ``-O3`` with the reassociation the dot products need to vectorise, but not ``-ffast-math`` (a shared
object built with it may switch the whole process to flush-to-zero) and not ``-march=native`` (results would
then depend on the CPU model).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from hcml.files import remove_stale_temps, temp_prefix
from hcml.ops._cuda import CSRC, ext_dir

SOURCE = CSRC / "cost_volume_cpu.c"
FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-std=c99"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}  # the C entry points per dtype


def wanted() -> bool:
    return os.environ.get("HCML_CPU_COST_VOLUME", "auto") != "torch"


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, or the build failed: warned once, the torch path is used)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        warnings.warn("no C compiler (cc/gcc/clang): the CPU cost volume uses its slower pure-torch path",
                      stacklevel=2)
        return None
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    cache = ext_dir()
    so = cache / f"hcml_cost_volume_cpu_{digest}.so"
    if not so.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache)  # a build killed mid-way
        # concurrent builds (torchrun workers) never collide
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=temp_prefix(so) + ".", suffix=".so")
        os.close(fd)
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"building the C cost volume failed ({cc}): {res.stderr[-300:]}; using the torch path",
                          stacklevel=2)
            return None
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    L, P = ctypes.c_long, ctypes.c_void_p
    for name in ("f32", "f64"):
        getattr(lib, f"hcml_cv_forward_{name}").argtypes = [P, P, P, L, L, L, L, L, L, L, L]
        getattr(lib, f"hcml_cv_backward_{name}").argtypes = [P, P, P, P, P, L, L, L, L, L, L, L, L]
        getattr(lib, f"hcml_cv_forward_planar_{name}").argtypes = [P, P, P, P, L, L, L, L, L, L, L]
        getattr(lib, f"hcml_cv_backward_planar_{name}").argtypes = [P, P, P, P, P, P, P, L, L, L, L, L, L, L]
    return lib


@functools.lru_cache(maxsize=8)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="hcml-cv")


def _split(N: int, fn) -> None:
    """Run ``fn(n0, n1)`` over [0, N) in ``torch.get_num_threads()`` contiguous chunks (ctypes drops the GIL)."""
    k = max(1, min(N, torch.get_num_threads()))
    if k == 1:
        fn(0, N)
        return
    bounds = [N * i // k for i in range(k + 1)]
    list(_pool(k).map(lambda i: fn(bounds[i], bounds[i + 1]), range(k)))


def available(dtype: torch.dtype) -> bool:
    return wanted() and dtype in _SUFFIX and library() is not None


def forward(a: torch.Tensor, b: torch.Tensor, md: int, s: int, D: int) -> torch.Tensor:
    """a, b: contiguous NHWC (N, H, W, C) of one dtype → (N, H, W, D²)."""
    N, H, W, C = a.shape
    out = torch.empty((N, H, W, D * D), dtype=a.dtype)
    fn = getattr(library(), f"hcml_cv_forward_{_SUFFIX[a.dtype]}")
    _split(N, lambda n0, n1: fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), N, H, W, C, md, s, n0, n1))
    return out


def backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, md: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """g (N, H, W, D²), a, b (N, H, W, C), all contiguous → (dL/da, dL/db) as NHWC."""
    N, H, W, C = a.shape
    g1, g2 = torch.empty_like(a), torch.empty_like(b)
    fn = getattr(library(), f"hcml_cv_backward_{_SUFFIX[a.dtype]}")
    _split(N, lambda n0, n1: fn(g.data_ptr(), a.data_ptr(), b.data_ptr(), g1.data_ptr(), g2.data_ptr(), N, H, W, C,
                                md, s, n0, n1))
    return g1, g2


def planar(t: torch.Tensor) -> bool:
    """Whether the planar kernels read ``t`` (N, C, H, W) where it lies: each (n, c) plane contiguous (any n and c
    strides: NCHW, a transposed (B, T) view, a slice of channels)."""
    _, _, H, W = t.shape
    return (W <= 1 or t.stride(3) == 1) and (H <= 1 or t.stride(2) == W)


def _strides(*ts: torch.Tensor) -> ctypes.Array:
    """(n, c) strides of each tensor, in elements, for the planar kernels."""
    return (ctypes.c_long * (2 * len(ts)))(*(st for t in ts for st in t.stride()[:2]))


def forward_planar(a: torch.Tensor, b: torch.Tensor, md: int, s: int, D: int) -> torch.Tensor:
    """a, b (N, C, H, W) of one dtype with contiguous planes (:func:`planar`) → contiguous (N, D², H, W)."""
    N, C, H, W = a.shape
    out = torch.empty((N, D * D, H, W), dtype=a.dtype)
    st = _strides(a, b)
    fn = getattr(library(), f"hcml_cv_forward_planar_{_SUFFIX[a.dtype]}")
    _split(N, lambda n0, n1: fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), st, H, W, C, md, s, n0, n1))
    return out


def backward_planar(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, md: int, s: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """g (N, D², H, W), a, b (N, C, H, W), all with contiguous planes → contiguous (dL/da, dL/db)."""
    N, C, H, W = a.shape
    g1 = torch.empty((N, C, H, W), dtype=a.dtype)
    g2 = torch.empty((N, C, H, W), dtype=a.dtype)
    st = _strides(a, b, g)
    fn = getattr(library(), f"hcml_cv_backward_planar_{_SUFFIX[a.dtype]}")

    def run(n0: int, n1: int) -> None:
        gm = torch.empty(g.shape[1] * H * W, dtype=a.dtype)  # each thread's scratch: the masked grad of one image
        fn(g.data_ptr(), a.data_ptr(), b.data_ptr(), g1.data_ptr(), g2.data_ptr(), gm.data_ptr(), st, H, W, C, md,
           s, n0, n1)

    _split(N, run)
    return g1, g2
