"""The CUDA path of the op: which kernel serves a call, the buffers the kernels read, and loading the extension
(a prebuilt module, which the Dockerfile builds ahead of time, or a cached JIT build).

The kernels compute on one layout only: (B, H, W, Cs) contiguous, 16-byte aligned, Cs = C rounded up to a 16-byte
vector. A channels_last input with such C and alignment is read in place (the model's case: ``plan`` says so and
the tests check it for every call of R2D-50 and R(2+1)D-101); anything else (NCHW, a channel slice, an odd C, a
misaligned view) is copied once into that layout, zero-padded, rather than served by a slower strided kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections import Counter
from pathlib import Path

import torch

from hcml.errors import CostVolumeBuildError

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "cost_volume_binding.cpp", CSRC / "cost_volume_kernels.cu"]


def ext_dir() -> Path:
    """Where the op's compiled extensions are cached: ``$HCML_EXT_DIR``, default ``~/.cache/hcml/ext``."""
    return Path(os.environ.get("HCML_EXT_DIR", Path.home() / ".cache" / "hcml" / "ext"))


@functools.lru_cache(maxsize=None)
def extension():
    """The loaded extension (once per process), with the tensor-core switch applied."""
    mod = _load()
    mod.set_tensor_cores(_TENSOR_CORES[0])
    return mod


def _load():
    """Import ``hcml_cost_volume_cuda`` if prebuilt, else JIT-build it into ``$HCML_EXT_DIR`` (cached)."""
    try:
        import hcml_cost_volume_cuda  # built by `python -m hcml.ops.build` (the Dockerfile does this)

        return hcml_cost_volume_cuda
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise CostVolumeBuildError("this torch build has no CUDA support (torch.version.cuda is None); "
                                   "the CUDA cost volume needs a CUDA build of torch")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise CostVolumeBuildError("CUDA toolkit not found (set CUDA_HOME or put nvcc on PATH) to JIT-build the "
                                   "cost-volume op, or use an image where it was built ahead of time")
    build_dir = ext_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name="hcml_cost_volume_cuda", sources=[str(s) for s in SOURCES],
                                  build_directory=str(build_dir), extra_cuda_cflags=["-O3", "--use_fast_math"],
                                  extra_cflags=["-O3"], verbose=os.environ.get("HCML_EXT_VERBOSE") == "1")
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError
        raise CostVolumeBuildError(f"building the CUDA cost-volume op failed: {e}") from e


VECTOR_BYTES = 16


def _fast_pairs() -> frozenset[tuple[int, int]]:
    """(max displacement, stride) pairs with compile-time kernels, read from ``kFastPairs`` in
    csrc/cost_volume_kernels.cuh (what the dispatch uses), so that the CPU-side plan cannot drift from it."""
    text = (CSRC / "cost_volume_kernels.cuh").read_text()
    m = re.search(r"kFastPairs\[\]\[2\]\s*=\s*\{(.*?)\};", text, re.S)
    if m is None:
        raise CostVolumeBuildError("kFastPairs not found in csrc/cost_volume_kernels.cuh")
    return frozenset((int(a), int(b)) for a, b in re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", m.group(1)))


FAST = _fast_pairs()
# Element types the tensor-core kernels take (mma.sync m16n8k16, sm_80 and later); fp32 stays on CUDA cores.
TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)
COPIES: Counter = Counter()  # inputs copied into the kernels' layout, by argument name
_TENSOR_CORES = [True]  # the switch (bench op times both families); mirrored into the extension


def kernel_for(max_displacement: int, stride: int, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> str:
    """The kernel family a call takes: ``tensor_core`` (bf16/fp16, the compile-time (D, S), sm_80+; a CPU tensor
    is planned as on such a GPU), ``fast`` (the compile-time CUDA-core kernels) or ``generic``."""
    if (max_displacement, stride) not in FAST:
        return "generic"
    capable = device is None or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8
    return "tensor_core" if dtype in TENSOR_CORE_DTYPES and _TENSOR_CORES[0] and capable else "fast"


@contextlib.contextmanager
def tensor_cores(enabled: bool):
    """Within the block, bf16/fp16 calls take the tensor-core kernels (True, the default) or the CUDA-core ones."""
    old = _TENSOR_CORES[0]
    _set_tensor_cores(enabled)
    try:
        yield
    finally:
        _set_tensor_cores(old)


def _set_tensor_cores(enabled: bool) -> None:
    _TENSOR_CORES[0] = enabled
    if extension.cache_info().currsize:
        extension().set_tensor_cores(enabled)


def in_place(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` where it lies: channels_last contiguous, whole 16-byte vectors of
    channels, 16-byte aligned."""
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and t.shape[1] * t.element_size() % VECTOR_BYTES == 0 and t.data_ptr() % VECTOR_BYTES == 0)


def plan(f1: torch.Tensor, f2: torch.Tensor, max_displacement: int, stride: int) -> dict:
    """How a call will run, decided from metadata only (also on CPU tensors): the kernel family and the inputs
    that must be copied first."""
    return {"kernel": kernel_for(max_displacement, stride, f1.dtype, f1.device),
            "copies": [name for name, t in (("f1", f1), ("f2", f2)) if not in_place(t)]}


def as_buffer(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as the (B, H, W, Cs) buffer the kernels read: a view when ``in_place``, else one zero-padded copy."""
    if in_place(t):
        return t.permute(0, 2, 3, 1)
    COPIES[name] += 1
    B, C, H, W = t.shape
    v = VECTOR_BYTES // t.element_size()
    buf = t.new_zeros((B, H, W, -(-C // v) * v))
    buf[..., :C].copy_(t.permute(0, 2, 3, 1))
    return buf


def dispatch_counts() -> dict[str, int]:
    """Calls served by each kernel (from the extension, when built) and inputs copied, since the last reset."""
    out = {f"copied_{k}": v for k, v in COPIES.items()}
    if extension.cache_info().currsize:
        out.update(extension().dispatch_counts())
    return out


def reset_dispatch_counts() -> None:
    COPIES.clear()
    if extension.cache_info().currsize:
        extension().reset_dispatch_counts()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def forward(f1, f2, md: int, s: int):
    """(B, D², H, W) as a channels_last view of the kernel's (B, H, W, D²) output."""
    out = extension().forward(as_buffer(f1, "f1"), as_buffer(f2, "f2"), f1.shape[1], md, s, _stream(f1))
    return out.permute(0, 3, 1, 2)


def backward(grad, f1, f2, md: int, s: int):
    """Both input grads as (B, C, H, W) views of the kernel's (B, H, W, Cs) buffers."""
    C = f1.shape[1]
    g = grad.permute(0, 2, 3, 1).contiguous()  # a view when grad is channels_last
    g1, g2 = extension().backward(g, as_buffer(f1, "f1"), as_buffer(f2, "f2"), C, md, s, _stream(f1))
    return g1[..., :C].permute(0, 3, 1, 2), g2[..., :C].permute(0, 3, 1, 2)
